"""A job's target lowering, by runtime: OpenVINO IR on the CPU (workers.openvino.job), TensorRT engines on an NVIDIA
GPU (workers.tensorrt.job), LiteRT .tflite files for mobile (workers.litert.job). All return
workers.openvino.job.LoweredForJob; each module imports its runtime only when it lowers."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from app.errors import JobFailed


def lowering_method(target: dict[str, Any] | None) -> str:
    """The step id a lowering is recorded under (lower.openvino, lower.tensorrt)."""
    return f"lower.{(target or {}).get('runtime') or 'openvino'}"


def lower_for_target(run, target: dict[str, Any], model: Path, workdir: Path, evaluate: dict[str, Any], input_shapes,
                     *, share: tuple[float, float], store: bool = True):
    runtime = target.get("runtime")
    if runtime == "openvino":
        from workers.openvino.job import lower_for_target as lower
    elif runtime == "tensorrt":
        from workers.tensorrt.job import lower_for_target as lower
    elif runtime == "litert":
        from workers.litert.job import export_for_target as lower
    else:
        raise JobFailed(f"this worker cannot lower to the {runtime} {target.get('device')} target",
                        code="no_worker_for_target")
    return lower(run, target, model, workdir, evaluate, input_shapes, share=share, store=store)
