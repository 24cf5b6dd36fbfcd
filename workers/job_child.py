"""A job's own process: `python -m workers.job_child <folder> <fd> <reply fd>`, started by the worker
(workers.supervise).

It fences itself in first (workers.sandbox: memory, CPU time, network, death with its parent), then runs the
job's steps and measurements on the local files named in <folder>/request.json, sends progress and artifacts
as JSON lines on file descriptor <fd> (and, at each step boundary, a checkpoint that the worker answers on
<reply fd> with "go" or "stop"), and writes how it ended to <folder>/result.json:
{"status": "succeeded", "report", "summary", "rows"}, {"status": "cancelled"} or
{"status": "failed", "code", "message"}. Its stdout and stderr go to <folder>/output.log.
"""
from __future__ import annotations

import json
import os
import re
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

REQUEST, RESULT, STOP, OUTPUT = "request.json", "result.json", "stop", "output.log"
# ONNX Runtime's words for an op it has no kernel for (a custom domain's, or one newer than it knows).
UNSUPPORTED_OP = re.compile(r"([\w.]*:?[\w.]+)\(-?\d+\) is not a registered function/op"
                            r"|Could not find an implementation for ([\w.]+\(\d+\))")


def main(folder: Path, fd: int, reply_fd: int) -> int:
    from workers.sandbox import JobLimits, apply_in_child

    request = json.loads((folder / REQUEST).read_text())
    limits = JobLimits(**request["limits"])
    sandbox = apply_in_child(limits, request["parent_pid"])
    channel = os.fdopen(fd, "w", buffering=1, encoding="utf-8")
    replies = os.fdopen(reply_fd, "r", encoding="utf-8")

    def send(message: dict) -> None:
        channel.write(json.dumps(message) + "\n")

    def ask_cancelled() -> bool:
        send({"type": "checkpoint"})
        return replies.readline().strip() != "go"  # "stop", or the worker is gone

    result = run(folder, request, sandbox, limits, send, ask_cancelled)
    (folder / RESULT).write_text(json.dumps(result, default=str))
    channel.close()
    return 0


def run(folder: Path, request: dict, sandbox: dict, limits, send, ask_cancelled=None) -> dict:
    from app.errors import ModelPressError
    from workers.steps import Cancelled, JobRun, execute

    job = JobRun(job_id=request["job_id"], folder=folder, send=send, stop_file=folder / STOP,
                 datasets={k: tuple(v) for k, v in request["datasets"].items()},
                 models={k: tuple(v) for k, v in request["models"].items()}, sandbox=sandbox,
                 ask_cancelled=ask_cancelled, resume=dict(request.get("resume") or {}),
                 targets=request.get("targets"))
    workdir = folder / "work"
    workdir.mkdir(exist_ok=True)
    try:
        runner: Callable[..., Any] = execute
        if request.get("kind") == "convert":  # an upload in another format exported to ONNX (workers/convert)
            from workers.convert.job import execute_conversion

            runner = execute_conversion
        elif request.get("kind") == "gate":  # a candidate measured against a baseline under a policy (workers/gate)
            from workers.gate import execute_gate

            runner = execute_gate
        report, summary, rows = runner(job, workdir, Path(request["model"]["path"]), request["model"]["format"],
                                        request["spec"])
        return {"status": "succeeded", "report": report, "summary": summary, "rows": rows}
    except Cancelled:
        return {"status": "cancelled"}
    except MemoryError:
        return _memory_exhausted(limits, "a Python allocation failed (MemoryError)")
    except ModelPressError as exc:
        return _failure(exc.code, exc.message, limits)
    except Exception as exc:  # a bug or an environment problem: say what happened, keep the trace in the log
        traceback.print_exc()
        return _failure("internal_error", f"{type(exc).__name__}: {exc}", limits)


def _failure(code: str, message: str, limits) -> dict:
    """A failure in words a user can act on: running out of memory and ops ONNX Runtime cannot run are named
    as such, whichever step or measurement met them."""
    from workers.sandbox import looks_out_of_memory

    if code != "resource_limit" and limits.memory_bytes and looks_out_of_memory(message):
        return _memory_exhausted(limits, message)
    if code != "resource_limit" and "SIGXCPU" in message:  # a measuring process spent its CPU time
        return {"status": "failed", "code": "resource_limit",
                "message": f"the job used more than its CPU-time limit of {limits.cpu_time_s} s per process "
                           f"(MODELPRESS_JOB_CPU_TIME_LIMIT_S) and was stopped ({_short(message)})"}
    unsupported = UNSUPPORTED_OP.search(message)
    if unsupported and code != "unsupported_op":
        op = unsupported.group(1) or unsupported.group(2)
        return {"status": "failed", "code": "unsupported_op",
                "message": f"ONNX Runtime on this worker cannot run the op {op}: it is not one of its built-in "
                           f"ops, and ModelPress loads no custom-op libraries ({_short(message)})"}
    return {"status": "failed", "code": code, "message": message}


def _memory_exhausted(limits, detail: str) -> dict:
    return {"status": "failed", "code": "resource_limit",
            "message": f"the job ran out of memory: it may use {limits.memory_bytes / 2**30:.1f} GiB "
                       f"(MODELPRESS_JOB_MEMORY_LIMIT_BYTES) and needed more ({_short(detail)})"}


def _short(text: str, limit: int = 400) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


if __name__ == "__main__":
    from workers.sandbox import leave

    leave(main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])))
