"""Timing: interleaved blocks and per-call wall-clock times (their statistics: workers.measure.stats)."""
from __future__ import annotations

import gc
import itertools
import math
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np

MIN_ROUNDS, MAX_ROUNDS, TARGET_BLOCK = 10, 200, 10
# After its last call, another runtime's worker threads may go on spinning and take a core from the next model's
# block. Measured on opt-mnist (2 cores): an ONNX Runtime call right after a block of OpenVINO calls took 58 us
# instead of 44 us for about 27 calls (1.6 ms, OpenVINO's TBB workers), and the first call 91 us; an OpenVINO call
# after ONNX Runtime (its spinning off) was slowed on its first call only. Interleaved, that charged the
# original on ONNX Runtime for OpenVINO's threads and made OpenVINO look up to 30% faster than it is on a small
# model. A block that follows another runtime's block therefore starts with untimed calls of its own model for
# SETTLE_S: each model is timed as it runs once deployed, alone, not beside another runtime's lingering threads.
SETTLE_S = 0.004


def choose_rounds(iterations: int) -> int:
    """At least 10 rounds so drift is shared, more for long runs so a round stays short."""
    return max(1, min(iterations, max(MIN_ROUNDS, min(MAX_ROUNDS, math.ceil(iterations / TARGET_BLOCK)))))


def split(total: int, parts: int) -> list[int]:
    """`total` as `parts` block sizes that differ by at most one (zeros dropped)."""
    parts = max(1, min(parts, total)) if total else 0
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def round_order(index: int, roles: tuple[str, ...] = ("baseline", "result")) -> tuple[str, ...]:
    """ABBA: the model that goes first swaps every round, so neither always runs on a warmer cache. With three
    models, the rounds cycle through all six orders, so each model goes first, second and last equally often."""
    if len(roles) == 2:
        return roles if index % 2 == 0 else roles[::-1]
    orders = list(itertools.permutations(roles))
    return orders[index % len(orders)]


def time_calls(call: Callable[[], Any], count: int, into: list[int] | None = None) -> None:
    """Call `call` `count` times; append each call's nanoseconds to `into` (None: warm-up, not kept)."""
    clock = time.perf_counter_ns
    collecting = gc.isenabled()
    gc.disable()  # a collection in the middle of a call would be charged to that model
    try:
        for _ in range(count):
            start = clock()
            call()
            if into is not None:
                into.append(clock() - start)
    finally:
        if collecting:
            gc.enable()


def runtime_of(session: Any) -> str:
    """The runtime a session belongs to: onnxruntime, or the workers package that wraps another one (openvino,
    litert, tensorrt)."""
    parts = type(session).__module__.split(".")
    return parts[1] if parts[0] == "workers" and len(parts) > 1 else parts[0]


def settle(call: Callable[[], Any], seconds: float = SETTLE_S) -> int:
    """Untimed calls of `call` for `seconds` (at least one), so the block that follows is timed once the previous
    runtime's threads have gone quiet; returns how many calls it made."""
    clock = time.perf_counter
    until, made = clock() + seconds, 0
    while not made or clock() < until:
        call()
        made += 1
    return made


class Turns:
    """Whose block ran last: `take(role, call)` settles first (settle()) where the previous block ran on another
    runtime than `role`'s."""

    def __init__(self, runtimes: dict[str, str]) -> None:
        self.runtimes: dict[str, str] = runtimes
        self.last: str | None = None
        self.settled = 0  # untimed calls made, for the report

    def take(self, role: str, call: Callable[[], Any]) -> None:
        if self.last is not None and self.runtimes[self.last] != self.runtimes[role]:
            self.settled += settle(call)
        self.last = role


def plain_call(session: Any, feed: dict[str, np.ndarray]) -> Callable[[], Any]:
    """session.run with host arrays: on a GPU provider the copies in and out are part of each call."""
    return partial(session.run, None, feed)


def bound_call(session: Any, feed: dict[str, np.ndarray], device: str = "cuda") -> Callable[[], Any]:
    """A call with inputs copied to the device once and outputs left there (ONNX Runtime's I/O binding),
    synchronised with the device at the end of each call, so the time is the model's, not the copies'. A session of
    another runtime that binds its own inputs (workers.tensorrt.session.TensorRTSession.bind) does it its way."""
    if hasattr(session, "bind"):
        return session.bind(feed)
    if device != "cpu" and session.get_providers()[0] == "CPUExecutionProvider":
        return plain_call(session, feed)  # a GPU target's baseline on the CPU provider: nothing to bind on a device
    import onnxruntime as ort

    binding = session.io_binding()
    values = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), device, 0)
              for array in feed.values()]
    for name, value in zip(feed, values):
        binding.bind_ortvalue_input(name, value)
    for output in session.get_outputs():
        binding.bind_output(output.name, device)
    binding.synchronize_inputs()
    return _BoundCall(session, binding, values)


class _BoundCall:
    """One timed call on an I/O binding; it holds the device buffers (values) as long as it lives."""

    def __init__(self, session: Any, binding: Any, values: list[Any]) -> None:
        self.session, self.binding, self.values = session, binding, values
        self.keep = (binding, values)  # as the function attribute before: the binding reads outputs back

    def __call__(self) -> None:
        self.session.run_with_iobinding(self.binding)
        self.binding.synchronize_outputs()
