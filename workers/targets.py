"""What this worker can serve: the hardware and runtimes it finds (`probe`), the targets they make servable
(`servable_targets`), and those MODELPRESS_WORKER_TARGETS lets it take (`select_targets`).

A target is {runtime, device, precision, queue}: jobs for it are sent to its queue (app.targets.schemas.queue_for),
which only workers that serve it consume. `python -m workers.targets` prints the probe and the servable targets as
JSON; the worker runs it in a process of its own when it starts (`probe_isolated`), so that OpenVINO's runtime (its
threads, its device plugins) and NNCF never load into the process that forks Celery's pool.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from app.targets.schemas import queue_for

log = logging.getLogger("modelpress.worker")

# The ISA extensions that decide which precisions run fast on a CPU: AVX2 / AVX-512 (f32), VNNI (int8),
# AVX512-BF16 and AMX (bf16 and int8 matrix units).
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")
PROBE_TIMEOUT_S = 120


def cpu_info(cpuinfo: str | None = None) -> dict[str, Any]:
    """The CPU's model name, logical cores and the ISA_FLAGS it has (from /proc/cpuinfo, or `cpuinfo`'s text)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:  # not Linux
            cpuinfo = ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() not in fields:
            fields[key.strip()] = value.strip()
    flags = set(fields.get("flags", "").split())
    return {"name": fields.get("model name") or platform.processor() or platform.machine(),
            "logical_cores": os.cpu_count(), "isa": [flag for flag in ISA_FLAGS if flag in flags]}


def memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None


