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
    if provider in ("CUDAExecutionProvider", "TensorrtExecutionProvider"):
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


class EnergyMeter:
    """Charges each timed block's energy to the model that ran it; gives up (with a reason) if a read fails."""

    def __init__(self, counter, reason: str) -> None:
        self.counter, self.reason = counter, reason
        self.joules: dict[int, dict[str, float]] = {}
        self.seconds: dict[int, dict[str, float]] = {}

    def timed(self, batch: int, role: str, block) -> None:
        before, started = self._read(), time.perf_counter()
        block()
        elapsed, after = time.perf_counter() - started, self._read()
        if before is not None and after is not None:
            self.joules.setdefault(batch, {"baseline": 0.0, "result": 0.0})[role] += after - before
            self.seconds.setdefault(batch, {"baseline": 0.0, "result": 0.0})[role] += elapsed

    def _read(self) -> float | None:
        if self.counter is None:
            return None
        try:
            return self.counter.read_joules()
        except (OSError, ValueError) as exc:
            self.counter, self.joules = None, {}
            self.reason = f"the energy counter stopped being readable during the run: {exc}"
            return None

    def report(self, iterations: int) -> dict:
        if self.counter is None or not self.joules:
            return {"value": None, "unit": "J", "reason": self.reason or "no energy counter was read"}
        per_batch = []
        for batch, energy in self.joules.items():
            base, res = energy["baseline"] / iterations, energy["result"] / iterations
            seconds = self.seconds[batch]
            per_batch.append({
                "batch_size": batch,
                "baseline_j_per_inference": significant(base),
                "result_j_per_inference": significant(res),
                "ratio": round(res / base, 4) if base > 0 else None,
                # Over how long the counter was read: below ~0.1 s its update interval dominates.
                "baseline_timed_s": significant(seconds["baseline"], 4),
                "result_timed_s": significant(seconds["result"], 4),
            })
        first = per_batch[0]
        return {
            "value": {"batch_size": first["batch_size"], "baseline": first["baseline_j_per_inference"],
                      "result": first["result_j_per_inference"]},
            "unit": "J",
            "per": "inference (one session.run call of a whole batch), averaged over the timed calls",
            "counter": self.counter.counter,
            "scope": self.counter.scope,
            "reason": None,
            "batch_sizes": per_batch,
        }
