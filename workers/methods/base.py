"""What a compression method is to the worker: its catalog spec (app.catalog) plus one function.

A method reads its input model, writes a new model inside `out_dir` and returns
where it put it, with JSON-able details for the job report. It never changes
its input. StepContext is what a step may use besides its input; StepOutput what it returns.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.catalog.base import MethodParams, MethodSpec
from app.formats.input_shapes import InputShapes


@dataclass
class StepContext:
    """What a step may use besides its input model and params.

    `datasets` maps each of the method's `dataset_params` that the step sets to its dataset,
    loaded by the pipeline (a workers.datasets.Dataset: input arrays keyed by the model's input
    names, first axis = samples); `calibration` is the one `calibration_dataset_id` names, or
    None. `seed` makes random choices repeatable. `progress(fraction, message)` reports
    progress within the step (0..1). `should_stop()` says whether the job was cancelled, for long
    loops (fine-tuning) to end early; the pipeline then cancels the job at the step boundary.
    """

    calibration: Any = None
    datasets: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    progress: Callable[..., None] | None = None  # (fraction, message[, milestone])
    cancelled: Callable[[], bool] | None = None
    # Each of the method's `model_params` that the step sets -> that uploaded model, unpacked (an ONNX path).
    models: dict[str, Path] = field(default_factory=dict)
    # The job's input shapes (evaluate.input_shapes, then its datasets' sample shapes): pass them to
    # plan_inputs(..., shapes=ctx.input_shapes) wherever the step generates inputs.
    input_shapes: InputShapes = field(default_factory=InputShapes)

    def report(self, fraction: float, message: str, *, milestone: bool = False) -> None:
        """Progress within the step; a milestone (an epoch's figures) is always recorded as an event,
        other reports may be dropped by the pipeline's throttle."""
        if self.progress is None:
            return
        fraction = min(max(fraction, 0.0), 1.0)
        if milestone:
            self.progress(fraction, message, True)
        else:
            self.progress(fraction, message)

    def should_stop(self) -> bool:
        return self.cancelled is not None and self.cancelled()


@dataclass
class StepOutput:
    model_path: Path
    details: dict[str, Any]
    # Other files a user downloads with the model, by suffix appended to the model's artifact name
    # (".zst": the model zstd-packed, as model.onnx.zst).
    packed: dict[str, Path] = field(default_factory=dict)


@dataclass(frozen=True)
class Method:
    id: str
    version: int
    description: str
    params_model: type[MethodParams]
    # run(input_onnx_path, params, out_dir, ctx) -> StepOutput; the output model lies inside out_dir.
    run: Callable[[Path, MethodParams, Path, StepContext], StepOutput]
    # Dataset roles a step's params may name, as param field names (e.g. "calibration_dataset_id").
    # The API checks each named dataset against the model before queueing; the pipeline loads it.
    dataset_params: tuple[str, ...] = ()
    # Params that name another uploaded model of the tenant (e.g. "student_model_id"): the API checks the
    # caller owns it and links it to the job; the pipeline unpacks it into StepContext.models.
    model_params: tuple[str, ...] = ()

    @classmethod
    def implementing(cls, spec: MethodSpec, run: Callable[[Path, MethodParams, Path, StepContext], StepOutput]) -> Method:
        return cls(id=spec.id, version=spec.version, description=spec.description, params_model=spec.params_model,
                   run=run, dataset_params=spec.dataset_params, model_params=spec.model_params)