def gpus() -> list[dict[str, Any]]:
    """NVIDIA GPUs as nvidia-smi names them, with their memory; [] without nvidia-smi (no torch import)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        done = subprocess.run([exe, "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=20, check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("nvidia-smi is installed but did not answer (%s); no GPU is registered", exc)
        return []
    found = []
    for line in done.stdout.splitlines():
        name, _, memory = line.rpartition(",")
        if not name.strip():
            continue
        try:
            size: int | None = int(float(memory.strip()) * 1024**2)  # MiB
        except ValueError:
            size = None
        found.append({"name": name.strip(), "memory_bytes": size})
    return found


def _onnxruntime() -> dict[str, Any]:
    import onnxruntime

    return {"version": onnxruntime.__version__, "providers": list(onnxruntime.get_available_providers())}


def _openvino() -> dict[str, Any]:
    from importlib.metadata import version

    import openvino

    core = openvino.Core()
    devices = {device: {"name": str(core.get_property(device, "FULL_DEVICE_NAME")),
                        "capabilities": [str(c) for c in core.get_property(device, "OPTIMIZATION_CAPABILITIES")]}
               for device in core.available_devices}
    return {"version": version("openvino"), "build": openvino.get_version(), "devices": devices}


def _nncf() -> dict[str, Any]:
    import nncf

    return {"version": nncf.__version__}


def _tensorrt() -> dict[str, Any]:
    """TensorRT's version, and the CUDA device it would build for (through torch, which stages its buffers): an
    import that works on a machine without a usable GPU is no TensorRT target."""
    import tensorrt
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError(f"tensorrt {tensorrt.__version__} imports, but torch {torch.__version__} sees no CUDA "
                           "device (a CPU build of torch, or no driver)")
    props = torch.cuda.get_device_properties(0)
    return {"version": str(tensorrt.__version__), "cuda_device": str(props.name),
            "compute_capability": f"{props.major}.{props.minor}"}


def _litert() -> dict[str, Any]:
    """LiteRT's CPU interpreter (ai-edge-litert) and what exports to it: onnx2tf and TensorFlow, found without being
    imported (TensorFlow takes seconds to import, and the export runs in a process of its own anyway)."""
    from importlib.metadata import version
    from importlib.util import find_spec

    from ai_edge_litert.interpreter import Interpreter  # noqa: F401 - the runtime itself must load

    missing = [name for name in ("onnx2tf", "tensorflow", "tf_keras", "onnx_graphsurgeon") if find_spec(name) is None]
    if missing:
        raise RuntimeError(f"ai-edge-litert {version('ai-edge-litert')} loads, but the export to it needs "
                           f"{', '.join(missing)}, which is not installed")
    return {"version": version("ai-edge-litert"), "onnx2tf": version("onnx2tf"),
            "tensorflow": version("tensorflow-cpu") if find_spec("tensorflow") else None}


def probe() -> dict[str, Any]:
    """This machine as a worker sees it: host, CPU, memory, GPUs, and the runtimes and tools that import here (with
    the reason for each that does not, under `unavailable`)."""
    runtimes: dict[str, Any] = {}
    unavailable: dict[str, str] = {}
    for name, look in (("onnxruntime", _onnxruntime), ("openvino", _openvino), ("nncf", _nncf),
                       ("tensorrt", _tensorrt), ("litert", _litert)):
        try:
            runtimes[name] = look()
        except Exception as exc:  # not installed, or a plugin that fails to load: this worker cannot serve it
            unavailable[name] = f"{type(exc).__name__}: {exc}"[:500]
    return {"host": socket.gethostname(), "cpu": cpu_info(), "memory_bytes": memory_bytes(), "gpus": gpus(),
            "runtimes": runtimes, "unavailable": unavailable}


def probe_isolated(timeout_s: float = PROBE_TIMEOUT_S) -> dict[str, Any]:
    """`probe()` run in a fresh process (see the module's docstring). Where that fails, what this process can say
    without loading any runtime: the CPU, memory and GPUs, and ONNX Runtime only."""
    try:
        done = subprocess.run([sys.executable, "-m", "workers.targets"], capture_output=True, text=True,
                              timeout=timeout_s, check=True)
        # The last line: a library may log to stdout while it imports.
        return json.loads(done.stdout.strip().splitlines()[-1])["probe"]
    except (OSError, subprocess.SubprocessError, ValueError, KeyError, IndexError) as exc:
        stderr = getattr(exc, "stderr", None) or ""
        log.error("probing the runtimes failed (%s) %s; this worker serves ONNX Runtime on the CPU only", exc,
                  stderr[-2000:])
        runtimes: dict[str, Any] = {}
        unavailable = {"probe": f"{type(exc).__name__}: {exc}"[:500]}
        try:
            runtimes["onnxruntime"] = _onnxruntime()
        except Exception as ort_exc:  # the worker cannot run jobs at all then; the jobs will say why
            unavailable["onnxruntime"] = str(ort_exc)[:500]
        return {"host": socket.gethostname(), "cpu": cpu_info(), "memory_bytes": memory_bytes(), "gpus": gpus(),
                "runtimes": runtimes, "unavailable": unavailable}


def target(runtime: str, device: str, precision: str | None) -> dict[str, Any]:
    return {"runtime": runtime, "device": device, "precision": precision,
            "queue": queue_for(runtime, device, precision)}


def target_key(t: dict[str, Any]) -> str:
    """runtime.device.precision (runtime.device where the steps decide the precision): what patterns match."""
    return ".".join(part for part in (t["runtime"], t["device"], t.get("precision")) if part)


def servable_targets(found: dict[str, Any]) -> list[dict[str, Any]]:
    """The targets a probe's machine can serve: ONNX Runtime on the CPU always, on CUDA with its CUDA provider and
    a GPU nvidia-smi lists; OpenVINO on the CPU at f32, at bf16 only where the CPU plugin lists BF16 among its
    optimization capabilities, and at int8 where NNCF imports (int8_bf16, with bf16 for the layers that stay float,
    where both hold); TensorRT on CUDA at f32, f16 and int8 where it imports, torch sees a CUDA device and
    nvidia-smi lists a GPU; LiteRT on the CPU at f32, f16 and int8 where its interpreter loads and onnx2tf and
    TensorFlow are installed. `unservable_gpu_targets` says why a GPU target is missing."""
    runtimes = found.get("runtimes") or {}
    servable = [target("onnxruntime", "cpu", None)]
    gpu_reasons = unservable_gpu_targets(found)
    if "onnxruntime.cuda" not in gpu_reasons:
        servable.append(target("onnxruntime", "cuda", None))
    ov_cpu = ((runtimes.get("openvino") or {}).get("devices") or {}).get("CPU")
    if ov_cpu is not None:
        servable.append(target("openvino", "cpu", "f32"))
        if "BF16" in (ov_cpu.get("capabilities") or []):
            servable.append(target("openvino", "cpu", "bf16"))
        if runtimes.get("nncf"):
            servable.append(target("openvino", "cpu", "int8"))
            if "BF16" in (ov_cpu.get("capabilities") or []):
                servable.append(target("openvino", "cpu", "int8_bf16"))
    if "tensorrt.cuda" not in gpu_reasons:
        servable += [target("tensorrt", "cuda", precision) for precision in ("f32", "f16", "int8")]
    if runtimes.get("litert"):
        servable += [target("litert", "cpu", precision) for precision in ("f32", "f16", "int8")]
    return servable


def unservable_gpu_targets(found: dict[str, Any]) -> dict[str, str]:
    """Why the probe's machine cannot serve each GPU target ({} where it serves both): onnxruntime.cuda needs
    onnxruntime-gpu's CUDAExecutionProvider and a GPU nvidia-smi lists; tensorrt.cuda needs `import tensorrt`, a
    CUDA device torch sees, and that GPU."""
    runtimes, unavailable = found.get("runtimes") or {}, found.get("unavailable") or {}
    reasons: dict[str, str] = {}
    no_gpu = None if found.get("gpus") else "nvidia-smi lists no NVIDIA GPU on this machine"
    providers = (runtimes.get("onnxruntime") or {}).get("providers", [])
    if "CUDAExecutionProvider" not in providers:
        reasons["onnxruntime.cuda"] = (f"this onnxruntime offers {', '.join(providers) or 'no provider'}, not "
                                       "CUDAExecutionProvider (install onnxruntime-gpu with CUDA and cuDNN)")
    elif no_gpu:
        reasons["onnxruntime.cuda"] = no_gpu
    if not runtimes.get("tensorrt"):
        reasons["tensorrt.cuda"] = "TensorRT is unusable here: " + unavailable.get("tensorrt", "it was not probed")
    elif no_gpu:
        reasons["tensorrt.cuda"] = no_gpu
    return reasons


def select_targets(servable: list[dict[str, Any]], patterns: str) -> tuple[list[dict[str, Any]], list[str]]:
    """(the targets `patterns` selects, the patterns that select nothing servable). `patterns`: "auto" (all), or
    comma-separated prefixes of runtime.device.precision, matched at a dot: `openvino.cpu` selects
    openvino.cpu.f32 and openvino.cpu.bf16, not openvino.cpux."""
    wanted = [p.strip().lower() for p in patterns.split(",") if p.strip()]
    if not wanted or "auto" in wanted:
        return list(servable), []

    def matches(t: dict[str, Any], pattern: str) -> bool:
        key = target_key(t)
        return key == pattern or key.startswith(pattern + ".")

    unmatched = [p for p in wanted if not any(matches(t, p) for t in servable)]
    return [t for t in servable if any(matches(t, p) for p in wanted)], unmatched


def worker_targets(found: dict[str, Any], patterns: str, consumed: Iterable[str]) -> list[dict[str, Any]]:
    """What a worker serves: the targets `patterns` selects, and every servable target whose queue it consumes
    anyway (a worker started with `-Q cpu` serves ONNX Runtime on the CPU whatever the patterns say). Patterns that
    select nothing are logged and dropped."""
    servable = servable_targets(found)
    selected, unmatched = select_targets(servable, patterns)
    if unmatched:
        log.warning("MODELPRESS_WORKER_TARGETS: %s select(s) no target this worker can serve (it can serve: %s); "
                    "dropped", ", ".join(unmatched), ", ".join(target_key(t) for t in servable))
    consumed = set(consumed)
    return selected + [t for t in servable if t not in selected and t["queue"] in consumed]


if __name__ == "__main__":
    found = probe()
    print(json.dumps({"probe": found, "servable": servable_targets(found),
                      "not_servable": unservable_gpu_targets(found)}))
