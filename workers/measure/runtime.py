"""ONNX Runtime sessions set up the same way for both models of a pair."""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile
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


def requested_providers(requested: list[str] | None) -> list[str]:
    """ONNX Runtime names of the providers to measure on, in the caller's order; CPU is always measured, last
    unless the caller put it earlier."""
    wanted: list[str] = []
    for name in requested or [CPU]:
        ort_name = ALIASES.get(name.lower(), name)
        if ort_name not in wanted:
            wanted.append(ort_name)
    if CPU not in wanted:
        wanted.append(CPU)
    return wanted


def unavailable_reason(provider: str) -> str | None:
    """Why this onnxruntime build cannot offer `provider` at all, or None when it can try."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if provider in available:
        return None
    hint = " (install onnxruntime-gpu on a worker with an NVIDIA GPU)" if provider != CPU else ""
    return (f"this onnxruntime build ({ort.__version__}) has no {provider}; it offers {', '.join(available)}"
            + hint)


def session_providers(provider: str) -> list[str]:
    """What a session for `provider` asks ONNX Runtime for: the provider, then CPU for the nodes it cannot
    run (ONNX Runtime's own partitioning; the share of nodes is ONNX Runtime's decision)."""
    if provider == "TensorrtExecutionProvider":
        return [provider, "CUDAExecutionProvider", CPU]
    return [provider] if provider == CPU else [provider, CPU]


@contextlib.contextmanager
def native_stderr():
    """Capture what native code writes to file descriptor 2 (ONNX Runtime's default logger) while the block
    runs; the text is in the yielded list afterwards."""
    captured: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            captured.append(sink.read().decode("utf-8", "replace"))


def session_options(threads: int):
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
    return options


# The memory settings every measuring session uses (ONNX Runtime's defaults, written down for the report).
ARENA = {"enable_cpu_mem_arena": True, "enable_mem_pattern": True, "arena_extend_strategy": "kNextPowerOfTwo",
         "note": "ONNX Runtime's defaults: a growing CPU arena that keeps what it allocated, and memory "
                 "patterns planned from the first run"}


def open_session(path: Path, *, role: str, providers: list[str], threads: int):
    """A session on `providers`; MeasurementFailed with ONNX Runtime's message when the model cannot load."""
    import onnxruntime as ort

    try:
        return ort.InferenceSession(str(path), sess_options=session_options(threads), providers=providers)
    except Exception as exc:
        raise MeasurementFailed(f"ONNX Runtime could not load {ROLE_NAMES[role]}: {ort_error_text(exc)}") from exc


def start_provider(path: Path, *, role: str, provider: str, threads: int):
    """(session, None) with `provider` really in use, or (None, why it did not start, in ONNX Runtime's
    words). A session that ONNX Runtime quietly put on the CPU instead counts as not started."""
    with native_stderr() as log:
        session = open_session(path, role=role, providers=session_providers(provider), threads=threads)
    used = session.get_providers()
    if used and used[0] == provider:
        return session, None
    said = " ".join(line.strip() for line in "".join(log).splitlines() if line.strip())
    return None, (f"{provider} did not start for {ROLE_NAMES[role]}; ONNX Runtime used {', '.join(used)}"
                  + (f": {said[:1500]}" if said else ""))


def ort_error_text(exc: Exception) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if len(text) <= 2000 else text[:2000] + " ..."
