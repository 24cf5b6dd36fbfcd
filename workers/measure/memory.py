"""Peak resident memory each model adds, measured in a fresh child process per model.

The worker's own peak (VmHWM) covers everything it ever did, so each model gets a
process of its own: it imports onnxruntime, loads the inputs, resets its peak
mark, then creates the session and runs it. The figure is host memory only.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

PROBE = Path(__file__).with_name("_rss_probe.py")
RUNS = 2  # the first run sizes ONNX Runtime's arena; the second shows it reused


def _probe(role: str, model: Path, feeds: dict[str, np.ndarray], providers: list[str] | dict[str, Any], threads: int,
           folder: Path, timeout_s: float) -> dict[str, Any]:
    feeds_path = folder / f"{role}-inputs.npz"
    np.savez(feeds_path, allow_pickle=False, **feeds)
    # -P: the probe's own folder must not come first on sys.path and shadow standard modules.
    argv = [sys.executable, "-P", str(PROBE), str(model), str(feeds_path), json.dumps(providers), str(threads),
            str(RUNS)]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"the memory probe took longer than {timeout_s:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return {"error": f"the memory probe exited with {done.returncode}: {' | '.join(tail)}"}
    return json.loads(lines[-1])


def measure_memory(paths: dict[str, Path], feeds: dict[str, dict[str, np.ndarray]], *, batch_size: int,
                   providers: list[str], threads: int, timeout_s: float = 600,
                   result_providers: list[str] | dict[str, Any] | None = None) -> dict[str, Any]:
    """result_providers: what the result runs on when it is not `providers` (a target runtime: {"openvino":
    {"precision": ..., "device": "CPU"}})."""
    engines = {"baseline": providers, "result": providers if result_providers is None else result_providers}
    # The two probes run at once: each reports its own process's peak, which the other does not move, and the
    # latency was timed before (each probe imports ONNX Runtime: 0.2 s or more, one after the other before).
    with tempfile.TemporaryDirectory(prefix="modelpress-rss-") as tmp, ThreadPoolExecutor(2) as pool:
        running = {role: pool.submit(_probe, role, paths[role], feeds[role], engines[role], threads, Path(tmp),
                                     timeout_s) for role in ("baseline", "result")}
        measured = {role: future.result() for role, future in running.items()}
    errors = [f"{role}: {m['error']}" for role, m in measured.items() if "error" in m]
    report: dict[str, Any] = {
        "method": ("peak resident set size (VmHWM) of a fresh process, minus its size just before the session "
                   f"was created; the session is created and run {RUNS} times at batch {batch_size}. Thread stacks and "
                   "allocator pools move it by a few MB between identical runs"),
        "batch_size": batch_size,
        "unit": "bytes",
    }
    if errors:
        report.update(baseline=None, result=None, ratio=None, reason="; ".join(errors))
        return report
    base, res = measured["baseline"], measured["result"]
    report.update(
        baseline=base, result=res,
        ratio=round(res["peak_rss_increase_bytes"] / base["peak_rss_increase_bytes"], 4)
        if base["peak_rss_increase_bytes"] > 0 else None,
    )
    if isinstance(result_providers, dict):
        runtime = next((r for r in ("tensorrt", "litert") if r in result_providers), "openvino")
        report["runtimes"] = {"baseline": "ONNX Runtime " + providers[0], "result": {
            "openvino": "OpenVINO ", "tensorrt": "TensorRT ", "litert": "LiteRT "}[runtime]
            + json.dumps(result_providers.get(runtime))}
    if providers[0] != "CPUExecutionProvider":
        report["scope"] = "host memory, and device memory in device_memory_increase_bytes"
        report["device_method"] = ("NVML's used memory on GPU 0 after the runs minus before the session was "
                                   "created (other processes on the GPU included); ONNX Runtime's CUDA arena "
                                   "keeps what it allocated, so this is close to the session's peak")
    else:
        report["device"] = {"value": None, "reason": "measured on the CPU provider: no device memory"}
    return report
