"""distill.kd: knowledge distillation of the job's model (the teacher) into a smaller student.

Its params and spec, as the API validates, lists and publishes them; the implementation: workers/distill/kd.py.
"""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, StringConstraints, model_validator

from app.catalog.base import MethodSpec
from app.catalog.prune.common import DatasetId, FineTuneParams

ModelId = Annotated[str, StringConstraints(min_length=1, max_length=200)]

class DistillParams(FineTuneParams):
    train_dataset_id: DatasetId = Field(
        ...,
        description="Dataset the student learns on: arrays named after the model's inputs, first axis = samples. "
        "The teacher's outputs on it are the soft targets; a `labels` array adds cross-entropy on the first output.",
    )
    eval_dataset_id: DatasetId | None = Field(
        None,
        description="Held-out dataset for early stopping, for choosing the best epoch and for the report (top-1 "
        "accuracy with labels, cosine to the teacher without). Defaults to the training data.",
    )
    student: Literal["width", "depth", "model"] = Field(
        "width",
        description="width: the teacher with `width_ratio` of every prunable layer's channels removed; depth: the "
        "teacher keeping every `keep_every`-th of its repeated blocks (transformer layers, residual blocks); "
        "model: the uploaded model `student_model_id`, which must take the teacher's inputs and give outputs of "
        "the same shapes.",
    )
    student_model_id: ModelId | None = Field(None, description="The uploaded student model (student 'model' only).")
    width_ratio: float = Field(
        0.5, gt=0, lt=1, description="Fraction of the channels removed from every prunable layer (student 'width').",
    )
    round_to: int | None = Field(
        8, ge=1, le=1024,
        description="Keep the width student's channel counts multiples of this (CPU and GPU kernels run odd counts "
        "slowly); 1 or null keeps the exact counts.",
    )
    keep_every: int = Field(
        2, ge=2, le=100,
        description="Depth student: keep blocks 0, k, 2k, ... of the teacher's repeated blocks, with their weights.",
    )
    temperature: float = Field(4.0, gt=0, le=100, description="Softmax temperature of the soft targets.")
    alpha: float = Field(
        0.5, ge=0, le=1,
        description="Weight of the soft-target loss; 1 - alpha weighs cross-entropy on the labels when there are "
        "any (without labels the soft-target loss is the whole loss); labels need the first output to be class "
        "scores [batch, classes].",
    )
    output_loss: Literal["auto", "kl", "mse", "cosine"] = Field(
        "auto",
        description="How each output is matched to the teacher's: kl (softened class scores), mse or cosine (for "
        "embeddings, regressions, detection maps); auto takes kl for 2-D [batch, classes] outputs, mse otherwise.",
    )

    hint_weight: float = Field(
        0.0, ge=0, le=100,
        description="Depth student only: weight of a hint loss that aligns each kept block's output with the "
        "teacher's output at the end of the blocks it stands in for (1 - cosine, as DistilBERT aligns hidden "
        "states); 0 turns it off. Needs the teacher converted to PyTorch.",
    )

    @model_validator(mode="after")
    def _student_source(self) -> DistillParams:
        if self.hint_weight and self.student != "depth":
            raise ValueError("hint_weight matches block outputs of a depth student: set student 'depth'")
        if self.student == "model" and self.student_model_id is None:
            raise ValueError("student 'model' distils into an uploaded model: set student_model_id")
        if self.student != "model" and self.student_model_id is not None:
            raise ValueError(f"student_model_id is used with student 'model' only (student is {self.student!r})")
        return self


SPEC = MethodSpec(
    id="distill.kd",
    version=1,
    description="Knowledge distillation: train a smaller student (the model with fewer channels, fewer repeated "
    "layers, or your own uploaded model) to reproduce this model's outputs on your data, with soft targets at a "
    "temperature plus the labels when there are any.",
    params_model=DistillParams,
    dataset_params=("train_dataset_id", "eval_dataset_id"),
    model_params=("student_model_id",),
)
