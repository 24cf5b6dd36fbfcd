"""Benchmark: quantize.int8_dynamic on the real pretrained models, measured side by side.

Runs the same method and measurement code a worker runs (no HTTP), repeats the
measurement, prints a table and appends it with the machine to bench/RESULTS.md.

    .venv/bin/python bench/int8_dynamic.py [--repeats 3] [--iterations 200] [--no-write]
"""
from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MODELS = ROOT.parent / "shared" / "models"

from bench.common import mlp_onnx_bytes  # noqa: E402
from workers import methods  # noqa: E402
from workers.measure import measure_pair  # noqa: E402


def candidates(tmp: Path) -> list[tuple[str, Path, list[int]]]:
    mlp = tmp / "mlp.onnx"
    mlp.write_bytes(mlp_onnx_bytes(in_features=256, hidden=1024))
    found = [("mlp-256-1024 (torch export)", mlp, [1, 32])]
    for name, rel in (("opt-mnist", "mnist-cnn/opt-mnist.onnx"), ("ultraface-rfb320", "ultraface-rfb320/version-RFB-320.onnx"),
                      ("yolox-nano", "yolox-nano/yolox_nano.onnx")):
        if (MODELS / rel).is_file():
            found.append((name, MODELS / rel, [1]))
    return found


def real_input(label: str):
    """A real image prepared the way each model expects (../shared/models/README.md), or None."""
    import numpy as np
    from PIL import Image

    images = MODELS / "images"
    if label == "opt-mnist":
        img = Image.open(images / "mnist_7.jpg").convert("L").resize((28, 28))
        return {"Input3": np.asarray(img, dtype=np.float32)[None, None]}
    if label == "yolox-nano":
        img = Image.open(images / "000000000139.jpg").convert("RGB").resize((416, 416))
        return {"images": np.asarray(img)[:, :, ::-1].transpose(2, 0, 1)[None].astype(np.float32)}
    if label == "ultraface-rfb320":
        img = Image.open(images / "000000000285.jpg").convert("RGB").resize((320, 240))
        return {"input": ((np.asarray(img, dtype=np.float32) - 127.0) / 128.0).transpose(2, 0, 1)[None]}
    return None


def real_cosine(label: str, original: Path, compressed: Path) -> str:
    import numpy as np
    import onnxruntime as ort

    feeds = real_input(label)
    if feeds is None:
        return "n/a"
    outs = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, feeds)
            for p in (original, compressed)]
    cosines = [float(np.dot(a.ravel(), b.ravel()) / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))
               for a, b in zip(*outs)]
    return f"{min(cosines):.4f}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    method = methods.get("quantize.int8_dynamic")
    rows, env = [], None
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for label, path, batch_sizes in candidates(tmp):
            out_dir = tmp / f"out-{len(rows)}"
            out_dir.mkdir()
            result = method.run(path, method.params_model(), out_dir, methods.StepContext())
            runs = [measure_pair(path, result.model_path, batch_sizes=batch_sizes, warmup=args.warmup,
                                 iterations=args.iterations, seed=rep) for rep in range(args.repeats)]
            env = runs[0]["environment"]
            real = real_cosine(label, path, result.model_path)
            for batch in runs[0]["latency"]["batch_sizes"]:
                b = batch["batch_size"]
                per = [next(x for x in r["latency"]["batch_sizes"] if x["batch_size"] == b) for r in runs]
                rows.append({
                    "model": label, "batch": b,
                    "size_before": runs[0]["size"]["baseline"]["file_bytes"],
                    "size_after": runs[0]["size"]["result"]["file_bytes"],
                    "p50_before": statistics.median(p["baseline"]["p50_ms"] for p in per),
                    "p50_after": statistics.median(p["result"]["p50_ms"] for p in per),
                    "speedups": [p["speedup"] for p in per],
                    "cosine": runs[0]["fidelity"]["cosine_similarity"], "real": real,
                    "top1": next((o["top1_agreement"] for o in runs[0]["fidelity"]["outputs"]
                                  if o.get("top1_agreement") is not None), None),
                })

    header = ("| model | batch | size before | size after | p50 before (ms) | p50 after (ms) | speedup (median of "
              f"{args.repeats}; min-max) | cosine (generated inputs) | cosine (real image) | top-1 agree |")
    lines = [header, "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        s = r["speedups"]
        top1 = "n/a" if r["top1"] is None else f"{r['top1']:.3f}"
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['size_before'] / 1024:.1f} KiB | {r['size_after'] / 1024:.1f} KiB "
            f"({r['size_after'] / r['size_before']:.2f}x) | {r['p50_before']:.3f} | {r['p50_after']:.3f} | "
            f"{statistics.median(s):.2f}x ({min(s):.2f}-{max(s):.2f}) | {r['cosine']:.4f} | {r['real']} | "
            f"{top1} |"
        )
    table = "\n".join(lines)
    machine = (f"{env['cpu']}, {env.get('physical_cores')} physical / {env.get('logical_cores')} logical cores, "
               f"onnxruntime {env['onnxruntime']}, {env.get('provider', 'CPUExecutionProvider')}, "
               f"{env['threads']} threads")
    print(table)
    print(machine)
    if not args.no_write:
        with open(ROOT / "bench" / "RESULTS.md", "a") as fh:
            fh.write(f"\n## quantize.int8_dynamic — {dt.date.today().isoformat()}\n\n"
                     f"`{' '.join(['.venv/bin/python', 'bench/int8_dynamic.py'] + sys.argv[1:])}` "
                     f"(warm-up {args.warmup}, {args.iterations} iterations per model per repeat, baseline and result "
                     f"interleaved in one process; speedup = p50 before / p50 after; the real-image cosine is the lowest "
                     f"over the model's outputs)\n\nMachine: {machine}\n\n{table}\n")


if __name__ == "__main__":
    main()
