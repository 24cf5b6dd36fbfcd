"""Hardware energy counters: RAPL for CPU packages, NVML for an NVIDIA GPU. No estimates.

A counter is read before and after each timed block, so the energy a model is
charged is what the whole package (or GPU) drew while that model ran, idle
power and anything else running on it included.
"""
from __future__ import annotations

import ctypes
import re
import time
from pathlib import Path

from workers.measure.rounding import significant

POWERCAP = Path("/sys/class/powercap")
PACKAGE_ZONE = re.compile(r"^intel-rapl:\d+$")  # AMD packages appear under the same name


class RaplCounter:
    """Sum of the package zones' energy_uj counters, unwrapped across their rollover."""

    def __init__(self, zones: list[Path]) -> None:
        self.zones = zones
        self._max = [int((z / "max_energy_range_uj").read_text()) for z in zones]
        self._last = [self._raw(z) for z in zones]
        self._total_uj = 0
        names = ", ".join(z.name for z in zones)
        self.counter = f"RAPL package energy ({names})"
        self.scope = ("whole CPU package(s): every core and process on them, idle power included; "
                      "the counter updates about every millisecond")

    @staticmethod
    def _raw(zone: Path) -> int:
        return int((zone / "energy_uj").read_text())

    def read_joules(self) -> float:
        for index, zone in enumerate(self.zones):
            raw = self._raw(zone)
            delta = raw - self._last[index]
            if delta < 0:  # the counter wrapped
                delta += self._max[index] + 1
            self._total_uj += delta
            self._last[index] = raw
        return self._total_uj / 1e6


class NvmlCounter:
    """nvmlDeviceGetTotalEnergyConsumption (millijoules since the driver loaded), via ctypes."""

    def __init__(self) -> None:
        lib = ctypes.CDLL("libnvidia-ml.so.1")
        if lib.nvmlInit_v2() != 0:
            raise OSError("nvmlInit failed")
        count = ctypes.c_uint()
        if lib.nvmlDeviceGetCount_v2(ctypes.byref(count)) != 0:
            raise OSError("nvmlDeviceGetCount failed")
        if count.value != 1:
            # NVML numbers GPUs by PCI order, CUDA by speed: with several, which one ran is unknown.
            raise OSError(f"NVML sees {count.value} GPUs and cannot tell which one ONNX Runtime's device 0 is")
        handle = ctypes.c_void_p()
        if lib.nvmlDeviceGetHandleByIndex_v2(0, ctypes.byref(handle)) != 0:
            raise OSError("nvmlDeviceGetHandleByIndex failed")
        self._lib, self._handle = lib, handle
        self.read_joules()  # GPUs before Volta have no energy counter
        self.counter = "NVML total energy consumption (GPU 0)"
        self.scope = "the whole GPU board, other processes on it included; host CPU energy not included"

    def read_joules(self) -> float:
        millijoules = ctypes.c_ulonglong()
        status = self._lib.nvmlDeviceGetTotalEnergyConsumption(self._handle, ctypes.byref(millijoules))
        if status != 0:
            raise OSError(f"nvmlDeviceGetTotalEnergyConsumption returned NVML error {status}")
        return millijoules.value / 1000


def rapl_counter(root: Path = POWERCAP) -> tuple[RaplCounter | None, str]:
    zones = sorted(z for z in root.glob("intel-rapl:*") if PACKAGE_ZONE.match(z.name))
    # A "psys" zone covers the whole platform and would count the packages twice.
    zones = [z for z in zones if not _text(z / "name").startswith("psys")]
    if not zones:
        return None, f"no RAPL package zone under {root}"
    try:
        return RaplCounter(zones), ""
    except PermissionError:
        return None, (f"RAPL counters exist under {root} but this process may not read them "
                      "(energy_uj is root-only on current kernels)")
    except (OSError, ValueError) as exc:
        return None, f"RAPL counters under {root} could not be read: {exc}"


def nvml_counter() -> tuple[NvmlCounter | None, str]:
    try:
        return NvmlCounter(), ""
    except (OSError, AttributeError) as exc:
        return None, f"NVML energy counter unavailable: {exc}"


