"""prune.magnitude: unstructured magnitude pruning: the smallest weights become zeros.

Its params and spec, as the API validates, lists and publishes them; the implementation: workers/prune/magnitude.py.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from app.catalog.base import MethodSpec
from app.catalog.prune.common import FineTuneParams, LayerName


class PruneMagnitudeParams(FineTuneParams):
    sparsity: float = Field(
        ..., gt=0, lt=1,
        description="Fraction of the weights of Conv and Linear layers set to zero (biases and norms are kept).",
    )
    scope: Literal["global", "layer"] = Field(
        "global",
        description="global: one magnitude threshold over all layers (layers with many small weights lose more); "
        "layer: every layer pruned to the same sparsity.",
    )
    schedule: Literal["oneshot", "gradual"] = Field(
        "oneshot",
        description="oneshot: prune to the target, then fine-tune with the zeros held; gradual: raise sparsity from "
        "initial_sparsity to the target over the fine-tuning steps along a polynomial decay (as TensorFlow Model "
        "Optimization's PolynomialDecay, power 3), which usually keeps more accuracy at high sparsity. Gradual "
        "needs train_dataset_id.",
    )
    initial_sparsity: float = Field(0.0, ge=0, lt=1, description="Sparsity at the start of a gradual schedule.")
    ignored_layers: list[LayerName] = Field(
        default_factory=list, max_length=10_000,
        description="Layers left dense, by ONNX node name (or module name as listed in the report).",
    )

    @model_validator(mode="after")
    def _consistent(self) -> PruneMagnitudeParams:
        if self.schedule == "gradual":
            if self.train_dataset_id is None:
                raise ValueError("schedule 'gradual' raises sparsity over fine-tuning steps: set train_dataset_id")
            if self.initial_sparsity >= self.sparsity:
                raise ValueError("initial_sparsity must be below sparsity")
        return self


SPEC = MethodSpec(
    id="prune.magnitude",
    version=1,
    description="Unstructured magnitude pruning to a sparsity (global or per layer, one-shot or gradual), then "
    "optional fine-tuning: smaller once compressed (zstd/gzip), not faster on dense runtimes.",
    params_model=PruneMagnitudeParams,
    dataset_params=("train_dataset_id", "eval_dataset_id"),
)
