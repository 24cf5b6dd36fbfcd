"""prune.channels: structured pruning of whole channels, giving a genuinely smaller dense model.

Torch-Pruning's dependency graph removes the same channels from every layer that shares
them (a conv's filters, the next conv's input channels, the batch norm between them,
residual additions, concatenations), so the model stays valid and every weight tensor
physically shrinks; dense runtimes run it faster without any sparse kernel.
"""
from __future__ import annotations

from pathlib import Path

from app.catalog.prune.channels import PruneChannelsParams
from workers.methods import implements
from workers.methods.base import StepContext, StepOutput
from workers.prune.common import convert, export, fine_tune, resolve_layers


@implements("prune.channels")
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
