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
