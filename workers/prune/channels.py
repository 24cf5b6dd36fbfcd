"""prune.channels: structured pruning of whole channels, giving a genuinely smaller dense model.

Torch-Pruning's dependency graph removes the same channels from every layer that shares
them (a conv's filters, the next conv's input channels, the batch norm between them,
residual additions, concatenations), so the model stays valid and every weight tensor
physically shrinks; dense runtimes run it faster without any sparse kernel.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from workers.methods.base import Method, StepContext, StepOutput
from workers.prune.common import FineTuneParams, LayerName, convert, export, fine_tune, resolve_layers


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


def run(input_path: Path, params: PruneChannelsParams, out_dir: Path, ctx: StepContext) -> StepOutput:
    from workers.prune.algorithms import prune_channels

    rnd = convert(input_path, ctx)
    ignored = resolve_layers(rnd.module, params.ignored_layers)
    taylor_batches = _taylor_batches(rnd, ctx, params) if params.importance == "taylor" else None

    def on_step(step: int, info: dict) -> None:
        ctx.report(0.05 + 0.15 * step / params.iterative_steps, f"pruning round {step}/{params.iterative_steps}")

    ctx.report(0.05, "ranking and removing channels")
    rnd.details["pruning"] = prune_channels(
        rnd.module, rnd.example, importance=params.importance, ratio=params.ratio,
        target_params_ratio=params.target_params_ratio, target_macs_ratio=params.target_macs_ratio,
        ignored_layers=ignored, keep_head=params.keep_head, round_to=params.round_to,
        iterative_steps=params.iterative_steps, taylor_batches=taylor_batches, on_step=on_step,
    )
    rnd.details["fine_tuning"] = fine_tune(rnd, params, ctx, start=0.2, end=0.9)
    return StepOutput(model_path=export(rnd, out_dir, ctx), details=rnd.details)


def _taylor_batches(rnd, ctx: StepContext, params: PruneChannelsParams):
    """Batches of the training data (inputs, labels or None) for Taylor importance: a few, not an epoch."""
    import numpy as np
    import torch

    train = ctx.datasets["train_dataset_id"].take(max(params.batch_size * 4, 256))
    names, dtypes = rnd.bridged.input_names, rnd.bridged.input_dtypes
    size = rnd.bridged.micro_batch or params.batch_size  # a fixed-batch module takes its batch only

    def batches():
        for feeds, labels in train.batches(size):
            if len(feeds[names[0]]) < size and rnd.bridged.micro_batch:
                break
            inputs = tuple(torch.from_numpy(np.ascontiguousarray(feeds[n].astype(dtypes[n], copy=False)))
                           for n in names)
            yield inputs, None if labels is None else torch.from_numpy(labels.astype(np.int64))

    return batches


METHOD = Method(
    id="prune.channels",
    version=1,
    description="Structured channel pruning with Torch-Pruning's dependency graph (importance l1, l2, taylor or "
    "bn_scale; a ratio or a params/MACs target), then optional fine-tuning on your data: a smaller dense model "
    "that runs faster everywhere.",
    params_model=PruneChannelsParams,
    run=run,
    dataset_params=("train_dataset_id", "eval_dataset_id"),
)
