"""What the three pruning methods share: fine-tuning params and the ONNX -> PyTorch -> ONNX round.

Pruning works on trainable modules, so each pruning step converts the uploaded ONNX
model to PyTorch (workers.bridge, checked against ONNX Runtime), prunes, fine-tunes
when it has training data, and exports back to one ONNX file with the original
input/output names and dynamic axes (checked again). The unpruned module is the
teacher when the training data has no labels.
"""
from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.catalog.prune.common import FineTuneParams
from workers.methods.base import StepContext

if TYPE_CHECKING:  # pragma: no cover
    import torch


@dataclass
class Round:
    """A converted model being pruned: the module, its bridge record, and what the step will report."""

    bridged: Any                      # workers.bridge.Bridged
    module: torch.nn.Module
    teacher: torch.nn.Module | None   # the unpruned module, frozen; kept only when the step fine-tunes
    example: tuple[torch.Tensor, ...]
    sample: dict[str, Any] | None     # a few samples of the step's data for the checks; None: generated inputs
    details: dict[str, Any]


def convert(input_path: Path, ctx: StepContext) -> Round:
    """The input model as a trainable module, checked against ONNX Runtime on the step's own data when it has any."""
    import torch

    from workers import bridge

    data = ctx.datasets.get("train_dataset_id") or ctx.datasets.get("eval_dataset_id")
    sample = data.take(bridge.CHECK_SAMPLES).inputs if data is not None else None
    ctx.report(0.02, "converting the ONNX model to PyTorch")
    started = time.perf_counter()
    bridged = bridge.to_torch(input_path, sample=sample, shapes=ctx.input_shapes)
    real = sample is not None
    if sample is None:
        sample = bridge.example_feeds(bridged, batch=2, seed=ctx.seed)
    # Torch-Pruning traces the module on these: a module that runs only at its fixed batch gets that many.
    count = bridged.micro_batch or len(next(iter(sample.values()), []))
    example = tuple(torch.from_numpy(_cast(sample[name][:count], bridged.input_dtypes[name]))
                    for name in bridged.input_names)
    module = bridged.module
    teacher = None
    if "train_dataset_id" in ctx.datasets:  # only fine-tuning needs the unpruned model
        teacher = copy.deepcopy(module).eval()
        for parameter in teacher.parameters():
            parameter.requires_grad_(False)
    details = {
        "conversion": {"check": bridged.check, "notes": bridged.notes,
                       "seconds": round(time.perf_counter() - started, 3)},
        "batch": bridged.batch,
    }
    return Round(bridged=bridged, module=module, teacher=teacher, example=example,
                 sample=sample if real else None, details=details)


def _cast(array, dtype):
    import numpy as np

    return np.ascontiguousarray(array.astype(dtype, copy=False))


def training_device():
    """CUDA where the worker has a GPU (the kernels and AMP then apply), else the CPU."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@contextlib.contextmanager
def on_training_device(rnd: Round):
    """rnd's module (and teacher) on the training device while the block runs, then back where they were: on a GPU
    worker magnitude masks are then computed by kernels.magnitude_threshold and N:M masks by kernels.nm_mask on the
    CUDA weights, and fine-tuning runs under AMP; the export reads the module on the CPU."""
    device = training_device()
    before = next((p.device for p in rnd.module.parameters()), device)
    rnd.module.to(device)
    if rnd.teacher is not None:
        rnd.teacher.to(device)
    try:
        yield device
    finally:
        rnd.module.to(before)
        if rnd.teacher is not None:
            rnd.teacher.to(before)


def fine_tune(rnd: Round, params: FineTuneParams, ctx: StepContext, *, start: float, end: float,
              masks: Any = None, sparsity_schedule: Callable[[int], float] | None = None) -> dict[str, Any]:
    """Fine-tune rnd.module on the step's training data (progress between `start` and `end`), or say why not;
    on the GPU where there is one (on_training_device)."""
    train = ctx.datasets.get("train_dataset_id")
    if train is None:
        return {"skipped": "no train_dataset_id: pruned one-shot, without fine-tuning"}
    with on_training_device(rnd):
        return _fine_tune(rnd, params, ctx, train, start=start, end=end, masks=masks,
                          sparsity_schedule=sparsity_schedule)


def _fine_tune(rnd: Round, params: FineTuneParams, ctx: StepContext, train: Any, *, start: float, end: float,
               masks: Any, sparsity_schedule: Callable[[int], float] | None) -> dict[str, Any]:
    from workers import bridge
    from workers.prune.algorithms import finetune
    eval_data = ctx.datasets.get("eval_dataset_id")
    epochs = params.epochs

    def on_epoch(entry: dict[str, Any]) -> None:
        metric = entry.get("eval_metric")
        shown = f", {entry.get('metric_name', 'metric')} {metric:.4f}" if isinstance(metric, float) else ""
        ctx.report(start + (end - start) * entry["epoch"] / epochs,
                   f"fine-tuning epoch {entry['epoch']}/{epochs}: loss {entry['train_loss']:.4f}{shown}",
                   milestone=True)

    # The unpruned module teaches when the data has no labels, and is the reference of the cosine metric.
    teacher = None if rnd.teacher is None else bridge.for_training(rnd.teacher, rnd.bridged.batch)
    return finetune(
        bridge.for_training(rnd.module, rnd.bridged.batch), train=train, eval=eval_data,
        input_names=rnd.bridged.input_names, teacher=teacher,
        epochs=epochs, lr=params.lr, batch_size=params.batch_size, weight_decay=params.weight_decay,
        patience=params.patience, masks=masks, sparsity_schedule=sparsity_schedule, on_epoch=on_epoch,
        should_stop=ctx.should_stop, seed=ctx.seed,
    )


def export(rnd: Round, out_dir: Path, ctx: StepContext) -> Path:
    """The module back to one ONNX file next to the step's output, checked against the module."""
    from workers import bridge

    ctx.report(0.95, "exporting the pruned model to ONNX")
    rnd.module.eval()
    dst = out_dir / "model.onnx"
    rnd.details["export"] = bridge.to_onnx(rnd.module, rnd.bridged, dst, sample=rnd.sample)
    return dst


def resolve_layers(module: torch.nn.Module, names: list[str]) -> list[str]:
    """Module names of the Conv/Linear layers a user named, by module name or by the ONNX node they came from."""
    from workers import bridge
    from workers.prune.algorithms.magnitude import weighted_layers

    modules = dict(module.named_modules())
    resolved = [name if name in modules else bridge.module_name(name) for name in names]
    weighted_layers(module, resolved)  # refuses, listing real layer names, a name that is no layer
    return list(dict.fromkeys(resolved))
