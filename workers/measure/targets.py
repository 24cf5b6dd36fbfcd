"""Measuring on a target runtime (a job's `target`, app.targets.schemas): three models take turns in one harness.

- baseline: the original on ONNX Runtime's CPU provider at fp32, the reference every figure is against;
- runtime: the original on the target runtime at f32, so the runtime's own gain shows apart from the compression's;
- result: the compressed model on the target runtime at the target's precision.

speedup (baseline -> result) is the total gain; runtime_speedup (baseline -> runtime) the runtime's;
compression_speedup (runtime -> result) the compression's on that runtime. Fidelity is always against the
reference: the result's on the job's inputs, the runtime's under `fidelity.runtime`.
"""
from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from app.errors import MeasurementFailed
from workers.measure.runtime import CPU, session_providers, start_provider

# The roles a measurement may time, in the order they are created and reported.
MEASURED_ROLES = ("baseline", "runtime", "result")


def is_ir(path: Path) -> bool:
    """An OpenVINO IR (model.xml + model.bin) rather than an ONNX file."""
    return Path(path).suffix == ".xml"


def is_engine(path: Path) -> bool:
    """A TensorRT engine (workers.tensorrt.engine) rather than an ONNX file."""
    return Path(path).suffix == ".engine"


def is_lowered(path: Path) -> bool:
    """A target runtime's own format (IR, engine or .tflite): not parsed as ONNX."""
    return is_ir(path) or is_engine(path) or Path(path).suffix == ".tflite"


def lowered_size(path: Path) -> dict[str, Any]:
    """ir_size, or an engine's: its file (weights and kernels together; TensorRT does not say how many parameters)."""
    if is_ir(path):
        return ir_size(path)
    if Path(path).suffix == ".tflite":
        from workers.litert.flatbuffer import size as tflite_size

        return tflite_size(path)
    size = Path(path).stat().st_size
    return {"file_bytes": size, "external_data_files": 0, "parameters": None, "initializer_bytes": None,
            "format": "tensorrt-engine"}


def ir_size(path: Path) -> dict[str, Any]:
    """file_bytes of an IR: the .xml and its .bin; initializer_bytes: the .bin (its weights); parameters: the
    element count of its Constant nodes (scales and zero points of FakeQuantize included)."""
    import openvino as ov

    xml, weights = Path(path), Path(path).with_suffix(".bin")
    model = ov.Core().read_model(str(xml))
    parameters = 0
    for op in model.get_ops():
        if op.get_type_name() == "Constant":
            parameters += int(np.prod(op.get_output_shape(0), dtype=np.int64))
    return {"file_bytes": xml.stat().st_size + (weights.stat().st_size if weights.is_file() else 0),
            "external_data_files": 1 if weights.is_file() else 0, "parameters": parameters,
            "initializer_bytes": weights.stat().st_size if weights.is_file() else 0, "format": "openvino-ir"}


def feed_of(feeds: dict[str, dict[str, np.ndarray]], role: str) -> dict[str, np.ndarray]:
    """The runtime role runs the original model: it is fed what the original is fed."""
    return feeds["baseline" if role == "runtime" else role]


def target_label(target: dict[str, Any]) -> str:
    if target.get("runtime") == "onnxruntime":
        return f"ONNX Runtime {target.get('device', 'cpu').upper()}"
    if target.get("runtime") == "tensorrt":
        from workers.tensorrt.job import target_label as tensorrt_label

        return tensorrt_label(target)
    if target.get("runtime") == "litert":
        return f"LiteRT {target.get('device', 'cpu').upper()} ({target['precision']})"
    return f"OpenVINO {target.get('device', 'cpu').upper()} ({target['precision']})"


