"""ONNX Runtime sessions set up the same way for both models of a pair."""
from __future__ import annotations

from pathlib import Path

from app.errors import MeasurementFailed

CPU = "CPUExecutionProvider"
# Short names a caller may use beside ONNX Runtime's own.
ALIASES = {
    "cpu": CPU,
    "cuda": "CUDAExecutionProvider",
    "gpu": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
}
ROLE_NAMES = {"baseline": "the original model", "result": "the compressed model"}


def resolve_providers(requested: list[str] | None) -> tuple[list[str], list[str]]:
    """ONNX Runtime provider list to ask for, in preference order, and notes about what was not available.

    CPU always closes the list so nodes an accelerator cannot run still run.
    """
    import onnxruntime as ort

    available = ort.get_available_providers()
    wanted: list[str] = []
    for name in requested or [CPU]:
        ort_name = ALIASES.get(name.lower(), name)
        if ort_name not in wanted:
            wanted.append(ort_name)
    chosen, notes = [], []
    for name in wanted:
        if name in available:
            chosen.append(name)
        else:
            notes.append(f"{name} was requested but this onnxruntime build does not offer it "
                         f"(available: {', '.join(available)}); measured without it")
    if "TensorrtExecutionProvider" in chosen and "CUDAExecutionProvider" in available \
            and "CUDAExecutionProvider" not in chosen:
        chosen.append("CUDAExecutionProvider")
    if CPU in chosen:
        chosen.remove(CPU)
    chosen.append(CPU)
    return chosen, notes


def open_session(path: Path, *, role: str, providers: list[str], threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Two sessions live side by side and take turns: a waiting session's spinning
    # threads would steal cores from the one being timed.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only; warnings about old exporters are noise here
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as exc:
        raise MeasurementFailed(f"ONNX Runtime could not load {ROLE_NAMES[role]}: {ort_error_text(exc)}") from exc


def ort_error_text(exc: Exception) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if len(text) <= 2000 else text[:2000] + " ..."
