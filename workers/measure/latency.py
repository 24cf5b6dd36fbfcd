"""Timing: interleaved blocks, per-call wall-clock times, and their statistics."""
from __future__ import annotations

import gc
import math
import time
from typing import Any

import numpy as np

from workers.measure.rounding import significant

MIN_ROUNDS, MAX_ROUNDS, TARGET_BLOCK = 10, 200, 25


def choose_rounds(iterations: int) -> int:
    """At least 10 rounds so drift is shared, more for long runs so a round stays short."""
    return max(1, min(iterations, max(MIN_ROUNDS, min(MAX_ROUNDS, math.ceil(iterations / TARGET_BLOCK)))))


def split(total: int, parts: int) -> list[int]:
    """`total` as `parts` block sizes that differ by at most one (zeros dropped)."""
    parts = max(1, min(parts, total)) if total else 0
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def round_order(index: int) -> tuple[str, str]:
    """ABBA: the model that goes first swaps every round, so neither always runs on a warmer cache."""
    return ("baseline", "result") if index % 2 == 0 else ("result", "baseline")


def time_runs(session: Any, feed: dict[str, np.ndarray], count: int, into: list[int] | None = None) -> None:
    """Run `count` times; append each call's nanoseconds to `into` (None: warm-up, not kept)."""
    run = session.run
    clock = time.perf_counter_ns
    collecting = gc.isenabled()
    gc.disable()  # a collection in the middle of a call would be charged to that model
    try:
        for _ in range(count):
            start = clock()
            run(None, feed)
            if into is not None:
                into.append(clock() - start)
    finally:
        if collecting:
            gc.enable()


def summarize(durations_ns: list[int], batch_size: int) -> dict[str, Any]:
    """Statistics of per-call times. Throughput is batch_size / mean latency: one caller, calls back to back."""
    ms = np.asarray(durations_ns, dtype=np.float64) / 1e6
    mean = float(ms.mean())
    p50, p90, p99 = (float(v) for v in np.percentile(ms, [50, 90, 99]))
    return {
        "count": int(ms.size),
        "mean_ms": significant(mean),
        "stdev_ms": significant(float(ms.std(ddof=1))) if ms.size > 1 else 0.0,
        "min_ms": significant(float(ms.min())),
        "p50_ms": significant(p50),
        "p90_ms": significant(p90),
        "p99_ms": significant(p99),
        "max_ms": significant(float(ms.max())),
        "throughput_per_s": significant(batch_size * 1000.0 / mean) if mean > 0 else None,
    }
