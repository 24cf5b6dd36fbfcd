"""measure_pair in a fresh process of its own, pinned to cores, so one job's figures do not depend on what the
worker did before (its heap, its threads, its imported libraries, a previous job's sessions).

The worker writes the request into a private folder, starts `python -m workers.measure.child <folder> <parent pid>`
and reads its progress lines; the child pins itself to one logical CPU per physical core it may use (as many
as the measurement's threads), measures, and writes the report into the folder. A stop request is a file the
child looks for at every round boundary. A child that dies (killed, out of memory, a crash inside ONNX
Runtime) fails the measurement with its exit status and the end of its error output, and the worker goes on.

    report = measure_isolated(original, compressed, MeasureSpec(batch_sizes=[1, 8], warmup=10, iterations=100))
"""
from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from app.errors import MeasurementFailed
from workers.measure import Stopped
from workers.measure.environment import default_threads, pick_cores
from workers.measure.spec import MeasureSpec
from workers.sandbox import how_it_ended, output_tail

REQUEST, RESULT, STOP, DATASET = "request.json", "result.json", "stop", "dataset.npz"
EXIT_FAILED, EXIT_STOPPED = 3, 4


def measure_isolated(
    baseline: Path,
    result: Path,
    spec: MeasureSpec | None = None,
    *,
    pin: bool = True,
    timeout_s: float = 3600,
    **options: Any,
) -> dict[str, Any]:
    """measure_pair(baseline, result, spec) run in a child process (spec: a MeasureSpec, or its fields as
    keyword arguments); the same report, plus report["environment"]["process"] saying how it was run."""
    if spec is None:
        spec = MeasureSpec(**options)
    elif options:
        raise TypeError(f"give a MeasureSpec or its fields, not both (got {sorted(options)} beside the spec)")
    threads = int(spec.threads) if spec.threads else default_threads()
    spec = replace(spec, threads=threads)
    cores = pick_cores(threads) if pin else []
    dataset = spec.dataset
    with tempfile.TemporaryDirectory(prefix="modelpress-measure-") as folder_name:
        folder = Path(folder_name)
        request = {"baseline": str(Path(baseline).resolve()), "result": str(Path(result).resolve()),
                   "cores": cores, "spec": spec.to_json(), "dataset": None}
        if dataset is not None:
            arrays = {f"input:{name}": value for name, value in dataset.inputs.items()}
            if dataset.labels is not None:
                arrays["labels"] = np.asarray(dataset.labels)
            np.savez(folder / DATASET, **arrays)
            request["dataset"] = {"file": DATASET, "name": dataset.name}
        (folder / REQUEST).write_text(json.dumps(request))
        errors = folder / "stderr.txt"
        with open(errors, "wb") as stderr:
            child = subprocess.Popen([sys.executable, "-m", "workers.measure.child", str(folder), str(os.getpid())],
                                     stdout=subprocess.PIPE, stderr=stderr, stdin=subprocess.DEVNULL,
                                     cwd=folder, env=_child_env())
        try:
            _follow(child, folder, spec.on_progress, spec.should_stop, timeout_s)
        finally:
            if child.poll() is None:
                child.kill()
            child.wait()
        return _outcome(child.returncode, folder, errors)


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    # The project root must be importable in the child even where the package is not installed.
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _follow(child: subprocess.Popen, folder: Path, on_progress, should_stop, timeout_s: float) -> None:
    lines: queue.Queue[str | None] = queue.Queue()

    stdout = child.stdout
    assert stdout is not None  # started with stdout=PIPE

    def read() -> None:
        for raw in stdout:
            lines.put(raw.decode("utf-8", "replace"))
        lines.put(None)

    threading.Thread(target=read, daemon=True, name="measure-progress").start()
    deadline = time.monotonic() + timeout_s
    stop_asked = False
    while True:
        try:
            line = lines.get(timeout=0.25)
        except queue.Empty:
            line = ""
        if line is None:
            return
        if line.startswith("{") and on_progress is not None:
            try:
                message = json.loads(line)
                on_progress(float(message["progress"]), str(message["message"]))
            except (ValueError, KeyError, TypeError):
                pass
        if not stop_asked and should_stop is not None and should_stop():
            (folder / STOP).touch()
            stop_asked = True
        if time.monotonic() > deadline:
            child.kill()
            raise MeasurementFailed(f"the measurement took longer than its limit of {timeout_s:.0f} s and was "
                                    "stopped", code="measurement_timeout")


def _outcome(returncode: int, folder: Path, errors: Path) -> dict[str, Any]:
    result_file = folder / RESULT
    if returncode == 0 and result_file.exists():
        return json.loads(result_file.read_text())
    if returncode == EXIT_STOPPED:
        raise Stopped()
    if returncode == EXIT_FAILED and result_file.exists():
        failed = json.loads(result_file.read_text())
        raise MeasurementFailed(failed["message"], code=failed.get("code") or "measurement_failed")
    how = how_it_ended(returncode)
    tail = output_tail(errors)
    hint = " (SIGKILL usually means the machine ran out of memory)" if returncode == -signal.SIGKILL else ""
    raise MeasurementFailed(f"the measuring process {how}{hint}" + (": " + " | ".join(tail) if tail else ""),
                            code="measurement_crashed")
