"""The machine a measurement ran on, read from the host rather than assumed."""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Any


def _read(path: str | Path) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def cpu_model() -> str:
    text = _read("/proc/cpuinfo") or ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        # x86 says "model name"; some ARM kernels say "Processor" or only "CPU part".
        if key.strip() in ("model name", "Processor", "cpu model") and value.strip():
            return value.strip()
    return platform.processor() or platform.machine() or "unknown"


def logical_cores() -> int:
    return os.cpu_count() or 1


def usable_cores() -> int:
    """CPUs this process may run on (a container or taskset can allow fewer than the host has)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return logical_cores()


def physical_cores() -> int:
    """Distinct (package, core) pairs; hyper-threads share one."""
    cores: set[tuple[str, str]] = set()
    for topology in Path("/sys/devices/system/cpu").glob("cpu[0-9]*/topology"):
        package, core = _read(topology / "physical_package_id"), _read(topology / "core_id")
        if package is not None and core is not None:
            cores.add((package.strip(), core.strip()))
    if cores:
        return len(cores)
    package = core = None
    for line in (_read("/proc/cpuinfo") or "").splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "physical id":
            package = value.strip()
        elif key.strip() == "core id":
            core = value.strip()
            cores.add((package or "0", core))
    return len(cores) or logical_cores()


def pick_cores(count: int) -> list[int]:
    """`count` logical CPUs this process may use, one per physical core first (hyper-thread siblings only
    when there are not enough cores), for pinning a measurement."""
    try:
        allowed = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return []
    first, siblings, seen = [], [], set()
    for cpu in allowed:
        base = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        key = (_read(base / "physical_package_id"), _read(base / "core_id"))
        if None in key or key not in seen:
            first.append(cpu)
            seen.add(key)
        else:
            siblings.append(cpu)
    return (first + siblings)[:max(1, count)]


def default_threads() -> int:
    """One intra-op thread per physical core this process may use."""
    return max(1, min(physical_cores(), usable_cores()))


def memory_bytes() -> int | None:
    for line in (_read("/proc/meminfo") or "").splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def gpu_names() -> list[str]:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return []
    try:
        out = subprocess.run([smi, "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def gpu_driver() -> str | None:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.splitlines()[0].strip() if out.strip() else None


def package_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def describe(*, provider: str, threads: int) -> dict[str, Any]:
    import numpy
    import onnx
    import onnxruntime

    available = onnxruntime.get_available_providers()
    names = gpu_names()
    gpu: str | None = ", ".join(names) if names else None
    if gpu is None and "CUDAExecutionProvider" in available and provider != "CPUExecutionProvider":
        gpu = "a CUDA device (nvidia-smi is absent, so its name is unknown)"
    return {
        "cpu": cpu_model(),
        "physical_cores": physical_cores(),
        "logical_cores": logical_cores(),
        "usable_cores": usable_cores(),
        "memory_bytes": memory_bytes(),
        "gpu": gpu,
        "gpu_driver": gpu_driver() if names else None,
        "os": platform.platform(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "torch": package_version("torch"),
        "versions": {"onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__, "numpy": numpy.__version__,
                     "onnxruntime_package": "onnxruntime-gpu" if package_version("onnxruntime-gpu") else "onnxruntime"},
        "providers": available,
        "provider": provider,
        "threads": threads,
        "pinned_cores": None,
        "process": {"isolated": False, "how": "measured inside the calling process"},
    }