def open_counter(provider: str, *, powercap: Path = POWERCAP):
    """The counter that covers the device the provider runs on, or None and why not."""
    counter: NvmlCounter | RaplCounter | None
    # A GPU target's entry is labelled "TensorRT CUDA (precision)" or "ONNX Runtime CUDA" (workers.measure.targets).
    if provider in ("CUDAExecutionProvider", "TensorrtExecutionProvider") or \
            provider.startswith(("TensorRT CUDA", "ONNX Runtime CUDA")):
        counter, why = nvml_counter()
    else:
        counter, why = rapl_counter(powercap)
    if counter is None:
        return None, f"no RAPL or NVML counter readable on this host ({why})"
    return counter, ""


def _text(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


WINDOW_S = 1.0   # a counter read around at least this long a window: RAPL updates about every ms, NVML's
WINDOWS = 2      # energy every 10-100 ms; two windows per model, in ABBA order like the latency rounds


def measure_windows(counter, calls: dict, *, window_s: float = WINDOW_S, windows: int = WINDOWS,
                    checkpoint=None) -> dict[str, dict[str, float]]:
    """Per model (role), joules, seconds and calls over `windows` windows of back-to-back calls, each at
    least `window_s` long, the counter read before and after each window. The models take turns (ABBA)."""
    totals = {role: {"joules": 0.0, "seconds": 0.0, "calls": 0} for role in calls}
    roles = list(calls)
    for index in range(windows):
        for role in (roles if index % 2 == 0 else roles[::-1]):
            if checkpoint is not None:
                checkpoint()
            call, count = calls[role], 0
            before, started = counter.read_joules(), time.perf_counter()
            while True:
                call()
                count += 1
                elapsed = time.perf_counter() - started
                if elapsed >= window_s:
                    break
            after = counter.read_joules()
            totals[role]["joules"] += after - before
            totals[role]["seconds"] += elapsed
            totals[role]["calls"] += count
    return totals


def energy_entry(batch: int, totals: dict[str, dict[str, float]]) -> dict:
    """One batch size's energy figures from measure_windows' totals."""
    base, res = totals["baseline"], totals["result"]
    per = {role: t["joules"] / t["calls"] if t["calls"] else None for role, t in totals.items()}
    return {
        "batch_size": batch,
        "baseline_j_per_inference": significant(per["baseline"]),
        "result_j_per_inference": significant(per["result"]),
        "ratio": round(per["result"] / per["baseline"], 4) if per["baseline"] and per["result"] is not None else None,
        "baseline_watts": significant(base["joules"] / base["seconds"]) if base["seconds"] else None,
        "result_watts": significant(res["joules"] / res["seconds"]) if res["seconds"] else None,
        "baseline_window_s": significant(base["seconds"], 4), "result_window_s": significant(res["seconds"], 4),
        "baseline_calls": base["calls"], "result_calls": res["calls"],
    }


def energy_report(counter, entries: list[dict], reason: str) -> dict:
    """Measured energy per batch size, or null with the reason no counter was read."""
    if counter is None or not entries:
        return {"value": None, "unit": "J", "reason": reason or "no energy counter was read"}
    first = entries[0]
    return {
        "value": {"batch_size": first["batch_size"], "baseline": first["baseline_j_per_inference"],
                  "result": first["result_j_per_inference"]},
        "unit": "J",
        "per": "inference (one session.run call of a whole batch)",
        "window": f"{WINDOWS} windows per model of at least {WINDOW_S:g} s of back-to-back calls each, the "
                  "models taking turns; the counter is read before and after each window",
        "counter": counter.counter,
        "scope": counter.scope,
        "reason": None,
        "batch_sizes": entries,
    }


def energy_estimate(latency_entries: list[dict], *, tdp_watts: float, threads: int, logical_cores: int) -> dict:
    """What a job asked for with energy_estimate: not a measurement. Joules per inference = TDP x the
    share of the package's cores the session used x the mean latency."""
    share = min(1.0, threads / max(1, logical_cores))
    per_batch = []
    for entry in latency_entries:
        row = {"batch_size": entry["batch_size"]}
        for role in ("baseline", "result"):
            row[f"{role}_j_per_inference"] = significant(tdp_watts * share * entry[role]["mean_ms"] / 1000)
        per_batch.append(row)
    return {
        "estimate": True,
        "formula": f"tdp_watts x threads / logical cores x mean latency = {tdp_watts:g} W x {threads}/"
                   f"{logical_cores} x mean_ms / 1000",
        "caveat": "an estimate from the thermal design power the job gave, not a reading: real draw depends on "
                  "load, frequency and idle power",
        "batch_sizes": per_batch,
    }
