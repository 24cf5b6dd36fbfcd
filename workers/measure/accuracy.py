"""Accuracy and fidelity on a user's dataset: the original and the result run on the same samples.

With labels (class indices), top-1 (and top-5 where there are more than 5 classes) accuracy of
each model and the drop in points. Without labels, or in addition: how far the result's outputs
move from the original's on the dataset's inputs (mean and worst-case cosine per sample, max abs
diff, top-1 agreement). Nothing here runs on random inputs.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypedDict

import numpy as np

from app.errors import MeasurementFailed
from workers.measure.fidelity import OutputComparison, padding_mask, summarize_outputs
from workers.onnx_tools.inputs import ROLES, InputPlan

DEFAULT_BATCH = 32



class TopK(TypedDict):
    """Top-1 and top-5 accuracy as fractions (top-5 only with more than five classes)."""

    top1: float
    top5: float | None

class _Scores:
    """Counts correct top-1/top-5 predictions of one model against the labels."""

    def __init__(self) -> None:
        self.top1 = self.top5 = self.count = 0

    def add(self, scores: np.ndarray, labels: np.ndarray) -> None:
        scores = scores.reshape(len(labels), -1).astype(np.float64)
        self.top1 += int((scores.argmax(axis=1) == labels).sum())
        if scores.shape[1] > 5:
            top5 = np.argpartition(-scores, 5, axis=1)[:, :5]
            self.top5 += int((top5 == labels[:, None]).any(axis=1).sum())
        self.count += len(labels)

    def report(self, classes: int) -> TopK:
        return {
            "top1": round(self.top1 / self.count, 6),
            "top5": round(self.top5 / self.count, 6) if classes > 5 else None,
        }


def classification_output(output_pairs, batch: int, labels: np.ndarray,
                          sample_outputs: list[np.ndarray]) -> tuple[int | None, str]:
    """Index into output_pairs of the output holding class scores [batch, classes], and why (or why none)."""
    need = int(labels.max()) + 1 if labels.size else 1
    for index, ((_i, _j, name, _rn, _dt), value) in enumerate(zip(output_pairs, sample_outputs)):
        value = np.asarray(value)
        if value.dtype.kind != "f" or value.ndim < 2 or value.shape[0] != batch:
            continue
        classes = int(np.prod(value.shape[1:]))
        if classes >= max(need, 2) and value.ndim == 2:
            return index, f"output '{name}' holds scores for {classes} classes"
    shapes = ", ".join(f"'{n}' {list(np.asarray(v).shape)}" for (_, _, n, _, _), v in zip(output_pairs, sample_outputs))
    return None, (f"the labels name {need} classes but no output has the shape [batch, classes] with at least that "
                  f"many classes ({shapes}); accuracy was not computed, fidelity was")


def evaluate_dataset(
    sessions: dict[str, Any],
    plan: InputPlan,
    output_pairs: list[tuple[int, int, str, str, str]],
    dataset: Any,
    *,
    max_samples: int | None = None,
    checkpoint: Callable[[], None] = lambda: None,
    on_batch: Callable[[int], None] = lambda n: None,
) -> dict[str, Any]:
    """Run both sessions over `dataset` (a workers.datasets.Dataset) and compare them."""
    notes: list[str] = []
    total = len(dataset) if max_samples is None else min(len(dataset), max_samples)
    if total < len(dataset):
        notes.append(f"evaluated on the first {total} of {len(dataset)} samples")
    batch = plan.fixed_batch or DEFAULT_BATCH
    if plan.fixed_batch and total % batch:
        dropped = total % batch
        total -= dropped
        notes.append(f"the models take exactly {batch} samples per run; the last {dropped} sample(s) were left out")
    if total < 1:
        raise MeasurementFailed(f"the dataset has {len(dataset)} sample(s), fewer than the {batch} the model takes "
                                "per run")
    missing = [p.name for p in plan.inputs if p.name not in dataset.inputs]
    if missing:
        raise MeasurementFailed(f"the dataset has no array for the model input(s) {missing}")
    labels = None if dataset.labels is None else np.asarray(dataset.labels[:total]).astype(np.int64)

    comparisons = [OutputComparison(name, result_name, dtype) for _, _, name, result_name, dtype in output_pairs]
    scores = {role: _Scores() for role in ROLES}
    target: int | None = None
    accuracy_note = None if labels is not None else "the dataset has no labels: fidelity only"
    runs = 0
    for start in range(0, total, batch):
        checkpoint()
        stop = min(start + batch, total)
        feeds = {role: {p.name: np.ascontiguousarray(dataset.inputs[p.name][start:stop].astype(p.dtypes[role]))
                        for p in plan.inputs} for role in ROLES}
        outputs = {}
        for role in ROLES:
            try:
                outputs[role] = sessions[role].run(None, feeds[role])
            except Exception as exc:
                raise MeasurementFailed(f"the {'original' if role == 'baseline' else 'compressed'} model fails on "
                                        f"dataset samples {start}..{stop - 1}: {exc}") from exc
        size = stop - start
        keep = padding_mask(feeds["baseline"], size)
        for comparison, (i, j, *_rest) in zip(comparisons, output_pairs):
            comparison.add(outputs["baseline"][i], outputs["result"][j], size, keep)
        if labels is not None:
            if runs == 0:
                target, accuracy_note = classification_output(
                    output_pairs, size, labels[start:stop],
                    [outputs["baseline"][i] for i, *_ in output_pairs])
            if target is not None:
                i, j = output_pairs[target][0], output_pairs[target][1]
                scores["baseline"].add(np.asarray(outputs["baseline"][i]), labels[start:stop])
                scores["result"].add(np.asarray(outputs["result"][j]), labels[start:stop])
        runs += 1
        on_batch(size)

    fidelity = summarize_outputs(comparisons, batch_size=batch, runs=runs)
    fidelity["samples"] = total
    fidelity["inputs"] = f"dataset {dataset.name or ''}".strip() + f": samples 0..{total - 1}, in order"
    cosines = [c.cosines for c in comparisons if c.cosines]
    fidelity["mean_cosine"] = round(float(np.mean([np.mean(c) for c in cosines])), 8) if cosines else None
    fidelity["worst_cosine"] = round(float(min(np.min(c) for c in cosines)), 8) if cosines else None
    top1 = [o["top1_agreement"] for o in fidelity["outputs"] if o.get("top1_agreement") is not None]
    fidelity["top1_agreement"] = min(top1) if top1 else None

    accuracy = None
    if target is not None:
        name = output_pairs[target][2]
        classes = int(np.prod(np.asarray(comparisons[target].shape)[1:]))
        original, result = scores["baseline"].report(classes), scores["result"].report(classes)
        accuracy = {
            "output": name,
            "classes": classes,
            "samples": scores["baseline"].count,
            "original": original,
            "compressed": result,
            "top1_drop_points": round(100 * (original["top1"] - result["top1"]), 4),
            "top5_drop_points": (round(100 * (original["top5"] - result["top5"]), 4)
                                 if original["top5"] is not None and result["top5"] is not None else None),
        }
    return {
        "dataset": dataset.name,
        "samples": total,
        "batch_size": batch,
        "accuracy": accuracy,
        "accuracy_note": accuracy_note,
        "fidelity": fidelity,
        "notes": notes,
    }