def load_target(target: dict[str, Any], paths: dict[str, Path], *, threads: int) -> dict[str, Any]:
    """The harness's provider entry for a target: its three sessions, how to create them again, and the engines
    the memory probe uses."""
    from workers.openvino.session import OpenVINOSession

    if target.get("device") == "cuda":
        return load_gpu_target(target, paths, threads=threads)
    if target.get("runtime") not in ("openvino", "litert"):
        raise MeasurementFailed(f"this worker cannot measure on the {target.get('runtime')} target")
    precision = target["precision"]

    def reference(role: str = "baseline"):
        session, why = start_provider(paths["baseline"], role=role, provider=CPU, threads=threads)
        if session is None:
            raise MeasurementFailed(why or "ONNX Runtime did not start")
        return session

    names = [o.name for o in reference().get_outputs()]
    engine: dict[str, Any] = {"openvino": {"precision": precision, "device": "CPU"}}
    if target.get("runtime") == "litert":
        from workers.litert.session import litert_openers

        openers, engine = litert_openers(paths, reference, precision=precision, threads=threads)
    else:
        openers = {
            "baseline": reference,
            "runtime": lambda: OpenVINOSession(paths["baseline"], precision="f32", threads=threads,
                                               output_names=names),
            "result": lambda: OpenVINOSession(paths["result"], precision=precision, threads=threads,
                                              output_names=names),
        }
    sessions, load_ms, reopen = open_roles(openers)
    return {"provider": target_label(target), "available": True, "reason": None, "sessions": sessions,
            "load_ms": load_ms, "reopen": reopen, "target": dict(target),
            "engines": {"baseline": [CPU], "result": engine}}


def open_roles(openers: dict[str, Callable[[], Any]]):
    """(sessions, load_ms, reopen) of the MEASURED_ROLES: each session opened in order and timed, and how to open
    them again in another order."""
    sessions, load_ms = {}, {}
    for role in MEASURED_ROLES:
        clock = time.perf_counter()
        sessions[role] = openers[role]()
        load_ms[role] = (time.perf_counter() - clock) * 1000

    def reopen(order: tuple[str, ...]) -> dict[str, Any]:
        return {role: openers[role]() for role in order}

    return sessions, load_ms, reopen


def load_gpu_target(target: dict[str, Any], paths: dict[str, Path], *, threads: int) -> dict[str, Any]:
    """A GPU target's entry. The baseline is the reference every target is measured against: the original on ONNX
    Runtime's CPU provider at fp32. On tensorrt, runtime is the original built as an f32 engine and result the job's
    engine, both through TensorRT's execution context; on onnxruntime cuda, runtime is the original and result the
    steps' model on ONNX Runtime's CUDA provider. The GPU roles run I/O-bound (workers.measure.latency.bound_call)."""
    label = target_label(target)

    def reference(role: str = "baseline"):
        session, why = start_provider(paths["baseline"], role=role, provider=CPU, threads=threads)
        if session is None:
            raise MeasurementFailed(why or "ONNX Runtime did not start")
        return session

    if target.get("runtime") == "tensorrt":
        from workers.tensorrt.session import TensorRTSession

        runtime_engine = _runtime_engine(paths)
        openers: dict[str, Callable[[], Any]] = {
            "baseline": reference,
            "runtime": lambda: TensorRTSession(runtime_engine, label="TensorRT CUDA (f32)"),
            "result": lambda: TensorRTSession(paths["result"], label=label),
        }
        result_engine: list[str] | dict[str, Any] = {"tensorrt": {"precision": target.get("precision") or "f32"}}
    else:
        cuda = "CUDAExecutionProvider"

        def on_cuda(role: str) -> Callable[[], Any]:
            def start() -> Any:
                # "runtime" is the original: ONNX Runtime's messages name it so
                session, why = start_provider(paths[role], role="baseline" if role == "runtime" else role,
                                              provider=cuda, threads=threads)
                if session is None:
                    raise MeasurementFailed(why or f"{cuda} did not start")
                return session
            return start

        openers = {"baseline": reference, "runtime": on_cuda("baseline"), "result": on_cuda("result")}
        result_engine = session_providers(cuda)
    sessions, load_ms, reopen = open_roles(openers)
    return {"provider": label, "available": True, "reason": None, "sessions": sessions, "load_ms": load_ms,
            "reopen": reopen, "target": dict(target), "on_device": True,
            "engines": {"baseline": [CPU], "result": result_engine}}


def _runtime_engine(paths: dict[str, Path]) -> Path:
    """The original as an f32 engine with the result engine's optimization profile, built once per profile beside
    the original: a search's candidates share it."""
    from workers.tensorrt.engine import build_engine, read_meta
    from workers.tensorrt.job import engine_plan

    profile = {name: {k: list(v) for k, v in dims.items()}
               for name, dims in (read_meta(paths["result"]).get("profile") or {}).items()} \
        or engine_plan(paths["baseline"], None, [1])
    key = hashlib.sha256(json.dumps(profile, sort_keys=True).encode()).hexdigest()[:12]
    engine_dir = Path(paths["baseline"]).parent / f"tensorrt-f32-{key}"
    built = sorted(engine_dir.glob("*_f32.engine"))
    return built[0] if built else build_engine(paths["baseline"], engine_dir, precision="f32", profile=profile)[0]
