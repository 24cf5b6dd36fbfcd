"""Fine-tuning after pruning: a few epochs of AdamW that win back most of the accuracy pruning cost.

With labels the loss is cross-entropy on the first output; without them the pruned model learns to match
the unpruned one (knowledge distillation), so any unlabelled sample of real inputs is enough. The best
epoch by the eval metric is kept, so fine-tuning never returns a model worse than the best it saw.
Knowledge distillation (workers.distill.kd) runs the same loop with its own `loss` and a teacher
that may be an ONNX Runtime session rather than a module.
"""
from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from app.errors import StepFailed
from workers.datasets import Dataset
from workers.prune.algorithms.magnitude import Masks

TEMPERATURE = 2.0       # softens the teacher's class scores so that the runner-up classes teach too
EVAL_BATCH = 256

# Called with the student's positional inputs (tensors) under no_grad: an nn.Module, or any callable, such as
# workers.distill.losses.OnnxRuntimeTeacher for a teacher that only runs in ONNX Runtime.
Teacher = Callable[..., Any]
# (student outputs, teacher outputs or None, labels or None) -> scalar loss
Loss = Callable[[Any, Any, torch.Tensor | None], torch.Tensor]


def finetune(
    module: nn.Module,
    *,
    train: Dataset,
    eval: Dataset | None,
    input_names: list[str],
    teacher: Teacher | None = None,
    loss: Loss | None = None,
    epochs: int,
    lr: float,
    batch_size: int,
    weight_decay: float = 0.01,
    patience: int | None = 3,
    masks: Masks | None = None,
    sparsity_schedule: Callable[[int], float] | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Train `module` in place and restore its best epoch's weights; returns the history and metrics.

    `teacher` (called with the same positional inputs) gives the targets when `train` has no labels, and the
    cosine metric when the eval data has none. `masks` are re-applied after every optimizer step.
    `sparsity_schedule(step)` (gradual pruning) gives the sparsity wanted after optimizer step `step`
    (counted from 1); when it changes, magnitude masks are recomputed at it (masks must come from
    Masks.from_magnitude). With a schedule, only epochs that end at its final sparsity can be the best.
    `loss(outputs, teacher_outputs, labels)` replaces the default loss (cross-entropy with labels, distillation
    without); the teacher then runs on every batch, labelled or not (knowledge distillation).
    """
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise StepFailed("finetune needs epochs >= 1, batch_size >= 1 and lr > 0", code="invalid_params")
    if train.labels is None and teacher is None and loss is None:
        raise StepFailed("fine-tuning without labels needs the unpruned model as teacher", code="dataset_required")
    if sparsity_schedule is not None and (masks is None or masks.scope is None):
        raise StepFailed("a sparsity schedule needs magnitude masks to recompute", code="invalid_params")
    _check_inputs(train, input_names, "training")
    if eval is not None:
        _check_inputs(eval, input_names, "eval")
    if len(train) == 0:
        raise StepFailed("the training dataset holds no samples", code="dataset_required")

    device = _device(module)
    use_amp = device.type == "cuda"
    if isinstance(teacher, nn.Module):
        teacher.eval()
    metric_data = eval if eval is not None else train
    metric_name = "accuracy" if metric_data.labels is not None else "cosine"

    def measure() -> float:
        if metric_name == "accuracy":
            return _accuracy(module, metric_data, input_names, device, use_amp)
        return _cosine(module, teacher, metric_data, input_names, device, use_amp)

    optimizer = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(train) / batch_size)
    total_steps = steps_per_epoch * epochs
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    generator = torch.Generator().manual_seed(seed)
    final_sparsity = sparsity_schedule(total_steps) if sparsity_schedule is not None else None

    def at_final_sparsity() -> bool:
        """No schedule, or the masks are at its final sparsity (a schedule comes with masks: checked above)."""
        if sparsity_schedule is None or masks is None or final_sparsity is None:
            return True
        return math.isclose(masks.sparsity or 0.0, final_sparsity, abs_tol=1e-4)

    if masks is not None:
        masks.apply()
    metric_before = measure()
    # Epoch 0 (the model as given) is a candidate unless gradual pruning has yet to reach its final sparsity.
    at_final = at_final_sparsity()
    best_metric = metric_before if at_final else -math.inf
    best_epoch = 0
    best_state = copy.deepcopy(module.state_dict()) if at_final else None
    history: list[dict[str, Any]] = []
    step = 0
    stale = 0
    stopped = False

    for epoch in range(1, epochs + 1):
        started = time.monotonic()
        module.train()
        losses: list[float] = []
        for index in torch.randperm(len(train), generator=generator).split(batch_size):
            if should_stop is not None and should_stop():
                stopped = True
                break
            order = np.sort(index.numpy())  # sorted indices read memory-mapped arrays faster
            inputs = _tensors(train, input_names, order, device)
            labels = None if train.labels is None else torch.as_tensor(train.labels[order]).long().to(device)
            with torch.autocast("cuda", dtype=torch.float16, enabled=use_amp):
                outputs = _forward(module, inputs)
                if loss is not None:
                    with torch.no_grad():
                        targets = teacher(*inputs) if teacher is not None else None
                    value = loss(outputs, targets, labels)
                elif labels is not None:
                    value = cross_entropy(outputs, labels)
                else:
                    assert teacher is not None  # no labels, no loss and no teacher was refused above
                    with torch.no_grad():
                        targets = teacher(*inputs)
                    value = _distillation(outputs, targets)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(value).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            step += 1
            if sparsity_schedule is not None and masks is not None:  # (a schedule comes with masks)
                wanted = sparsity_schedule(step)
                if not math.isclose(wanted, masks.sparsity or 0.0, abs_tol=1e-4):
                    masks.recompute(wanted)
            if masks is not None:
                masks.apply()
            losses.append(float(value.detach()))
        if stopped and not losses:
            break
        metric = measure()
        entry = {"epoch": epoch, "train_loss": float(np.mean(losses)) if losses else None, "eval_metric": metric,
                 "metric_name": metric_name, "seconds": round(time.monotonic() - started, 3)}
        if sparsity_schedule is not None and masks is not None:
            entry["sparsity"] = masks.sparsity
        history.append(entry)
        if on_epoch is not None:
            on_epoch(dict(entry))
        candidate = at_final_sparsity()
        if candidate and metric > best_metric:
            best_metric, best_epoch, stale = metric, epoch, 0
            best_state = copy.deepcopy(module.state_dict())
        elif candidate:
            stale += 1
        if stopped or (patience is not None and stale >= patience):
            break

    if best_state is not None:
        module.load_state_dict(best_state)
    module.eval()
    if masks is not None:
        masks.apply()
    return {
        "epochs_run": len(history),
        "best_epoch": best_epoch,
        "history": history,
        "metric_name": metric_name,
        "metric_before": metric_before,
        "metric_after": measure(),
        "device": str(device),
        "stopped": stopped,
    }


# --- data -----------------------------------------------------------------------------------------------

def _check_inputs(data: Dataset, input_names: list[str], role: str) -> None:
    missing = [name for name in input_names if name not in data.inputs]
    if missing:
        held = ", ".join(map(repr, data.inputs)) or "none"
        raise StepFailed(f"the {role} dataset has no array named {', '.join(map(repr, missing))}, which the model "
                         f"takes as input (it holds {held})", code="dataset_mismatch")


def _tensors(data: Dataset, input_names: list[str], index: Any, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Integer arrays (token ids) as int64, floating ones as float32, others as they are."""
    tensors = []
    for name in input_names:
        array = np.asarray(data.inputs[name][index])
        if np.issubdtype(array.dtype, np.integer):
            array = array.astype(np.int64)
        elif np.issubdtype(array.dtype, np.floating):
            array = array.astype(np.float32)
        tensors.append(torch.from_numpy(np.ascontiguousarray(array)).to(device))
    return tuple(tensors)


def _forward(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> Any:
    """The module on a batch of the training or eval data; a failure names the batch shape instead of surfacing
    as torch's text alone."""
    try:
        return module(*inputs)
    except (RuntimeError, ValueError, IndexError) as exc:
        shapes = ", ".join(str(list(t.shape)) for t in inputs)
        text = " ".join(str(exc).split())[:300]
        raise StepFailed(f"the model fails on a batch of the step's data, inputs shaped {shapes} ({type(exc).__name__}: "
                         f"{text}): the model may hard-code a batch size or a shape that the data does not "
                         "follow",
                         code="training_failed") from exc


def _device(module: nn.Module) -> torch.device:
    for tensor in module.parameters():
        return tensor.device
    return torch.device("cpu")


def output_tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for part in value for t in output_tensors(part)]
    if isinstance(value, dict):
        return [t for part in value.values() for t in output_tensors(part)]
    return []


# --- losses and metrics ---------------------------------------------------------------------------------

def cross_entropy(outputs: Any, labels: torch.Tensor) -> torch.Tensor:
    logits = output_tensors(outputs)[0]
    try:
        return nn.functional.cross_entropy(logits.float(), labels)
    except (RuntimeError, ValueError, IndexError) as exc:
        raise StepFailed(
            f"labels of shape {list(labels.shape)} do not fit the model's first output of shape "
            f"{list(logits.shape)} (cross-entropy expects class scores [N, C] and class ids [N])",
            code="dataset_mismatch",
        ) from exc


def _distillation(outputs: Any, targets: Any) -> torch.Tensor:
    """KL at temperature 2 on class scores (2-D outputs), mean squared error on any other output."""
    students, teachers = output_tensors(outputs), output_tensors(targets)
    losses = []
    for student, teacher in zip(students, teachers):
        student, teacher = student.float(), teacher.float()
        if student.dim() == 2 and student.shape == teacher.shape:
            losses.append(nn.functional.kl_div(
                nn.functional.log_softmax(student / TEMPERATURE, dim=1),
                nn.functional.log_softmax(teacher / TEMPERATURE, dim=1),
                reduction="batchmean", log_target=True,
            ) * TEMPERATURE ** 2)
        else:
            losses.append(nn.functional.mse_loss(student, teacher))
    return torch.stack(losses).mean()


@torch.no_grad()
def _accuracy(module: nn.Module, data: Dataset, input_names: list[str], device: torch.device, amp: bool) -> float:
    assert data.labels is not None  # the caller measures accuracy only on labelled data
    module.eval()
    correct = 0
    for start in range(0, len(data), EVAL_BATCH):
        index = slice(start, start + EVAL_BATCH)
        with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
            logits = output_tensors(_forward(module, _tensors(data, input_names, index, device)))[0]
        labels = torch.as_tensor(data.labels[index]).to(device)
        correct += int((logits.argmax(dim=1) == labels).sum())
    return correct / len(data) if len(data) else 0.0


@torch.no_grad()
def _cosine(module: nn.Module, teacher: Teacher | None, data: Dataset, input_names: list[str],
            device: torch.device, amp: bool) -> float:
    """Mean per-sample cosine similarity of the model's outputs to the teacher's, over all outputs."""
    if teacher is None:
        raise StepFailed("without labels in the eval data the metric compares to a teacher, and none was given",
                         code="dataset_required")
    module.eval()
    total, count = 0.0, 0
    for start in range(0, len(data), EVAL_BATCH):
        inputs = _tensors(data, input_names, slice(start, start + EVAL_BATCH), device)
        with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
            students, teachers = output_tensors(_forward(module, inputs)), output_tensors(teacher(*inputs))
        for student, reference in zip(students, teachers):
            rows = student.shape[0]
            similarity = nn.functional.cosine_similarity(
                student.float().reshape(rows, -1), reference.float().reshape(rows, -1), dim=1, eps=1e-8)
            total += float(similarity.sum())
            count += rows
    return total / count if count else 0.0
