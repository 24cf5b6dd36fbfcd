"""prune.magnitude: unstructured magnitude pruning: the smallest weights become zeros.

The ONNX result stores the zeros, so it is as large as the original on disk and, on dense
runtimes (ONNX Runtime's CPU and CUDA kernels), exactly as fast: zeros are multiplied
like any other number. What shrinks is the model compressed for transfer or storage
(zstd, gzip), which the report gives. The report says this plainly.
"""
from __future__ import annotations

from pathlib import Path

from app.catalog.prune.magnitude import PruneMagnitudeParams
from workers.methods import implements
from workers.methods.base import StepContext, StepOutput
from workers.prune.common import convert, export, fine_tune, on_training_device, resolve_layers

DENSE_RUNTIME_NOTE = (
    "Unstructured zeros do not make dense runtimes faster: ONNX Runtime multiplies them like any other weight, so "
    "expect the same latency as the original. The gain is in the compressed size (zstd/gzip) for storage and "
    "transfer; for speed use prune.channels."
)


@implements("prune.magnitude")
def run(input_path: Path, params: PruneMagnitudeParams, out_dir: Path, ctx: StepContext) -> StepOutput:
    from workers.prune.algorithms import compressed_sizes, sparsity_report

    rnd = convert(input_path, ctx)
    ignored = resolve_layers(rnd.module, params.ignored_layers)
    with on_training_device(rnd):  # the thresholds by kernels.magnitude_threshold on a GPU worker
        _masks(rnd, params, ignored, ctx)
    path = export(rnd, out_dir, ctx)
    after = sparsity_report(rnd.module, ignored)
    rnd.details["sparsity"] = after
    original, pruned = compressed_sizes(input_path), compressed_sizes(path)
    rnd.details["compressed_size"] = {"original": original, "result": pruned}
    codec = "zstd" if pruned.get("zstd") and original.get("zstd") else "gzip"
    ratio = pruned[codec] / original[codec]
    rnd.details["compressed_size"][f"{codec}_ratio"] = round(ratio, 4)
    rnd.details["warnings"] = [
        f"{after['total']['sparsity']:.0%} of the weights are zeros: compressed with {codec} the model is "
        f"{1 / ratio:.1f}x smaller than the original compressed ({pruned[codec]:,} vs {original[codec]:,} bytes). "
        + DENSE_RUNTIME_NOTE
    ]
    return StepOutput(model_path=path, details=rnd.details)


def _masks(rnd, params: PruneMagnitudeParams, ignored, ctx: StepContext):
    """The magnitude masks at params.sparsity, one-shot or gradual, fine-tuned where the step has training data."""
    from workers.prune.algorithms import Masks, polynomial_sparsity

    schedule = None
    if params.schedule == "gradual":
        train = ctx.datasets["train_dataset_id"]
        steps_per_epoch = -(-len(train) // params.batch_size)
        end_step = max(1, int(params.epochs * steps_per_epoch * 0.75))  # hold the final sparsity for the last quarter

        def schedule(step: int) -> float:
            return polynomial_sparsity(step, initial=params.initial_sparsity, final=params.sparsity,
                                       begin_step=0, end_step=end_step)

        masks = Masks.from_magnitude(rnd.module, params.initial_sparsity, params.scope, ignored)
    else:
        ctx.report(0.05, f"zeroing the {params.sparsity:.0%} smallest weights ({params.scope})")
        masks = Masks.from_magnitude(rnd.module, params.sparsity, params.scope, ignored)
    masks.apply()
    rnd.details["fine_tuning"] = fine_tune(rnd, params, ctx, start=0.1, end=0.9, masks=masks,
                                           sparsity_schedule=schedule)
    # The result holds the target sparsity exactly, whatever the schedule did on the way.
    masks.recompute(params.sparsity)
    return masks
