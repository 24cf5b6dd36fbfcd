"""The measuring process started by workers.measure.isolated: `python -m workers.measure.child <folder> <parent pid>`.

It pins itself to the cores it was given before loading ONNX Runtime (whose threads then inherit them),
measures, and writes result.json into the folder: the report (exit 0), or the failure (exit 3), or exits 4
when asked to stop. Progress goes to stdout as one JSON object per line.

`python -m workers.measure.child --serve <cores as JSON> <parent pid>` (isolated.MeasuringProcess) pins itself
once, then reads one request folder per line from stdin and measures each as above; instead of exiting it says
{"done": <that exit code>} on stdout, and it exits when stdin closes.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from workers.measure.isolated import DATASET, EXIT_FAILED, EXIT_STOPPED, REQUEST, RESULT, STOP


def main(folder: Path, parent_pid: int) -> int:
    from workers.sandbox import die_with_parent

    die_with_parent(parent_pid)  # a measurement outlives neither its job nor its worker
    request = json.loads((folder / REQUEST).read_text())
    return measure(folder, _pin(request["cores"]))


def serve(cores: list[int], parent_pid: int) -> int:
    import gc

    from workers.sandbox import die_with_parent

    die_with_parent(parent_pid)
    pinned = _pin(cores)
    for line in sys.stdin:
        if not line.strip():
            continue
        code = measure(Path(line.strip()), pinned)
        gc.collect()  # the last measurement's sessions go before the next one's are made
        print(json.dumps({"done": code}), flush=True)
    return 0


def _pin(cores: list[int]) -> list[int]:
    if not cores:
        return []
    try:
        os.sched_setaffinity(0, cores)
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return []


def measure(folder: Path, pinned: list[int]) -> int:
    """One measurement of the request in `folder`; its exit code (0, EXIT_FAILED or EXIT_STOPPED)."""
    request = json.loads((folder / REQUEST).read_text())
    from app.errors import ModelPressError
    from workers.measure import MeasureSpec, Stopped, measure_pair

    dataset = None
    if request["dataset"]:
        import numpy as np

        from workers.datasets import Dataset

        with np.load(folder / DATASET, allow_pickle=False) as arrays:
            inputs = {key.removeprefix("input:"): arrays[key] for key in arrays.files if key.startswith("input:")}
            labels = arrays["labels"] if "labels" in arrays.files else None
        dataset = Dataset(inputs=inputs, labels=labels, name=request["dataset"]["name"])
    stop_file = folder / STOP

    def progress(fraction: float, message: str) -> None:
        print(json.dumps({"progress": fraction, "message": message}), flush=True)

    try:
        spec = MeasureSpec.from_json(request["spec"], on_progress=progress, should_stop=stop_file.exists,
                                     dataset=dataset)
        report = measure_pair(Path(request["baseline"]), Path(request["result"]), spec)
    except Stopped:
        return EXIT_STOPPED
    except ModelPressError as exc:
        (folder / RESULT).write_text(json.dumps({"message": exc.message, "code": exc.code}))
        return EXIT_FAILED
    report["environment"]["pinned_cores"] = pinned or None
    report["environment"]["process"] = {
        "isolated": True, "pid": os.getpid(),
        "how": request["how"] + (
            f", pinned to logical CPUs {pinned}" if pinned else ", not pinned (the OS did not allow it)"),
    }
    (folder / RESULT).write_text(json.dumps(report, default=str))
    return 0


if __name__ == "__main__":
    from workers.sandbox import leave  # the result is written: the parent waits only for the process to end

    if sys.argv[1] == "--serve":
        leave(serve(json.loads(sys.argv[2]), int(sys.argv[3])))
    leave(main(Path(sys.argv[1]), int(sys.argv[2])))
