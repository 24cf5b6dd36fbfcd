"""Benchmark: ModelPress's pruning methods against the script a user would write, side by side.

A CNN is trained here on scikit-learn's load_digits (real handwritten digits, real labels)
and exported to ONNX. Then, in one process:
- ModelPress: `prune.channels` at 30/50/70% and `prune.magnitude` at 50/80/90%, each with
  fine-tuning on the training split (the worker's own code, from the ONNX file);
- a user's script: the same pruning done directly on the PyTorch model with Torch-Pruning
  (MagnitudeImportance, the classifier kept whole) and torch.nn.utils.prune
  (global_unstructured, L1), fine-tuned with the same epochs and learning rate, exported
  with torch.onnx.export.
Every result is measured against the same original with the worker's measurement code
(latency interleaved with the original, accuracy on the held-out digits), and counted
(params, MACs, ONNX size, zstd size). Also `prune.channels` 50% on YOLOX-nano from
../shared/models without data: params, MACs, latency and output fidelity on real images.

    .venv/bin/python bench/prune.py [--only digits,yolox] [--no-write] [--epochs 15]
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MODELS = ROOT.parent / "shared" / "models"

from bench.results import publish  # noqa: E402
from workers import methods  # noqa: E402
from workers.datasets import Dataset  # noqa: E402
from workers.measure import measure_pair  # noqa: E402
from workers.onnx_tools.counting import count  # noqa: E402

CHANNEL_RATIOS = (0.3, 0.5, 0.7)
SPARSITIES = (0.5, 0.8, 0.9)
BATCHES = (1, 64)
ITERATIONS = {1: 300, 64: 100}
LR, BATCH = 1e-3, 64


# --- the model ------------------------------------------------------------------------------------

def digits_data():
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]  # [N, 1, 8, 8]
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(x))
    train, val, test = order[:1200], order[1200:1400], order[1400:]
    return (x[train], y[train]), (x[val], y[val]), (x[test], y[test])


def digits_cnn():
    import torch
    from torch import nn

    # Wide enough that compute, not call overhead, dominates at batch 64.
    return nn.Sequential(
        nn.Conv2d(1, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.Conv2d(64, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(128, 256, 3, padding=1), nn.BatchNorm2d(256), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(256 * 2 * 2, 128), nn.ReLU(), nn.Linear(128, 10),
    ).to(torch.float32)


def train(model, data, epochs: int, lr: float, *, masks_hook=None, seed: int = 0) -> None:
    """The loop a user writes: Adam, cross-entropy, shuffled mini-batches."""
    import torch

    (x, y), _, _ = data
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(xt), generator=generator).split(BATCH):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(xt[batch]), yt[batch]).backward()
            optimizer.step()
            if masks_hook is not None:
                masks_hook()
    model.eval()


def export(model, path: Path) -> Path:
    import torch

    buf = io.BytesIO()
    torch.onnx.export(model.eval(), (torch.zeros(2, 1, 8, 8),), buf, dynamo=False, opset_version=17,
                      input_names=["images"], output_names=["logits"],
                      dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
    path.write_bytes(buf.getvalue())
    return path


# --- the two ways to prune ------------------------------------------------------------------------

def modelpress(method_id: str, params: dict[str, Any], original: Path, data, out_dir: Path) -> tuple[Path, dict]:
    out_dir.mkdir(parents=True)
    method = methods.get(method_id)
    datasets = {}
    if data is not None and "train_dataset_id" in params:
        (xtr, ytr), (xva, yva), _ = data
        datasets = {"train_dataset_id": Dataset({"images": xtr}, labels=ytr, name="digits train"),
                    "eval_dataset_id": Dataset({"images": xva}, labels=yva, name="digits val")}
    ctx = methods.StepContext(datasets=datasets)
    output = method.run(original, method.params_model.model_validate(params), out_dir, ctx)
    return output.model_path, output.details


def user_channels(model, ratio: float, data, epochs: int, out: Path) -> Path:
    import torch
    import torch_pruning as tp

    model = copy.deepcopy(model)
    example = torch.zeros(1, 1, 8, 8)
    pruner = tp.pruner.MetaPruner(model, example, importance=tp.importance.MagnitudeImportance(p=2),
                                  pruning_ratio=ratio, ignored_layers=[model[-1]])
    pruner.step()
    train(model, data, epochs, LR)
    return export(model, out)


def user_magnitude(model, sparsity: float, data, epochs: int, out: Path) -> Path:
    import torch
    from torch.nn.utils import prune

    model = copy.deepcopy(model)
    targets = [(m, "weight") for m in model.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)]
    prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=sparsity)
    train(model, data, epochs, LR)  # the pruning hooks keep the masked weights at zero
    for module, name in targets:
        prune.remove(module, name)
    return export(model, out)


# --- measuring ------------------------------------------------------------------------------------

def judge(original: Path, candidate: Path, evaluation: Dataset | None, batches) -> dict[str, Any]:
    from workers.prune.algorithms import compressed_sizes

    row: dict[str, Any] = count(candidate)
    sizes = compressed_sizes(candidate)
    row["onnx_bytes"], row["zstd_bytes"] = sizes["raw"], sizes["zstd"]
    for batch in batches:
        measured = measure_pair(original, candidate, batch_sizes=[batch], warmup=max(5, ITERATIONS[batch] // 10),
                                iterations=ITERATIONS[batch], dataset=evaluation if batch == batches[0] else None)
        latency = measured["latency"]["batch_sizes"][0]
        row[f"p50_b{batch}"] = latency["result"]["p50_ms"]
        row[f"p50_ratio_b{batch}"] = latency["p50_ratio"]
        if batch == batches[0]:
            on = measured.get("dataset") or {}
            accuracy = on.get("accuracy")
            row["accuracy"] = None if not accuracy else accuracy["compressed"]["top1"]
            row["accuracy_original"] = None if not accuracy else accuracy["original"]["top1"]
            fidelity = on.get("fidelity") or measured.get("fidelity") or {}
            row["cosine"] = fidelity.get("mean_cosine")
    return row


def cells(name: str, by: str, row: dict[str, Any], base: dict[str, Any], batches) -> list[str]:
    if "error" in row:
        return [name, by] + ["—"] * (4 + len(batches)) + [row["error"]]
    out = [name, by, f"{row['params']:,} ({row['params'] / base['params']:.2f})",
           f"{row['macs'] / 1e6:.2f}M ({row['macs'] / base['macs']:.2f})" if row.get("macs") else "n/a",
           f"{row['onnx_bytes'] / 1024:.0f} KiB", f"{row['zstd_bytes'] / 1024:.0f} KiB "
           f"({base['zstd_bytes'] / row['zstd_bytes']:.2f}x smaller)" if row is not base else
           f"{row['zstd_bytes'] / 1024:.0f} KiB"]
    for batch in batches:
        ratio = row.get(f"p50_ratio_b{batch}")
        out.append(f"{row[f'p50_b{batch}']:.3f} ms" + (f" ({1 / ratio:.2f}x faster)" if row is not base else ""))
    if row.get("accuracy") is not None:
        out.append(f"{100 * row['accuracy']:.2f}%")
    else:
        out.append(f"cos {row['cosine']:.4f}" if row.get("cosine") is not None else "n/a")
    return out


def digits_rows(tmp: Path, epochs: int) -> list[list[str]]:
    import torch

    torch.manual_seed(0)
    data = digits_data()
    model = digits_cnn()
    started = time.perf_counter()
    train(model, data, 30, 2e-3)
    print(f"trained the digits CNN in {time.perf_counter() - started:.0f} s", flush=True)
    original = export(model, tmp / "digits-cnn.onnx")
    _, _, (xte, yte) = data
    evaluation = Dataset({"images": xte}, labels=yte, name="load_digits test split")
    base = judge(original, original, evaluation, BATCHES)
    rows = [cells("digits CNN (original)", "—", base, base, BATCHES)]
    finetune = {"train_dataset_id": "train", "eval_dataset_id": "val", "epochs": epochs, "lr": LR,
                "batch_size": BATCH, "patience": None}
    plans = [(f"channels {int(r * 100)}%", "prune.channels", {"ratio": r, **finetune},
              lambda out, r=r: user_channels(model, r, data, epochs, out)) for r in CHANNEL_RATIOS]
    plans += [(f"magnitude {int(s * 100)}%", "prune.magnitude", {"sparsity": s, **finetune},
               lambda out, s=s: user_magnitude(model, s, data, epochs, out)) for s in SPARSITIES]
    for label, method_id, params, user in plans:
        for by in ("ModelPress", "user script"):
            out_dir = tmp / f"{label.replace(' ', '-').replace('%', '')}-{by.replace(' ', '-')}"
            try:
                if by == "ModelPress":
                    path, _details = modelpress(method_id, params, original, data, out_dir)
                else:
                    out_dir.mkdir(parents=True)
                    path = user(out_dir / "model.onnx")
                row = judge(original, path, evaluation, BATCHES)
            except Exception as exc:  # a failure is a finding: show it in the table
                traceback.print_exc()
                row = {"error": f"fails: {type(exc).__name__}: {str(exc)[:120]}"}
            line = cells(f"digits CNN, {label}", by, row, base, BATCHES)
            print("| " + " | ".join(line) + " |", flush=True)
            rows.append(line)
    return rows


def yolox_rows(tmp: Path) -> list[list[str]]:
    from PIL import Image

    path = MODELS / "yolox-nano" / "yolox_nano.onnx"
    if not path.is_file():
        print(f"skipping YOLOX-nano: {path} is absent")
        return []
    frames = []
    for file in sorted((MODELS / "images").glob("0*.jpg")):
        image = np.asarray(Image.open(file).convert("RGB").resize((416, 416)), np.float32)
        frames.append(image[:, :, ::-1].transpose(2, 0, 1).copy())  # BGR, 0..255, NCHW as the model expects
    images = Dataset({"images": np.stack(frames)}, name="COCO val images")
    base = judge(path, path, images, (1,))
    rows = [cells("YOLOX-nano (original)", "—", base, base, (1,))]
    try:
        out, _details = modelpress("prune.channels", {"ratio": 0.5}, path, None, tmp / "yolox-channels-50")
        row = judge(path, out, images, (1,))
    except Exception as exc:
        traceback.print_exc()
        row = {"error": f"fails: {type(exc).__name__}: {str(exc)[:120]}"}
    rows.append(cells("YOLOX-nano, channels 50%, no fine-tuning", "ModelPress", row, base, (1,)))
    print("| " + " | ".join(rows[-1]) + " |", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", default="", help="comma-separated: digits,yolox")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    only = set(filter(None, args.only.split(","))) or {"digits", "yolox"}
    started = time.time()
    header = ["model", "by", "params (ratio)", "MACs at batch 1 (ratio)", "ONNX size", "zstd size",
              "p50 batch 1", "p50 batch 64", "accuracy / fidelity"]
    rows: list[list[str]] = []
    with tempfile.TemporaryDirectory() as tmp_name, contextlib.chdir(tmp_name):
        tmp = Path(tmp_name)
        if "digits" in only:
            rows += digits_rows(tmp, args.epochs)
        if "yolox" in only:
            rows += [r[:7] + ["n/a (batch fixed at 1)"] + r[7:] for r in yolox_rows(tmp)]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    publish("Pruning: ModelPress vs a user's Torch-Pruning / torch.nn.utils.prune script",
            f"Both sides fine-tune {args.epochs} epochs at lr {LR}, batch {BATCH}, on the same 1200 training digits; "
            "accuracy on the 397 held-out digits; latency measured against the original in one process, "
            "interleaved (in brackets: original p50 / result p50). Params and MACs counted from the ONNX graph "
            "(MACs of Conv/Gemm/MatMul at batch 1); zstd at level 19.",
            "\n".join(lines), started=started, write=not args.no_write)


if __name__ == "__main__":
    main()
