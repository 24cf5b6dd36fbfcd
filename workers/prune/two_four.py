"""prune.2_4: 2:4 semi-structured sparsity for the sparse tensor cores of NVIDIA GPUs (Ampere and newer).

In every group of four consecutive weights along a Linear (or 1x1 Conv) layer's input
dimension, the two smallest become zero. Sparse tensor cores skip them, up to twice the
matmul throughput; CPUs and ONNX Runtime's dense kernels have no such path, so on a CPU
worker the pattern is recorded and no speedup is claimed.
"""
from __future__ import annotations

from pathlib import Path

from app.catalog.prune.two_four import Prune24Params
from app.errors import StepFailed
from workers.methods import implements
from workers.methods.base import StepContext, StepOutput
from workers.prune.common import convert, export, fine_tune, on_training_device, resolve_layers


@implements("prune.2_4")
def run(input_path: Path, params: Prune24Params, out_dir: Path, ctx: StepContext) -> StepOutput:
    from workers.prune.algorithms import Masks, check_pattern, cuda_semi_structured_speedup, nm_masks, sparsity_report

    rnd = convert(input_path, ctx)
    ignored = resolve_layers(rnd.module, params.ignored_layers)
    ctx.report(0.05, "keeping the 2 largest of every 4 weights")
    with on_training_device(rnd):  # the masks by kernels.nm_mask on a GPU worker
        found, skipped = nm_masks(rnd.module, n=2, m=4, ignored_layers=ignored)
        if not found:
            raise StepFailed(
                "no layer of this model can take a 2:4 pattern: it needs Linear or 1x1 Conv layers whose input "
                f"dimension is a multiple of 4 (skipped: {_first(skipped)})", code="nothing_to_prune")
        masks = Masks(rnd.module, found)
        masks.apply()
        rnd.details["skipped_layers"] = skipped
        rnd.details["fine_tuning"] = fine_tune(rnd, params, ctx, start=0.1, end=0.85, masks=masks)
        rnd.details["pattern"] = check_pattern(rnd.module, n=2, m=4)
    rnd.details["sparsity"] = sparsity_report(rnd.module)
    rnd.details["sparse_tensor_cores"] = cuda_semi_structured_speedup(rnd.module)
    if not rnd.details["sparse_tensor_cores"].get("available"):
        rnd.details["warnings"] = [
            "2:4 pattern applied; " + rnd.details["sparse_tensor_cores"]["reason"]
            + ". ONNX Runtime stores and runs the zeros densely, so the model is as large and as fast as before."]
    return StepOutput(model_path=export(rnd, out_dir, ctx), details=rnd.details)


def _first(skipped: dict[str, str], count: int = 3) -> str:
    shown = [f"{name}: {reason}" for name, reason in list(skipped.items())[:count]]
    return "; ".join(shown) + (f"; and {len(skipped) - count} more" if len(skipped) > count else "") or "none"
