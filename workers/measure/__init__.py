"""Measure an original and a compressed ONNX model side by side, in one process.

Both sessions stay open together and take turns: per batch size, a warm-up for
each, then rounds in which each model runs a block of iterations, the first
model swapping every round (ABBA) so drift and cache effects land on both.
Every figure is measured here or is null with a reason; see DESIGN.md,
"Measurements are the product".

    measured = measure_pair(original, compressed, batch_sizes=[1, 8], warmup=10, iterations=100)

Keys: environment, inputs, size, latency, fidelity, energy, memory, notes,
measurements (flat rows for the measurements table).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from app.errors import MeasurementFailed
from workers.measure.accuracy import evaluate_dataset
from workers.measure.energy import EnergyMeter, open_counter
from workers.measure.environment import default_threads, describe
from workers.measure.fidelity import OutputComparison, pair_outputs, summarize_outputs
from workers.measure.inputs import ROLES, InputPlan, plan_inputs
from workers.measure.latency import choose_rounds, round_order, split, summarize, time_runs
from workers.measure.memory import RUNS as MEMORY_RUNS
from workers.measure.memory import measure_memory
from workers.measure.runtime import ROLE_NAMES, open_session, ort_error_text, resolve_providers
from workers.measure.size import load_structure, model_size

__all__ = ["Stopped", "measure_pair"]

FIDELITY_SAMPLES = 16
FIDELITY_MAX_BATCH = 16
LATENCY_METRICS = ("p50_ms", "p90_ms", "p99_ms", "mean_ms", "stdev_ms", "min_ms", "throughput_per_s")
UNITS = {"throughput_per_s": "samples/s"}


class Stopped(Exception):
    """should_stop() returned True at a round boundary; nothing was measured to the end."""


class _Progress:
    def __init__(self, callback: Callable[[float, str], None] | None) -> None:
        self.callback, self.total, self.done = callback, 1.0, 0.0

    def advance(self, units: float, message: str) -> None:
        self.done += units
        if self.callback:
            self.callback(min(1.0, self.done / self.total), message)


def measure_pair(
    baseline: Path,
    result: Path,
    *,
    batch_sizes: list[int],
    warmup: int,
    iterations: int,
    providers: list[str] | None = None,
    threads: int | None = None,
    seed: int = 0,
    on_progress: Callable[[float, str], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    dataset: Any = None,
    dataset_max_samples: int | None = None,
) -> dict[str, Any]:
    """Size, latency, fidelity, energy and memory of `result` against `baseline`.

    iterations is the number of timed calls per model and batch size; warmup the
    untimed calls before them (each model also makes one untimed check call per
    batch size first). With a `dataset` (workers.datasets.Dataset), both models also
    run over its samples: accuracy against its labels, fidelity on its inputs. Raises MeasurementFailed when the models cannot be loaded,
    run or compared, Stopped when should_stop() says so.
    """
    requested = sorted({int(b) for b in batch_sizes})
    if not requested or requested[0] < 1:
        raise ValueError(f"batch sizes must be positive integers, got {batch_sizes}")
    if iterations < 1 or warmup < 0:
        raise ValueError(f"need iterations >= 1 and warmup >= 0, got {iterations} and {warmup}")
    paths = {"baseline": Path(baseline), "result": Path(result)}
    progress = _Progress(on_progress)

    def checkpoint() -> None:
        if should_stop is not None and should_stop():
            raise Stopped()

    notes: list[str] = []
    ort_providers, provider_notes = resolve_providers(providers)
    notes += provider_notes
    threads = int(threads) if threads else default_threads()
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")

    structures = {role: load_structure(paths[role], role_name=ROLE_NAMES[role]) for role in ROLES}
    size = _size_report(paths, structures, notes)
    sessions = {role: open_session(paths[role], role=role, providers=ort_providers, threads=threads)
                for role in ROLES}
    provider = _provider_used(sessions, ort_providers[0], notes)
    plan = plan_inputs(sessions, structures)
    del structures  # the parsed protobufs can be as large as the weights
    notes += plan.notes
    output_pairs, output_notes = pair_outputs(sessions["baseline"], sessions["result"])
    notes += output_notes

    to_measure, skipped = _batch_sizes_to_measure(requested, plan, notes)
    progress.advance(0, "checking that both models run")
    working = _check_runs(sessions, plan, to_measure, seed, skipped, checkpoint)

    fidelity_batch = max((b for b in working if b <= FIDELITY_MAX_BATCH), default=working[0])
    fidelity_runs = math.ceil(FIDELITY_SAMPLES / fidelity_batch)
    memory_batch = working[-1]
    dataset_samples = 0 if dataset is None else min(len(dataset), dataset_max_samples or len(dataset))
    progress.total = (sum(2 * b * (warmup + iterations) for b in working) + 2 * fidelity_batch * fidelity_runs
                      + 2 * memory_batch * (MEMORY_RUNS + 2) + 2 * dataset_samples)

    fidelity = _fidelity(sessions, plan, output_pairs, fidelity_batch, fidelity_runs, seed, progress, checkpoint)
    on_dataset = None
    if dataset is not None:
        on_dataset = evaluate_dataset(
            sessions, plan, output_pairs, dataset, max_samples=dataset_max_samples, checkpoint=checkpoint,
            on_batch=lambda n: progress.advance(2 * n, f"evaluating on dataset {dataset.name or ''}".rstrip()),
        )
        notes += on_dataset["notes"]
    meter = EnergyMeter(*open_counter(provider))
    latency = {"provider": provider, "threads": threads}
    latency.update(_latency(sessions, plan, working, warmup, iterations, seed, meter, progress, checkpoint))
    latency["skipped"] = skipped
    checkpoint()
    memory = measure_memory(paths, plan.feeds(memory_batch, np.random.default_rng([seed, 3, memory_batch])),
                            batch_size=memory_batch, providers=ort_providers, threads=threads)
    progress.advance(2 * memory_batch * (MEMORY_RUNS + 2), "measured memory")
    energy = meter.report(iterations)

    notes += _findings(size, latency, fidelity, memory, on_dataset)
    report = {
        "environment": describe(provider=provider, threads=threads),
        "inputs": [i.describe() for i in plan.inputs],
        "size": size,
        "latency": latency,
        "fidelity": fidelity,
        "dataset": on_dataset,
        "energy": energy,
        "memory": memory,
        "notes": notes,
    }
    report["measurements"] = _rows(report, provider)
    return report


# --- phases ---------------------------------------------------------------------------------------

def _size_report(paths: dict[str, Path], structures: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    size: dict[str, Any] = {role: model_size(paths[role], structures[role]) for role in ROLES}
    base, res = size["baseline"]["file_bytes"], size["result"]["file_bytes"]
    size["ratio"] = round(res / base, 4) if base else None
    if base and res > base:
        notes.append(f"the compressed model's files are larger than the original's (x{res / base:.2f}: "
                     f"{res} bytes vs {base} bytes)")
    return size


def _provider_used(sessions: dict[str, Any], wanted: str, notes: list[str]) -> str:
    used = {role: sessions[role].get_providers()[0] for role in ROLES}
    if used["baseline"] != used["result"]:
        notes.append(f"ONNX Runtime put the original model on {used['baseline']} and the compressed model on "
                     f"{used['result']}; the latency comparison is across providers")
    if used["baseline"] != wanted:
        notes.append(f"{wanted} was requested but ONNX Runtime ran the models on {used['baseline']}")
    return used["baseline"]


def _batch_sizes_to_measure(requested: list[int], plan: InputPlan, notes: list[str]) -> tuple[list[int], list[dict]]:
    if plan.fixed_batch is None:
        return requested, []
    fixed = plan.fixed_batch
    skipped = [{"batch_size": b, "reason": plan.fixed_reason} for b in requested if b != fixed]
    if fixed not in requested:
        notes.append(f"the models accept only batch {fixed} ({plan.fixed_reason}); measured at batch {fixed} "
                     f"instead of the requested {requested}")
    return [fixed], skipped


def _check_runs(sessions, plan: InputPlan, to_measure: list[int], seed: int, skipped: list[dict],
                checkpoint: Callable[[], None]) -> list[int]:
    """One untimed call per model and batch size; a batch size either model cannot run is skipped."""
    working, failures = [], []
    for batch in to_measure:
        checkpoint()
        feeds = plan.feeds(batch, np.random.default_rng([seed, 1, batch]))
        for role in ROLES:
            try:
                sessions[role].run(None, feeds[role])
            except Exception as exc:
                reason = f"{ROLE_NAMES[role]} fails to run at batch {batch}: {ort_error_text(exc)}"
                failures.append(reason)
                skipped.append({"batch_size": batch, "reason": reason})
                break
        else:
            working.append(batch)
    if not working:
        raise MeasurementFailed("; ".join(failures))
    skipped.sort(key=lambda s: s["batch_size"])
    return working


def _run(session: Any, feed: dict[str, np.ndarray], role: str, batch: int) -> list[Any]:
    try:
        return session.run(None, feed)
    except Exception as exc:
        raise MeasurementFailed(f"{ROLE_NAMES[role]} fails to run at batch {batch}: {ort_error_text(exc)}") from exc


def _fidelity(sessions, plan: InputPlan, output_pairs, batch: int, runs: int, seed: int, progress: _Progress,
              checkpoint: Callable[[], None]) -> dict[str, Any]:
    comparisons = [OutputComparison(name, result_name, dtype) for _, _, name, result_name, dtype in output_pairs]
    rng = np.random.default_rng([seed, 2])
    for run in range(runs):
        checkpoint()
        feeds = plan.feeds(batch, rng)
        outputs = {role: _run(sessions[role], feeds[role], role, batch) for role in ROLES}
        for comparison, (i, j, *_rest) in zip(comparisons, output_pairs):
            comparison.add(outputs["baseline"][i], outputs["result"][j], batch)
        progress.advance(2 * batch, f"comparing outputs: run {run + 1}/{runs}")
    return summarize_outputs(comparisons, batch_size=batch, runs=runs)


def _latency(sessions, plan: InputPlan, working: list[int], warmup: int, iterations: int, seed: int,
             meter: EnergyMeter, progress: _Progress, checkpoint: Callable[[], None]) -> dict[str, Any]:
    blocks = split(iterations, choose_rounds(iterations))
    warmup_blocks = split(warmup, choose_rounds(warmup)) if warmup else []
    per_batch = []
    for batch in working:
        feeds = plan.feeds(batch, np.random.default_rng([seed, 0, batch]))
        for index, count in enumerate(warmup_blocks):
            checkpoint()
            for role in round_order(index):
                time_runs(sessions[role], feeds[role], count)
            progress.advance(2 * batch * count, f"warming up at batch {batch}")
        times: dict[str, list[int]] = {role: [] for role in ROLES}
        for index, count in enumerate(blocks):
            checkpoint()
            for role in round_order(index):
                meter.timed(batch, role, partial(time_runs, sessions[role], feeds[role], count, times[role]))
            progress.advance(2 * batch * count, f"timing batch {batch}: round {index + 1}/{len(blocks)}")
        base_p50 = float(np.median(times["baseline"]))
        result_p50 = float(np.median(times["result"]))
        per_batch.append({
            "batch_size": batch,
            "input_shapes": plan.shapes(batch),
            "baseline": summarize(times["baseline"], batch),
            "result": summarize(times["result"], batch),
            "p50_ratio": round(result_p50 / base_p50, 4),
            "speedup": round(base_p50 / result_p50, 4),
        })
    return {
        "warmup": warmup,
        "iterations": iterations,
        "rounds": len(blocks),
        "order": "per round each model runs a block of iterations; the first model alternates (ABBA)",
        "timer": "time.perf_counter_ns around each InferenceSession.run call (Python call overhead included; "
                 "on a GPU provider, host-device copies of inputs and outputs included)",
        "throughput": "batch_size * 1000 / mean_ms: one caller, calls back to back",
        "check_runs": 1,
        # Spinning is off for both sessions (see runtime.open_session); a lone session
        # with spinning on can be some 10% faster on a small model.
        "thread_spinning": False,
        "batch_sizes": per_batch,
    }


def _findings(size: dict, latency: dict, fidelity: dict, memory: dict, on_dataset: dict | None) -> list[str]:
    """Plain statements of what a reader might otherwise miss."""
    found = []
    for entry in latency["batch_sizes"]:
        speedup = entry["speedup"]
        if speedup < 1:
            line = (f"the compressed model is slower than the original at batch {entry['batch_size']} "
                    f"(x{speedup:.3f}: p50 {entry['result']['p50_ms']:.4g} ms vs {entry['baseline']['p50_ms']:.4g} ms)")
            if speedup >= 0.97:
                line += "; a difference this small is within run-to-run noise"
            found.append(line)
    found.append(f"`fidelity` compares outputs on {fidelity['samples']} synthetic random samples "
                 f"({fidelity['runs']} run(s) at batch {fidelity['batch_size']}), not on a data set: it shows how far "
                 "outputs move, not task accuracy" + ("; `dataset` holds the figures on the job's eval dataset"
                                                      if on_dataset else ""))
    if on_dataset and on_dataset["accuracy"]:
        acc = on_dataset["accuracy"]
        found.append(f"top-1 accuracy on {acc['samples']} dataset samples: {100 * acc['original']['top1']:.2f}% "
                     f"original, {100 * acc['compressed']['top1']:.2f}% compressed "
                     f"({acc['top1_drop_points']:+.2f} points lost)")
    elif on_dataset and on_dataset["accuracy_note"]:
        found.append(on_dataset["accuracy_note"])
    for output in fidelity["outputs"]:
        if "nonfinite_values" in output:
            found.append(f"output '{output['name']}' holds NaN or infinite values ({output['nonfinite_values']}); "
                         "they are left out of the differences")
    if memory.get("reason"):
        found.append(f"memory was not measured: {memory['reason']}")
    return found


def _rows(report: dict[str, Any], provider: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []

    def add(model: str, batch: int | None, metric: str, value: float | None, unit: str) -> None:
        if value is not None:
            rows.append({"model": model, "provider": provider, "batch_size": batch, "metric": metric,
                         "value": float(value), "unit": unit})

    for role in ROLES:
        sized = report["size"][role]
        add(role, None, "file_bytes", sized["file_bytes"], "bytes")
        add(role, None, "parameters", sized["parameters"], "count")
        add(role, None, "initializer_bytes", sized["initializer_bytes"], "bytes")
    for entry in report["latency"]["batch_sizes"]:
        for role in ROLES:
            for metric in LATENCY_METRICS:
                add(role, entry["batch_size"], metric, entry[role][metric], UNITS.get(metric, "ms"))
        add("result", entry["batch_size"], "speedup", entry["speedup"], "x")
    fidelity = report["fidelity"]
    add("result", fidelity["batch_size"], "cosine_similarity", fidelity["cosine_similarity"], "1")
    add("result", fidelity["batch_size"], "max_abs_diff", fidelity["max_abs_diff"], "output units")
    top1 = [o["top1_agreement"] for o in fidelity["outputs"] if o["top1_agreement"] is not None]
    add("result", fidelity["batch_size"], "top1_agreement", min(top1) if top1 else None, "fraction")
    on_dataset = report.get("dataset")
    if on_dataset:
        batch = on_dataset["batch_size"]
        add("result", batch, "dataset_mean_cosine", on_dataset["fidelity"]["mean_cosine"], "1")
        add("result", batch, "dataset_worst_cosine", on_dataset["fidelity"]["worst_cosine"], "1")
        add("result", batch, "dataset_top1_agreement", on_dataset["fidelity"]["top1_agreement"], "fraction")
        if on_dataset["accuracy"]:
            for role, key in (("baseline", "original"), ("result", "compressed")):
                add(role, batch, "top1_accuracy", on_dataset["accuracy"][key]["top1"], "fraction")
                add(role, batch, "top5_accuracy", on_dataset["accuracy"][key]["top5"], "fraction")
    energy = report["energy"]
    for entry in energy.get("batch_sizes", []):
        add("baseline", entry["batch_size"], "energy_per_inference", entry["baseline_j_per_inference"], "J")
        add("result", entry["batch_size"], "energy_per_inference", entry["result_j_per_inference"], "J")
    memory = report["memory"]
    for role in ROLES:
        if memory.get(role):
            add(role, memory["batch_size"], "peak_rss_increase", memory[role]["peak_rss_increase_bytes"], "bytes")
    return rows
