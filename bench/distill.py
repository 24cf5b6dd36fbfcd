"""Benchmark: knowledge distillation through ModelPress against the same student trained from scratch, and
the three recipes end to end.

A residual CNN teacher (stem + 6 identical residual blocks) is trained here on scikit-learn's
load_digits (real digits, real labels) and exported to ONNX. Then, in one process:
- `distill.kd` with a half-width student (`student: width`, width_ratio 0.5) and a one-third-depth
  student (`student: depth`, keep_every 3: 2 of the 6 blocks), each trained on the training split;
- the same two student architectures (taken from the distilled ONNX files, weights re-initialised)
  trained from scratch on the labels only, for the same epochs, by the loop a user writes;
- the recipes prune-finetune-int8, distill-int8 and deep-compression, expanded by app.catalog.recipes
  and run step by step through the worker's own methods.
Every model is measured against the teacher with the worker's measurement code (latency
interleaved with the teacher's, accuracy on the 397 held-out digits).

    .venv/bin/python bench/distill.py [--epochs 20] [--short-epochs 5] [--no-write]
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.catalog import recipes  # noqa: E402
from bench.prune import BATCH, digits_data, export, judge, train  # noqa: E402
from bench.results import publish  # noqa: E402
from workers import methods  # noqa: E402
from workers.datasets import Dataset  # noqa: E402

BATCHES = (1, 64)


def residual_teacher():
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, width: int) -> None:
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width)
            self.conv2, self.bn2 = nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width)

        def forward(self, x):
            y = torch.relu(self.bn1(self.conv1(x)))
            return torch.relu(x + self.bn2(self.conv2(y)))

    width = 64
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        *[Block(width) for _ in range(6)],
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(width * 4 * 4, 10),
    )


def datasets(data) -> dict[str, Dataset]:
    (xtr, ytr), (xva, yva), _ = data
    return {"train_dataset_id": Dataset({"images": xtr}, labels=ytr, name="digits train"),
            "eval_dataset_id": Dataset({"images": xva}, labels=yva, name="digits val"),
            "calibration_dataset_id": Dataset({"images": xtr[:256]}, name="digits train (256)")}


def run_steps(steps: list[dict[str, Any]], model: Path, data, out: Path,
              seed: int = 0) -> tuple[Path, dict[str, Path]]:
    """The steps as the pipeline runs them: each takes the previous step's model."""
    current, packed = model, {}
    for index, step in enumerate(steps, start=1):
        method = methods.get(step["method"])
        params = method.params_model.model_validate(step["params"])
        named = datasets(data)
        ctx = methods.StepContext(
            datasets={p: named[p] for p in method.dataset_params if step["params"].get(p)},
            calibration=named["calibration_dataset_id"] if step["params"].get("calibration_dataset_id") else None,
            seed=seed * 100 + index)
        out_dir = out / f"step-{index}"
        out_dir.mkdir(parents=True)
        with contextlib.chdir(out_dir):
            output = method.run(current, params, out_dir, ctx)
        current, packed = output.model_path, output.packed
    return current, packed


def from_scratch(student_onnx: Path, data, epochs: int, out: Path, seed: int = 0) -> Path:
    """The distilled student's architecture with fresh weights, trained on labels only."""
    import torch

    from workers import bridge

    module = bridge.to_torch(student_onnx).module
    torch.manual_seed(seed)
    for layer in module.modules():
        if hasattr(layer, "reset_parameters") and layer is not module:
            layer.reset_parameters()
    train(module, data, epochs, 1e-3, seed=seed)
    return export(module, out)


