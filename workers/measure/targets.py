"""Measuring on a target runtime (a job's `target`, app.targets.schemas): three models take turns in one harness.

- baseline: the original on ONNX Runtime's CPU provider at fp32, the reference every figure is against;
- runtime: the original on the target runtime at f32, so the runtime's own gain shows apart from the compression's;
- result: the compressed model on the target runtime at the target's precision.

speedup (baseline -> result) is the total gain; runtime_speedup (baseline -> runtime) the runtime's;
compression_speedup (runtime -> result) the compression's on that runtime. Fidelity is always against the
reference: the result's on the job's inputs, the runtime's under `fidelity.runtime`.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from app.errors import MeasurementFailed
from workers.measure.runtime import CPU, start_provider

# The roles a measurement may time, in the order they are created and reported.
MEASURED_ROLES = ("baseline", "runtime", "result")


def is_ir(path: Path) -> bool:
    """An OpenVINO IR (model.xml + model.bin) rather than an ONNX file."""
    return Path(path).suffix == ".xml"


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
    return f"OpenVINO {target.get('device', 'cpu').upper()} ({target['precision']})"


def load_target(target: dict[str, Any], paths: dict[str, Path], *, threads: int) -> dict[str, Any]:
    """The harness's provider entry for a target: its three sessions, how to create them again, and the engines
    the memory probe uses."""
    from workers.openvino.session import OpenVINOSession

    if target.get("runtime") != "openvino":
        raise MeasurementFailed(f"this worker cannot measure on the {target.get('runtime')} target")
    precision = target["precision"]

    def reference(role: str = "baseline"):
        session, why = start_provider(paths["baseline"], role=role, provider=CPU, threads=threads)
        if session is None:
            raise MeasurementFailed(why or "ONNX Runtime did not start")
        return session

    names = [o.name for o in reference().get_outputs()]
    openers: dict[str, Callable[[], Any]] = {
        "baseline": reference,
        "runtime": lambda: OpenVINOSession(paths["baseline"], precision="f32", threads=threads, output_names=names),
        "result": lambda: OpenVINOSession(paths["result"], precision=precision, threads=threads, output_names=names),
    }
    sessions, load_ms = {}, {}
    for role in MEASURED_ROLES:
        clock = time.perf_counter()
        sessions[role] = openers[role]()
        load_ms[role] = (time.perf_counter() - clock) * 1000

    def reopen(order: tuple[str, ...]) -> dict[str, Any]:
        return {role: openers[role]() for role in order}

    return {"provider": target_label(target), "available": True, "reason": None, "sessions": sessions,
            "load_ms": load_ms, "reopen": reopen, "target": dict(target),
            "engines": {"baseline": [CPU], "result": {"openvino": {"precision": precision, "device": "CPU"}}}}
