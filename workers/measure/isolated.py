"""measure_pair in a fresh process of its own, pinned to cores, so one job's figures do not depend on what the
worker did before (its heap, its threads, its imported libraries, a previous job's sessions).

The worker writes the request into a private folder, starts `python -m workers.measure.child <folder> <parent pid>`
and reads its progress lines; the child pins itself to one logical CPU per physical core it may use (as many
as the measurement's threads), measures, and writes the report into the folder. A stop request is a file the
child looks for at every round boundary. A child that dies (killed, out of memory, a crash inside ONNX
Runtime) fails the measurement with its exit status and the end of its error output, and the worker goes on.

    report = measure_isolated(original, compressed, MeasureSpec(batch_sizes=[1, 8], warmup=10, iterations=100))

A goal search measures many candidates of one job: MeasuringProcess keeps one such process for all of them (it
starts once, imports once, pins once) and gives each measurement a folder of its own; a process that dies is
started again for the next one. Measured on opt-mnist: a fresh process cost 0.8-1.6 s per measurement where the
measurement itself took 0.6 s.

    with MeasuringProcess(threads=2) as measurer:
        report = measurer.measure(original, candidate, spec)
"""
from __future__ import annotations

import json
import os
import queue
import shutil
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
    with tempfile.TemporaryDirectory(prefix="modelpress-measure-") as folder_name:
        folder = Path(folder_name)
        _write_request(folder, baseline, result, spec, cores)
        errors = folder / "stderr.txt"
        with open(errors, "wb") as stderr:
            child = subprocess.Popen([sys.executable, "-m", "workers.measure.child", str(folder), str(os.getpid())],
                                     stdout=subprocess.PIPE, stderr=stderr, stdin=subprocess.DEVNULL,
                                     cwd=folder, env=_child_env())
        try:
            _follow(_reader(child), child, folder, spec.on_progress, spec.should_stop, timeout_s)
        finally:
            if child.poll() is None:
                child.kill()
            child.wait()
        return _outcome(child.returncode, folder, errors)


class MeasuringProcess:
    """One measuring process for many measurements, each as measure_isolated would make it (same request, same
    report, same failures), at `threads` threads pinned once. measure() starts the process where there is none or
    the last one died; close() (or leaving the `with` block) ends it. Not thread-safe: one measurement at a time."""

    def __init__(self, threads: int | None = None, *, pin: bool = True) -> None:
        self.threads = int(threads) if threads else default_threads()
        self.cores = pick_cores(self.threads) if pin else []
        self.child: subprocess.Popen | None = None
        self.lines: queue.Queue[str | None] | None = None
        self.home = tempfile.TemporaryDirectory(prefix="modelpress-measurer-")
        self.started = 0  # processes started so far
        self.served = 0   # measurements asked of them

    def __enter__(self) -> MeasuringProcess:
        return self

    def __exit__(self, *_exc: Any) -> None:
        self.close()

    def measure(self, baseline: Path, result: Path, spec: MeasureSpec, *, timeout_s: float = 3600) -> dict[str, Any]:
        spec = replace(spec, threads=self.threads)
        if self.child is None or self.child.poll() is not None:
            self._start()
        assert self.child is not None and self.child.stdin is not None and self.lines is not None
        self.served += 1
        folder = Path(self.home.name) / f"measurement-{self.served}"
        folder.mkdir()
        try:
            _write_request(folder, baseline, result, spec, self.cores, how=(
                f"one Python process for this job's candidates (measurement {self.served}, process {self.started})"))
            try:
                self.child.stdin.write(f"{folder}\n".encode())
                self.child.stdin.flush()
            except (BrokenPipeError, OSError):
                pass  # it died since: _follow reads its end and _outcome says how
            code = _follow(self.lines, self.child, folder, spec.on_progress, spec.should_stop, timeout_s)
        except BaseException:
            self._stop()  # a measurement left halfway (a timeout, an interrupt) leaves no process behind
            raise
        if code is None:  # the process ended instead of answering (its output closed: it is gone or going)
            assert self.child is not None
            try:
                returncode = self.child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.child.kill()
                returncode = self.child.wait()
            self.child = None
            if returncode == 0:
                raise MeasurementFailed("the measuring process ended without answering", code="measurement_crashed")
            return _outcome(returncode, folder, self.errors)
        try:
            return _outcome(code, folder, self.errors)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def close(self) -> None:
        self._stop()
        self.home.cleanup()

    @property
    def errors(self) -> Path:
        return Path(self.home.name) / f"stderr-{self.started}.txt"

    def _start(self) -> None:
        self.started += 1
        with open(self.errors, "wb") as stderr:
            self.child = subprocess.Popen(
                [sys.executable, "-m", "workers.measure.child", "--serve", json.dumps(self.cores), str(os.getpid())],
                stdout=subprocess.PIPE, stderr=stderr, stdin=subprocess.PIPE, cwd=self.home.name, env=_child_env())
        self.lines = _reader(self.child)

    def _stop(self) -> None:
        child, self.child = self.child, None
        if child is None:
            return
        if child.poll() is None:
            try:
                assert child.stdin is not None
                child.stdin.close()  # end of requests: it exits
                child.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                child.kill()
        child.wait()


def _write_request(folder: Path, baseline: Path, result: Path, spec: MeasureSpec, cores: list[int],
                   how: str = "a fresh Python process per measurement") -> None:
    """request.json (and the dataset beside it) for the child; `how`: the process it runs in, for the report."""
    dataset = spec.dataset
    request = {"baseline": str(Path(baseline).resolve()), "result": str(Path(result).resolve()),
               "cores": cores, "spec": spec.to_json(), "dataset": None, "how": how}
    if dataset is not None:
        arrays = {f"input:{name}": value for name, value in dataset.inputs.items()}
        if dataset.labels is not None:
            arrays["labels"] = np.asarray(dataset.labels)
        np.savez(folder / DATASET, **arrays)
        request["dataset"] = {"file": DATASET, "name": dataset.name}
    (folder / REQUEST).write_text(json.dumps(request))


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    # The project root must be importable in the child even where the package is not installed.
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _reader(child: subprocess.Popen) -> queue.Queue[str | None]:
    """The child's stdout, line by line, in a queue that a reader thread fills; None once it ends."""
    lines: queue.Queue[str | None] = queue.Queue()
    stdout = child.stdout
    assert stdout is not None  # started with stdout=PIPE

    def read() -> None:
        for raw in stdout:
            lines.put(raw.decode("utf-8", "replace"))
        lines.put(None)

    threading.Thread(target=read, daemon=True, name="measure-progress").start()
    return lines


def _follow(lines: queue.Queue[str | None], child: subprocess.Popen, folder: Path, on_progress, should_stop,
            timeout_s: float) -> int | None:
    """Relays progress until the measurement ends: returns its exit code where a serving process says it is done
    ({"done": code}), None where the process's output ended (a process of its own has exited)."""
    deadline = time.monotonic() + timeout_s
    stop_asked = False
    while True:
        try:
            line = lines.get(timeout=0.25)
        except queue.Empty:
            line = ""
        if line is None:
            return None
        if line.startswith("{"):
            try:
                message = json.loads(line)
                if "done" in message:
                    return int(message["done"])
                if on_progress is not None:
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
