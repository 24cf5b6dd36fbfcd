"""What one side-by-side measurement is asked to do (workers.measure.measure_pair), as one object.

The JSON form (to_json / from_json) is what the isolated child receives (workers.measure.isolated): the
progress and stop callbacks and the dataset stay out of it (the child gets its own callbacks, and the dataset
travels as an .npz file beside the request).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any

# Fields that do not travel as JSON: live objects of the calling process.
LIVE = ("on_progress", "should_stop", "dataset")


@dataclass(frozen=True)
class MeasureSpec:
    """batch_sizes: measured per size (sorted, duplicates dropped). iterations: timed calls per model and batch
    size; warmup: untimed calls before them. providers: ONNX Runtime providers (names or short names; CPU
    always). threads: intra-op threads (default: workers.measure.environment.default_threads). dataset: a
    workers.datasets.Dataset both models also run over (accuracy against its labels, fidelity on its inputs),
    its first dataset_max_samples samples. include_io: on a GPU provider, count host-device copies in each
    call. energy_estimate_tdp_watts: where no counter is readable, add an estimate from this TDP, labelled as
    one. input_shapes: app.formats.input_shapes.InputShapes or its to_json() form. on_progress(fraction,
    message) and should_stop() are called at round boundaries."""

    batch_sizes: list[int]
    warmup: int
    iterations: int
    providers: list[str] | None = None
    threads: int | None = None
    seed: int = 0
    dataset: Any = None
    dataset_max_samples: int | None = None
    include_io: bool = False
    energy_estimate_tdp_watts: float | None = None
    input_shapes: Any = None
    # A target runtime ({"runtime": "openvino", "device": "cpu", "precision": "bf16"}): the result (and the
    # original, at f32) run on it, beside the original on ONNX Runtime's CPU provider (workers.measure.targets).
    target: dict[str, Any] | None = None
    # Peak memory, each model in a probe process of its own (0.2 s or more each): off for a goal search's
    # candidates, which are ranked by latency, size, fidelity and energy; the one handed over is measured with it.
    memory: bool = True
    # A goal search's candidate: where the outputs' worst-sample cosine (on the dataset where one is given, else on
    # random inputs) is below this, the candidate cannot be handed over, and its latency is timed in brief
    # (workers.measure.BRIEF_ITERATIONS calls, one session set): an interval as evidence, at a fraction of the cost.
    brief_below: float | None = None
    # At most this many session sets per batch size (workers.measure.SESSION_SETS when None): a goal search's
    # candidates take fewer, since on a target runtime each new set compiles both models again (OpenVINO: about
    # 70% of a candidate's timing on ddddocr-det); fewer sets widen the interval, they never narrow it.
    session_sets: int | None = None
    on_progress: Callable[[float, str], None] | None = field(default=None, compare=False, repr=False)
    should_stop: Callable[[], bool] | None = field(default=None, compare=False, repr=False)

    def checked(self) -> MeasureSpec:
        """The spec with batch sizes sorted and threads resolved; ValueError where a number cannot be measured."""
        from workers.measure.environment import default_threads

        requested = sorted({int(b) for b in self.batch_sizes})
        if not requested or requested[0] < 1:
            raise ValueError(f"batch sizes must be positive integers, got {self.batch_sizes}")
        if self.iterations < 1 or self.warmup < 0:
            raise ValueError(f"need iterations >= 1 and warmup >= 0, got {self.iterations} and {self.warmup}")
        if self.session_sets is not None and self.session_sets < 2:
            raise ValueError(f"need session_sets >= 2 (the interval is drawn over sets), got {self.session_sets}")
        threads = int(self.threads) if self.threads else default_threads()
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        return replace(self, batch_sizes=requested, threads=threads)

    def to_json(self) -> dict[str, Any]:
        """Everything but the live objects (callbacks, dataset), JSON-ready."""
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in LIVE}
        if data["input_shapes"] is not None:
            from app.formats.input_shapes import InputShapes

            data["input_shapes"] = InputShapes.coerce(data["input_shapes"]).to_json()
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any], **live: Any) -> MeasureSpec:
        """The spec to_json() wrote, with this process's live objects (on_progress, should_stop, dataset)."""
        unknown = set(live) - set(LIVE)
        if unknown:
            raise TypeError(f"only {', '.join(LIVE)} are given beside the JSON form, not {sorted(unknown)}")
        return cls(**data, **live)
