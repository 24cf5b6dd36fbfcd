"""quantize.auto: try the quantization schemes, keep the fastest result within an accuracy budget.

Its params and spec, as the API validates, lists and publishes them; the implementation: workers/quantize/auto.py.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from app.catalog.base import MethodParams, MethodSpec

Scheme = Literal["int8_dynamic", "int8_static", "int4_weight_only", "fp16"]

ALL_SCHEMES: tuple[Scheme, ...] = ("int8_dynamic", "int8_static", "int4_weight_only", "fp16")

class AutoParams(MethodParams):
    eval_dataset_id: str = Field(
        description="Dataset to judge candidates on: accuracy when it has labels, fidelity to the original always."
    )
    calibration_dataset_id: str | None = Field(
        None,
        description="Dataset for static int8 calibration. Without one, static int8 calibrates on the eval "
        "dataset's samples and the report says so (its accuracy is then optimistic).",
    )
    max_accuracy_drop: float | None = Field(
        None, ge=0, le=100, description="Largest top-1 accuracy drop allowed, in points (needs labels)."
    )
    min_cosine: float | None = Field(
        None, ge=-1, le=1, description="Smallest mean cosine similarity to the original's outputs allowed."
    )
    schemes: list[Scheme] = Field(default=list(ALL_SCHEMES), min_length=1, description="Schemes to try.")
    objective: Literal["latency", "size"] = Field(
        "latency", description="What 'best' means among the candidates within budget: fastest (and at least "
        "1.05x faster than the original, beyond measurement noise), or smallest."
    )
    eval_max_samples: int = Field(512, ge=8, le=100_000, description="Judge on at most this many eval samples.")
    latency_batch_size: int = Field(1, ge=1, le=1024, description="Batch size at which candidates are timed.")
    latency_iterations: int = Field(60, ge=5, le=10_000, description="Timed runs per model per candidate.")
    max_excluded_layers: int = Field(
        16, ge=0, le=256, description="Most layers left in float when searching for an int8 candidate in budget."
    )

    @model_validator(mode="after")
    def _a_budget(self) -> AutoParams:
        if self.max_accuracy_drop is None and self.min_cosine is None:
            raise ValueError("give a budget: max_accuracy_drop (points of top-1 accuracy) and/or min_cosine")
        self.schemes = list(dict.fromkeys(self.schemes))
        return self


SPEC = MethodSpec(
    id="quantize.auto",
    version=1,
    description="Tries int8 dynamic, int8 static, int4 weight-only and fp16 (and int8 with the most sensitive layers left in "
        "float), measures each against the original on your eval dataset and hardware, and keeps the fastest "
        "(or smallest) within your accuracy budget. Every candidate's figures are in the report.",
    params_model=AutoParams,
    dataset_params=("eval_dataset_id", "calibration_dataset_id"),
)