def top1(path: Path, data: Dataset) -> float:
    from workers.bridge.check import session

    logits = session(path).run(None, {"images": data.inputs["images"]})[0]
    return float((logits.argmax(axis=1) == data.labels).mean())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--short-epochs", type=int, default=5, help="a second, shorter budget for the students")
    parser.add_argument("--seeds", type=int, default=5, help="students trained with this many seeds each")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    import torch

    started = time.time()
    torch.manual_seed(0)
    data = digits_data()
    _, _, (xte, yte) = data
    evaluation = Dataset({"images": xte}, labels=yte, name="load_digits test split")
    rows: list[list[str]] = []
    architecture: dict[tuple[str, int, int], Path] = {}   # the distilled student each from-scratch one copies
    with tempfile.TemporaryDirectory() as tmp_name, contextlib.chdir(tmp_name):
        tmp = Path(tmp_name)
        teacher = residual_teacher()
        train(teacher, data, 30, 2e-3)
        teacher_path = export(teacher, tmp / "teacher.onnx")
        base = judge(teacher_path, teacher_path, evaluation, BATCHES)
        rows.append(cells("teacher: residual CNN, 6 blocks x 64 channels", base, base))
        students = {"half width": {"student": "width", "width_ratio": 0.5},
                    "one third of the blocks": {"student": "depth", "keep_every": 3}}
        ways = {"distilled by ModelPress (alpha 0.5, the default)": {},
                "distilled by ModelPress (alpha 0.9)": {"alpha": 0.9},
                "trained from scratch (labels only)": None}
        # Two training budgets: where the soft targets help, and where both have converged. Each student is
        # trained with `seeds` seeds (the held-out set is 397 digits: one digit is 0.25 points, less than the
        # spread between seeds); sizes and latency are the first seed's.
        for epochs in sorted({args.short_epochs, args.epochs}):
            training = {"train_dataset_id": "train", "eval_dataset_id": "val", "epochs": epochs,
                        "batch_size": BATCH, "patience": None}
            for label, params in students.items():
                for by, extra in ways.items():
                    row, accuracies = None, []
                    try:
                        for seed in range(args.seeds):
                            where = tmp / f"{label}-{epochs}-{seed}-{len(accuracies)}-{hash(by) & 0xffff}"
                            if extra is not None:
                                path, _ = run_steps([{"method": "distill.kd",
                                                      "params": {**params, **training, **extra}}],
                                                    teacher_path, data, where, seed=seed)
                                architecture[(label, epochs, seed)] = path
                            else:
                                path = from_scratch(architecture[(label, epochs, seed)], data, epochs,
                                                    where.with_suffix(".onnx"), seed=seed)
                            if row is None:
                                row = judge(teacher_path, path, evaluation, BATCHES)
                                accuracies.append(row["accuracy"])
                            else:
                                accuracies.append(top1(path, evaluation))
                        row["accuracies"] = accuracies
                    except Exception as exc:  # a failure is a finding: show it in the table
                        traceback.print_exc()
                        row = {"error": f"fails: {type(exc).__name__}: {str(exc)[:120]}"}
                    rows.append(cells(f"student, {label}, {epochs} epochs: {by}", row, base))
                    print("| " + " | ".join(rows[-1]) + " |", flush=True)
        for recipe in ("prune-finetune-int8", "distill-int8", "deep-compression"):
            steps = recipes.expand(recipe, {"train_dataset_id": "train", "eval_dataset_id": "val",
                                            "calibration_dataset_id": "calibration", "epochs": args.epochs})
            try:
                path, packed = run_steps(steps, teacher_path, data, tmp / recipe)
                row = judge(teacher_path, path, evaluation, BATCHES)
                if ".zst" in packed:
                    row["packed_bytes"] = packed[".zst"].stat().st_size
            except Exception as exc:
                traceback.print_exc()
                row = {"error": f"fails: {type(exc).__name__}: {str(exc)[:120]}"}
            rows.append(cells(f"recipe {recipe} ({' → '.join(s['method'] for s in steps)})", row, base))
            print("| " + " | ".join(rows[-1]) + " |", flush=True)
    header = ["model", "params (ratio)", "ONNX size (x smaller)", "stored size (x smaller)", "p50 batch 1",
              "p50 batch 64", "top-1 (397 held-out digits)"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    publish("Distillation and recipes: ModelPress vs the same student trained from scratch",
            f"Students train {args.short_epochs} and {args.epochs} epochs, recipes {args.epochs} (lr 1e-3, batch "
            f"{BATCH}), on the same 1200 training "
            "digits (the from-scratch loop: Adam, cross-entropy); accuracy on the 397 held-out digits; latency "
            "against the teacher in one process, interleaved (in brackets: teacher p50 / model p50). Stored size: "
            "the zstd-packed artifact where the recipe makes one (deep-compression), else the ONNX file "
            "compressed with zstd.", "\n".join(lines), started=started, write=not args.no_write)


def cells(name: str, row: dict[str, Any], base: dict[str, Any]) -> list[str]:
    if "error" in row:
        return [name, "—", "—", "—", "—", "—", row["error"]]
    stored = row.get("packed_bytes") or row["zstd_bytes"]
    out = [name, f"{row['params']:,} ({row['params'] / base['params']:.2f})",
           f"{row['onnx_bytes'] / 1024:.0f} KiB ({base['onnx_bytes'] / row['onnx_bytes']:.1f}x)",
           f"{stored / 1024:.0f} KiB" + (f" ({base['onnx_bytes'] / stored:.1f}x)" if row is not base else "")]
    for batch in BATCHES:
        ratio = row.get(f"p50_ratio_b{batch}")
        out.append(f"{row[f'p50_b{batch}']:.3f} ms" + (f" ({1 / ratio:.2f}x)" if row is not base else ""))
    if row.get("accuracies"):
        values = [100 * a for a in row["accuracies"]]
        out.append(f"{sum(values) / len(values):.2f}% ({min(values):.2f}-{max(values):.2f}, {len(values)} seeds)"
                   if len(values) > 1 else f"{values[0]:.2f}%")
    else:
        out.append(f"{100 * row['accuracy']:.2f}%" if row.get("accuracy") is not None else "n/a")
    return out


if __name__ == "__main__":
    main()
