"""The fences around one job's process: memory, CPU time, wall clock, network, and its parent's death.

A worker runs every job in a child process (workers.job_child) that applies these limits to itself before it
reads any byte of the user's model, so a hostile or simply enormous model exhausts the child, never the worker:
the child's failure is the job's failure (`resource_limit`) and the worker takes the next job.

- Memory: RLIMIT_DATA caps the heap and every private anonymous mapping (numpy, torch and ONNX Runtime
  allocations, thread stacks) but not the address space reserved without memory behind it, so allocations
  fail cleanly ("Unable to allocate", "Failed to allocate memory") instead of the machine's OOM killer firing.
- CPU time: RLIMIT_CPU per process (the measuring grandchildren get the same budget each); past it the
  kernel sends SIGXCPU.
- Wall clock: the worker kills the child's whole process group past `job_timeout_s`.
- Network: a fresh network namespace (unshare CLONE_NEWNET; as root, else inside a new user namespace) holds
  only a downed loopback, so nothing the job runs can reach the database, the broker, S3 or the internet.
  Where the OS refuses both, the job runs with the host's network and its report says so.
- CPU priority: `job_nice` (10), so that an API on the same machine answers polls while jobs run.
- PR_SET_PDEATHSIG: a child whose worker died (SIGKILL included) is killed too, never left running.
"""
from __future__ import annotations

import ctypes
import errno
import os
import resource
import signal
import sys
from dataclasses import asdict, dataclass
from typing import Any

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
PR_SET_PDEATHSIG = 1
# Words with which numpy, torch, ONNX Runtime and the C++ runtime report an allocation that failed.
OUT_OF_MEMORY_MARKERS = ("MemoryError", "Unable to allocate", "Failed to allocate memory", "can't allocate memory",
                         "Cannot allocate memory", "bad_alloc", "out of memory", "std::bad_alloc")


@dataclass(frozen=True)
class JobLimits:
    memory_bytes: int | None  # None: no cap
    cpu_time_s: int | None
    wall_clock_s: int
    network: str  # "none" | "host"
    nice: int = 0

    @classmethod
    def from_settings(cls, settings) -> JobLimits:
        memory = settings.job_memory_limit_bytes
        if memory == 0:
            memory = int(0.8 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
        return cls(memory_bytes=memory if memory > 0 else None, cpu_time_s=settings.job_cpu_time_limit_s or None,
                   wall_clock_s=settings.job_timeout_s, network=settings.job_network, nice=settings.job_nice)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def describe(limits: JobLimits) -> str:
    memory = f"{limits.memory_bytes / 2**30:.1f} GiB" if limits.memory_bytes else "no"
    cpu = f"{limits.cpu_time_s} s" if limits.cpu_time_s else "no"
    return f"{memory} memory cap, {cpu} CPU-time cap per process, {limits.wall_clock_s} s wall clock"


def die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when its parent dies; if the parent is already gone, exit now (the signal would
    never come)."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(70)


def apply_in_child(limits: JobLimits, parent_pid: int) -> dict[str, Any]:
    """Called first thing in the job's process. Returns what was applied, for the report."""
    libc = ctypes.CDLL(None, use_errno=True)
    applied: dict[str, Any] = {}
    die_with_parent(parent_pid)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a crash leaves no core file of the user's weights
    if limits.memory_bytes:
        resource.setrlimit(resource.RLIMIT_DATA, (limits.memory_bytes, limits.memory_bytes))
        applied["memory_bytes"] = limits.memory_bytes
    if limits.cpu_time_s:
        # SIGXCPU at the soft limit; SIGKILL a few seconds later if that is ignored.
        resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_time_s, limits.cpu_time_s + 5))
        applied["cpu_time_s"] = limits.cpu_time_s
    applied["wall_clock_s"] = limits.wall_clock_s
    if limits.nice:
        applied["nice"] = os.nice(limits.nice)  # the measuring processes it starts inherit it
    applied["network"] = _isolate_network(libc) if limits.network == "none" else "host (MODELPRESS_JOB_NETWORK=host)"
    return applied


def _isolate_network(libc) -> str:
    if libc.unshare(CLONE_NEWNET) == 0:
        return "none (a fresh network namespace)"
    first = ctypes.get_errno()
    # Without CAP_SYS_ADMIN: a user namespace of our own, in which we may make the network namespace. Map
    # our uid and gid onto themselves so that files keep their owner.
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) == 0:
        try:
            with open("/proc/self/setgroups", "w") as fh:
                fh.write("deny")
            with open("/proc/self/uid_map", "w") as fh:
                fh.write(f"{uid} {uid} 1")
            with open("/proc/self/gid_map", "w") as fh:
                fh.write(f"{gid} {gid} 1")
        except OSError:
            pass
        return "none (a fresh network namespace, in a user namespace)"
    reason = os.strerror(ctypes.get_errno() or first or errno.EPERM)
    return f"host (the OS refused a network namespace: {reason})"


def looks_out_of_memory(text: str) -> bool:
    return any(marker in text for marker in OUT_OF_MEMORY_MARKERS)


def leave(code: int) -> None:
    """Exit a child (a job's process, a measuring process) without the interpreter's teardown, once its result is
    written and its channel closed: its parent waits for it to end, and unloading ONNX Runtime, OpenVINO and torch
    and collecting every module only delays that (0.74 s per job)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def how_it_ended(returncode: int) -> str:
    """`was killed by SIGSEGV` / `exited with status 3`: a child's end in words."""
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with status {returncode}"


def output_tail(path, lines: int = 5) -> list[str]:
    """The last non-empty lines a child wrote (its error, usually)."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return []
    return [line for line in text.splitlines() if line.strip()][-lines:]
