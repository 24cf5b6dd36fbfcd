"""Benchmark (issue 22, part 4): the LiteRT target's exports at f32, f16 and full-integer int8 beside the ONNX
original on ONNX Runtime fp32, measured as a litert job measures them.

Per model: one onnx2tf conversion to the f32 and f16 .tflite files (workers.litert.export, the job's exporter), a
second for int8 calibrated on the model's calibration samples (a model whose int8 fails still has its float rows);
then, per precision, the job's harness (workers.measure.measure_pair with target litert.cpu.<precision>): the
original on ONNX Runtime fp32, the original on LiteRT f32 and the export take turns in one process, so each row's
ratios come from interleaved calls on the same inputs (LiteRT's own gain, the precision's, and the total, each with
its bootstrap 95% interval); fidelity against ONNX Runtime fp32 on the model's samples, top-1 where they have
labels. The original's f32 file is the one the f32/f16 conversion wrote beside it, as in a job.

Models (bench/quantize.py's cases): the digits CNN trained here (eval on 297 held-out digits, calibration on 100
others), opt-mnist and YOLOX-nano from ../shared/models, each copied into a temporary folder first (onnx2tf
writes over the file it is given, and the exports are written beside the model). Ultra-Light's face detector is
known not to convert (README); `--only ultraface` shows the refusal.

    .venv/bin/python bench/litert.py [--only digits-cnn,opt-mnist,yolox-nano] [--quick] [--threads N] [--no-write]

--quick: batch 1, 10 timed calls per model: checks that everything runs, not a figure to record.
The table, with the machine, is appended to bench/RESULTS.md unless --no-write.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.quantize import Case, cases  # noqa: E402
from bench.results import publish  # noqa: E402

TITLE = "LiteRT target: f32 / f16 / int8 .tflite beside ONNX Runtime fp32 (issue 22, part 4)"
DEFAULT = ("digits-cnn", "opt-mnist", "yolox-nano")
PRECISIONS = ("f32", "f16", "int8")
MAX_CALIBRATION = 300
HEADER = ("| model | precision | batch | ORT fp32 p50 ms | LiteRT f32 p50 ms | export p50 ms | export vs ORT fp32 "
          "(95% CI) | LiteRT's own gain (95% CI) | the precision's gain (95% CI) | .tflite MB (x ONNX) | worst cosine "
          "| top-1 original -> export |\n|" + " --- |" * 12)


def private_copy(case: Case, folder: Path) -> Path:
    """The case's model copied into `folder`: never hand a file of ../shared/models to onnx2tf or write beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    copy = folder / case.path.name
    shutil.copyfile(case.path, copy)
    return copy


def calibration_feeds(case: Case) -> list[dict[str, Any]]:
    """One feed per sample, batch 1, as the job's calibration source gives the converter."""
    inputs = case.calibration.inputs
    count = min(MAX_CALIBRATION, min(len(v) for v in inputs.values()))
    return [{name: array[i:i + 1] for name, array in inputs.items()} for i in range(count)]


def exports(model: Path, case: Case) -> tuple[dict[str, Path], dict[str, str]]:
    """precision -> .tflite, and precision -> why it is missing. f32 and f16 from one conversion, into the folder
    the measurement's runtime role reads the original's f32 file from; int8 from a conversion of its own."""
    from app.errors import JobFailed
    from workers.litert.export import export
    from workers.litert.job import export_folder

    paths: dict[str, Path] = {}
    missing: dict[str, str] = {}
    for precisions, folder, calibration in ((["f32", "f16"], export_folder(model), None),
                                            (["int8"], model.parent / "int8", calibration_feeds(case))):
        started = time.perf_counter()
        try:
            done = export(model, folder, precisions, calibration=calibration)
        except JobFailed as failed:
            for precision in precisions:
                missing[precision] = f"{failed.code}: {failed.message[:160]}"
            continue
        paths.update(done.paths)
        print(f"  exported {'+'.join(precisions)} in {time.perf_counter() - started:.1f} s", flush=True)
    return paths, missing


def measure(model: Path, tflite: Path, case: Case, precision: str, *, quick: bool, threads: int | None) -> list[str]:
    from workers.measure import MeasureSpec, measure_pair

    batch_sizes = [1] if quick else list(case.batch_sizes)
    rows = []
    for batch in batch_sizes:  # one harness per batch size: the cases give each its own number of calls
        iterations = 10 if quick else case.iterations[batch]
        report = measure_pair(model, tflite, MeasureSpec(
            batch_sizes=[batch], warmup=2 if quick else max(2, iterations // 10), iterations=iterations,
            threads=threads, dataset=case.eval,
            target={"runtime": "litert", "device": "cpu", "precision": precision}))
        entry = report["latency"]["batch_sizes"][0]
        on_data = report.get("dataset") or {}
        fidelity = on_data.get("fidelity") or {}
        worst = fidelity.get("worst_cosine", report["fidelity"].get("worst_sample_cosine"))
        accuracy = on_data.get("accuracy")
        top1 = (f"{100 * accuracy['original']['top1']:.2f}% -> {100 * accuracy['compressed']['top1']:.2f}%"
                if accuracy else "n/a (no labels)")
        size = report["size"]
        rows.append(
            f"| {case.name} | {precision} | {batch} | {entry['baseline']['p50_ms']:.3f} | "
            f"{entry['runtime']['p50_ms']:.3f} | {entry['result']['p50_ms']:.3f} | {entry['speedup_text']} | "
            f"{entry['runtime_speedup_text']} | {entry['compression_speedup_text']} | "
            f"{size['result']['file_bytes'] / 1e6:.3f} ({size['ratio']:.2f}) | "
            f"{'n/a' if worst is None else f'{worst:.6f}'} | {top1} |")
        print("  " + rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="comma-separated case keys (default: " + ",".join(DEFAULT) + ")")
    parser.add_argument("--quick", action="store_true", help="batch 1 and 10 calls: a check that it runs")
    parser.add_argument("--threads", type=int, default=None, help="threads of every runtime (default: the worker's)")
    parser.add_argument("--no-write", action="store_true", help="print only; do not append to bench/RESULTS.md")
    args = parser.parse_args()
    started = time.time()
    wanted = set(args.only.split(",")) if args.only else set(DEFAULT)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-litert-") as scratch:
        tmp = Path(scratch)
        found = cases(tmp, wanted)
        if not found:
            raise SystemExit(f"none of {sorted(wanted)} is available (../shared/models absent?)")
        for case in found:
            print(case.name, flush=True)
            model = private_copy(case, tmp / case.name.split()[0])
            paths, missing = exports(model, case)
            for precision in PRECISIONS:
                if precision in missing:
                    rows.append(f"| {case.name} | {precision} | | | | | not exported: {missing[precision]} |"
                                + " |" * 5)
                    continue
                rows += measure(model, paths[precision], case, precision, quick=args.quick, threads=args.threads)
    how = ("Each row is one run of the job's harness (workers.measure.measure_pair, target litert.cpu.<precision>): "
           "the original on ONNX Runtime fp32, the original on LiteRT f32 (XNNPACK) and the export interleaved in "
           "one process; ratios of medians with bootstrap 95% intervals; fidelity against ONNX Runtime fp32 on the "
           "model's samples; int8 calibrated on the samples bench/quantize.py's cases name.")
    if args.quick:
        how += " --quick: batch 1, 10 calls: a check that it runs, not a figure to rely on."
    publish(TITLE, how, HEADER + "\n" + "\n".join(rows), started=started, write=not args.no_write)


if __name__ == "__main__":
    main()
