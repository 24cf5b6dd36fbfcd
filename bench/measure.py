"""Benchmark of the measuring harness itself (issue 6): does it tell nothing from something?

1. The same model against itself, `--repeats` times (default 20), each a whole job measurement as a worker
   runs it (a fresh pinned child process, warm-up, ABBA rounds): the speedup must be 1.00 and its 95%
   interval must contain 1.00 in at least 19 of 20 repetitions.
2. An MLP against the same MLP with twice the layers (twice the multiply-adds): the harness must see about
   2x, with an interval that does not contain 1.00.

    .venv/bin/python bench/measure.py [--repeats 20] [--iterations 300] [--no-write]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.results import publish  # noqa: E402
from workers.measure.isolated import measure_isolated  # noqa: E402

BATCHES = (1, 32)
WIDTH = 512


def mlp(path: Path, layers: int) -> Path:
    """`layers` Linear(512, 512) + ReLU blocks; all weights drawn from one seed, so the deeper model's first
    layers are the shallower one's."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, weights, source = [], [], "x"
    for i in range(layers):
        weights.append(numpy_helper.from_array(
            (rng.standard_normal((WIDTH, WIDTH)) / np.sqrt(WIDTH)).astype(np.float32), f"w{i}"))
        nodes += [helper.make_node("MatMul", [source, f"w{i}"], [f"m{i}"]),
                  helper.make_node("Relu", [f"m{i}"], [f"h{i}"])]
        source = f"h{i}"
    graph = helper.make_graph(nodes, f"mlp{layers}",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", WIDTH])],
                              [helper.make_tensor_value_info(source, TensorProto.FLOAT, ["batch", WIDTH])],
                              initializer=weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def measured(baseline: Path, result: Path, iterations: int) -> dict[int, dict]:
    report = measure_isolated(baseline, result, batch_sizes=list(BATCHES), warmup=max(10, iterations // 10),
                              iterations=iterations)
    return {entry["batch_size"]: entry for entry in report["latency"]["batch_sizes"]}


def contains_one(entry: dict) -> bool:
    interval = entry["speedup_ci"]
    return interval["low"] is not None and interval["low"] <= 1.0 <= interval["high"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    started = time.time()
    rows, hits = [], dict.fromkeys(BATCHES, 0)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        four, eight = mlp(tmp / "mlp4.onnx", 4), mlp(tmp / "mlp8.onnx", 8)
        for repeat in range(1, args.repeats + 1):
            by_batch = measured(four, four, args.iterations)
            cells = []
            for batch in BATCHES:
                entry = by_batch[batch]
                hits[batch] += contains_one(entry)
                cells.append(f"{entry['speedup_text']}{'' if contains_one(entry) else ' (excludes 1.00)'}"
                             f" · CV {entry['baseline']['cv']:.0%}/{entry['result']['cv']:.0%}")
            rows.append([f"itself, repetition {repeat}"] + cells)
            print("| " + " | ".join(rows[-1]) + " |", flush=True)
        twice = []
        for repeat in range(1, 4):
            by_batch = measured(eight, four, args.iterations)   # the 4-layer model is the "result"
            cells = []
            for batch in BATCHES:
                entry = by_batch[batch]
                twice.append((batch, entry))
                cells.append(f"{entry['speedup_text']}"
                             f" (p50 {entry['baseline']['p50_ms']:.3f} → {entry['result']['p50_ms']:.3f} ms)")
            rows.append([f"8 layers → 4 layers (half the work), repetition {repeat}"] + cells)
            print("| " + " | ".join(rows[-1]) + " |", flush=True)
    header = ["comparison"] + [f"speedup (95% CI) at batch {b}" for b in BATCHES]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    read = ["- The model against itself: the interval contains 1.00 in "
            + ", ".join(f"{hits[b]} of {args.repeats} repetitions at batch {b}" for b in BATCHES)
            + f" (goal: at least {args.repeats - args.repeats // 20} of {args.repeats}: "
            + ("**met**" if all(hits[b] >= args.repeats - args.repeats // 20 for b in BATCHES) else "**not met**")
            + ")."]
    for batch in BATCHES:
        seen = [e["speedup"] for b, e in twice if b == batch]
        excluded = all(not contains_one(e) for b, e in twice if b == batch)
        read.append(f"- Half the work at batch {batch}: {min(seen):.2f}x to {max(seen):.2f}x, the interval "
                    + ("excluding" if excluded else "not always excluding") + " 1.00 (expected: about 2x, where "
                    "the time is the multiply-adds' rather than the per-call overhead's).")
    publish("The measuring harness: a model against itself, and half the work",
            f"Each row is one job measurement as a worker runs it: a fresh child process pinned to cores, "
            f"warm-up, then {args.iterations} calls per model in ABBA rounds; the interval is the 95% paired "
            f"bootstrap over rounds. MLPs of {WIDTH}-wide MatMul+ReLU layers (4 and 8 layers).",
            "\n".join(lines) + "\n\n" + "\n".join(read), started=started, write=not args.no_write)


if __name__ == "__main__":
    main()
