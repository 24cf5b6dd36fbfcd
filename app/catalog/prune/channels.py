"""prune.channels: structured pruning of whole channels, giving a genuinely smaller dense model.

Its params and spec, as the API validates, lists and publishes them; the implementation: workers/prune/channels.py.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from app.catalog.base import MethodSpec
from app.catalog.prune.common import FineTuneParams, LayerName


class PruneChannelsParams(FineTuneParams):
    importance: Literal["l1", "l2", "taylor", "bn_scale"] = Field(
        "l2",
        description="How channels are ranked, least important removed first: l1/l2 norm of their weights; taylor: "
        "|weight x gradient| of the loss on the training data (needs train_dataset_id); bn_scale: |gamma| of the "
        "batch norm after them (network slimming; layers without a batch norm after them are not ranked and stay "
        "whole).",
    )
    ratio: float | None = Field(
        None, gt=0, lt=1,
        description="Fraction of the channels removed from every prunable layer (uniform). Give exactly one of "
        "ratio, target_params_ratio, target_macs_ratio.",
    )
    target_params_ratio: float | None = Field(
        None, gt=0, lt=1,
        description="Prune with the uniform ratio, found by bisection, at which the model keeps this fraction of "
        "its parameters, within 3%.",
    )
    target_macs_ratio: float | None = Field(
        None, gt=0, lt=1,
        description="Prune with the uniform ratio, found by bisection, at which the model needs this fraction of its "
        "multiply-accumulates at the example input shape, within 3%.",
    )
    ignored_layers: list[LayerName] = Field(
        default_factory=list, max_length=10_000,
        description="Layers kept whole, by ONNX node name (or by module name as listed in the report).",
    )
    keep_head: bool = Field(
        True,
        description="Keep whole every layer whose output reaches a model output without another Conv/Linear in "
        "between: a classifier's last Linear, a detector's prediction convs. Their channel counts are the "
        "model's interface.",
    )
    # bench/prune.py on a 2-core EPYC, ONNX Runtime 1.32, a digits CNN (64/128/256 channels) at batch 64: pruned
    # 30% to 45/90/179 channels it ran 0.90x the original's speed (slower, at half the MACs); rounded to multiples
    # of 8 it ran 1.74x faster. x86 convolution kernels work in blocks of 8 or 16 channels.
    round_to: int | None = Field(
        8, ge=1, le=1024,
        description="Keep channel counts multiples of this (rounded down). Odd counts make CPU and GPU kernels "
        "slower: in our benchmark a CNN pruned 30% to odd channel counts ran slower than the unpruned original in "
        "ONNX Runtime, and 1.74x faster with counts rounded to multiples of 8. 1 or null keeps the exact counts.",
    )
    iterative_steps: int = Field(
        1, ge=1, le=100,
        description="Reach the target in this many pruning rounds, ranking channels again after each (one-shot: 1).",
    )

    @model_validator(mode="after")
    def _one_target(self) -> PruneChannelsParams:
        given = [n for n in ("ratio", "target_params_ratio", "target_macs_ratio") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of ratio, target_params_ratio, target_macs_ratio"
                             + (f" (got {', '.join(given)})" if given else ""))
        if self.importance == "taylor" and self.train_dataset_id is None:
            raise ValueError("importance 'taylor' ranks channels by the loss gradient on data: set train_dataset_id")
        return self


SPEC = MethodSpec(
    id="prune.channels",
    version=1,
    description="Structured channel pruning with Torch-Pruning's dependency graph (importance l1, l2, taylor or "
    "bn_scale; a ratio or a params/MACs target), then optional fine-tuning on your data: a smaller dense model "
    "that runs faster everywhere.",
    params_model=PruneChannelsParams,
    dataset_params=("train_dataset_id", "eval_dataset_id"),
)
