"""Measure an original and a compressed ONNX model side by side, in one process.

Both sessions stay open together and take turns: per batch size, a warm-up for
each, then rounds in which each model runs a block of iterations, the first
model swapping every round (ABBA) so drift and cache effects land on both.
Every figure is measured here or is null with a reason; see DESIGN.md,
"Measurements are the product".

    measured = measure_pair(original, compressed, MeasureSpec(batch_sizes=[1, 8], warmup=10, iterations=100))

The phases, in order: load sessions, plan inputs, check runs (cold start), fidelity and dataset accuracy,
per provider latency and energy, memory, assemble.

Keys: environment, inputs, size, latency, fidelity, energy, memory, notes,
measurements (flat rows for the measurements table).
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from app.errors import MeasurementFailed
from workers.measure.accuracy import evaluate_dataset
from workers.measure.energy import energy_entry, energy_estimate, energy_report, measure_windows, open_counter
from workers.measure.environment import describe, logical_cores
from workers.measure.fidelity import OutputComparison, pair_outputs, summarize_outputs
from workers.measure.latency import (
    SETTLE_S,
    Turns,
    bound_call,
    choose_rounds,
    plain_call,
    round_order,
    runtime_of,
    split,
    time_calls,
)
from workers.measure.memory import RUNS as MEMORY_RUNS
from workers.measure.memory import measure_memory
from workers.measure.rounding import significant
from workers.measure.runtime import (
    ARENA,
    ROLE_NAMES,
    ort_error_text,
    requested_providers,
    session_options,
    session_providers,
    start_provider,
    unavailable_reason,
)
from workers.measure.size import load_structure
from workers.measure.spec import MeasureSpec
from workers.measure.stats import NOISY_CV, show_speedup, speedup_interval, summarize
from workers.measure.targets import MEASURED_ROLES, feed_of, is_lowered, lowered_size
from workers.onnx_tools.graph import model_size
from workers.onnx_tools.inputs import ROLES, InputPlan, plan_inputs

__all__ = ["MeasureSpec", "Stopped", "measure_pair"]

FIDELITY_SAMPLES = 16
# The worst sample of 16 random draws is a loose bound on the worst case: on Silero VAD, 16 draws said worst cosine
# 0.9951 for a candidate whose next 16 draws gave 0.9732 (bench/RESULTS.md). Where the model is cheap, fidelity on
# random inputs draws more, up to FIDELITY_MAX_SAMPLES, as many as the first run's pace says fit in FIDELITY_SECONDS.
FIDELITY_MAX_SAMPLES = 256
FIDELITY_SECONDS = 0.5
# Timed calls per model and batch size (and warm-up calls) of a candidate whose outputs broke the search's budget
# (MeasureSpec.brief_below), on one session set: ppocr-det's mixed-precision rungs spent 3.2 s of 5.0 s timing.
BRIEF_ITERATIONS, BRIEF_WARMUP = 10, 1
# Models up to this size (both files) are loaded again during the rounds (see _latency).
REBALANCE_MAX_BYTES = 2 * 1024**3
SESSION_SETS = 6
FIDELITY_MAX_BATCH = 16
LATENCY_METRICS = ("p50_ms", "p90_ms", "p95_ms", "p99_ms", "mean_ms", "stdev_ms", "cv", "min_ms", "throughput_per_s")
UNITS = {"throughput_per_s": "samples/s", "cv": "1"}


class Stopped(Exception):
    """should_stop() returned True at a round boundary; nothing was measured to the end."""


class _Progress:
    def __init__(self, callback: Callable[[float, str], None] | None) -> None:
        self.callback, self.total, self.done = callback, 1.0, 0.0

    def advance(self, units: float, message: str) -> None:
        self.done += units
        if self.callback:
            self.callback(min(1.0, self.done / self.total), message)


@dataclass
class _Measuring:
    """One measurement under way: the checked spec, the two models' paths, and what the phases add."""

    spec: MeasureSpec
    paths: dict[str, Path]
    progress: _Progress
    notes: list[str] = field(default_factory=list)

    @property
    def threads(self) -> int:
        return int(self.spec.threads or 1)  # resolved by MeasureSpec.checked

    def checkpoint(self) -> None:
        if self.spec.should_stop is not None and self.spec.should_stop():
            raise Stopped()


def measure_pair(baseline: Path, result: Path, spec: MeasureSpec | None = None, **options: Any) -> dict[str, Any]:
    """Size, latency, fidelity, energy and memory of `result` against `baseline`, as `spec` asks (a
    MeasureSpec, or its fields as keyword arguments).

    Each model also makes one untimed check call per batch size first, timed as its cold start. Latency and
    energy are measured on every provider asked for, CPU always; a provider that cannot start is listed with
    ONNX Runtime's reason and nothing is measured on it. Fidelity, dataset accuracy and memory are taken on the
    first provider that starts. The report's `input_shapes` and `input_shapes_source` say what was measured and
    where each size came from. Raises MeasurementFailed when the models cannot be loaded, run or compared
    (InputShapeRequired when the original does not run at guessed sizes), Stopped when should_stop() says so.

    The per-call times are in report["samples"] (nanoseconds, per provider, batch size, model and round):
    they belong in an artifact, not in the job row.
    """
    if spec is None:
        spec = MeasureSpec(**options)
    elif options:
        raise TypeError(f"give a MeasureSpec or its fields, not both (got {sorted(options)} beside the spec)")
    run = _Measuring(spec=spec.checked(), paths={"baseline": Path(baseline), "result": Path(result)},
                     progress=_Progress(spec.on_progress))
    structures = {role: load_structure(run.paths[role], role_name=ROLE_NAMES[role]) for role in ROLES
                  if not is_lowered(run.paths[role])}
    size = _size_report(run.paths, structures, run.notes)
    structures.setdefault("result", structures["baseline"])  # an IR result: the inputs are the original's
    started = _load_sessions(run)
    running = [e for e in started if e["available"]]
    primary = running[0]
    plan, output_pairs = _plan(run, primary["sessions"], structures)
    del structures  # the parsed protobufs can be as large as the weights
    working = _check_all(run, running, plan)
    fidelity, on_dataset = _outputs(run, primary["sessions"], plan, output_pairs, working)
    brief = _brief(run.spec, fidelity, on_dataset)
    rebalance = size["baseline"]["file_bytes"] + size["result"]["file_bytes"] <= REBALANCE_MAX_BYTES and not brief
    samples: dict[str, Any] = {"unit": "ns", "what": "per-call times, per provider, batch size, model and "
                               "round (the rounds alternate which model goes first)", "providers": {}}
    provider_reports = []
    for entry in started:
        if not entry["available"]:
            provider_reports.append({"provider": entry["provider"], "available": False, "reason": entry["reason"]})
            continue
        measured, samples["providers"][entry["provider"]] = _measure_provider(run, entry, plan, rebalance, brief)
        provider_reports.append(measured | {"primary": entry is primary})
        entry.pop("sessions")  # this provider's sessions close before the next provider's are timed
    first = next(r for r in provider_reports if r.get("primary"))
    memory = _memory(run, plan, working[-1], first["provider"], first_entry=started[0]) if run.spec.memory else {
        "batch_size": working[-1], "unit": "bytes", "baseline": None, "result": None, "ratio": None, "asked": False,
        "reason": "not asked for (a goal search's candidate: its memory is measured if it is handed over)"}
    return _assemble(run, plan, working, size, provider_reports, first, fidelity, on_dataset, memory, samples)


# --- phases ---------------------------------------------------------------------------------------

def _load_sessions(run: _Measuring) -> list[dict[str, Any]]:
    """Start every provider asked for; one that cannot start is reported, never replaced by another. On a target
    runtime (spec.target), the one entry of workers.measure.targets instead."""
    _warm_up_runtime(run.threads)
    if run.spec.target is not None:
        from workers.measure.targets import load_target

        return [load_target(run.spec.target, run.paths, threads=run.threads)]
    started: list[dict[str, Any]] = []
    for provider in requested_providers(run.spec.providers):
        entry: dict[str, Any] = {"provider": provider, "available": False, "reason": unavailable_reason(provider)}
        started.append(entry)
        if entry["reason"]:
            continue
        sessions, load_ms = {}, {}
        for role in ROLES:
            clock = time.perf_counter()
            session, why = start_provider(run.paths[role], role=role, provider=provider, threads=run.threads)
            if session is None:
                entry["reason"] = why
                break
            sessions[role], load_ms[role] = session, (time.perf_counter() - clock) * 1000
        else:
            entry.update(available=True, sessions=sessions, load_ms=load_ms)
    for entry in started:
        if not entry["available"]:
            run.notes.append(f"{entry['provider']} was asked for and is not measured: {entry['reason']}")
    if not any(e["available"] for e in started):
        raise MeasurementFailed("no execution provider could start: " + "; ".join(e["reason"] for e in started))
    return started


def _plan(run: _Measuring, sessions: dict[str, Any], structures: dict[str, Any]) -> tuple[InputPlan, list]:
    """The inputs both models are fed (sizes of dynamic dims, values), and which outputs compare."""
    plan = plan_inputs(sessions, structures, shapes=run.spec.input_shapes, probe=False)  # _check_runs runs them
    run.notes += plan.notes
    output_pairs, output_notes = pair_outputs(sessions["baseline"], sessions["result"])
    run.notes += output_notes
    return plan, output_pairs


def _check_all(run: _Measuring, running: list[dict[str, Any]], plan: InputPlan) -> list[int]:
    """The batch sizes the first provider measures; each provider's entry gets its own working sizes, skipped
    sizes and first-call times. Sets the progress bar's total from them."""
    to_measure, skipped = _batch_sizes_to_measure(run.spec.batch_sizes, plan, run.notes)
    run.progress.advance(0, "checking that both models run")
    for entry in running:
        entry["skipped"] = list(skipped)
        entry["working"], entry["first_run_ms"] = _check_runs(entry["sessions"], plan, to_measure, run.spec.seed,
                                                             entry["skipped"], run.checkpoint)
    working = running[0]["working"]
    spec = run.spec
    fidelity_batch = _fidelity_batch(working)
    dataset_samples = 0 if spec.dataset is None else min(len(spec.dataset),
                                                         spec.dataset_max_samples or len(spec.dataset))
    run.progress.total = (sum(2 * b * (spec.warmup + spec.iterations) for e in running for b in e["working"])
                          + 2 * fidelity_batch * math.ceil(FIDELITY_SAMPLES / fidelity_batch)
                          + 2 * working[-1] * (MEMORY_RUNS + 2) + 2 * dataset_samples)
    return working


def _fidelity_batch(working: list[int]) -> int:
    return max((b for b in working if b <= FIDELITY_MAX_BATCH), default=working[0])


def _outputs(run: _Measuring, sessions: dict[str, Any], plan: InputPlan, output_pairs: list,
             working: list[int]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Fidelity on random inputs, and (with a dataset) accuracy and fidelity on its samples."""
    batch = _fidelity_batch(working)
    fidelity = _fidelity(sessions, plan, output_pairs, batch, math.ceil(FIDELITY_SAMPLES / batch), run.spec.seed,
                         run.progress, run.checkpoint)
    if "runtime" in sessions:  # the original on the target runtime at f32, against ONNX Runtime: the runtime's share
        fidelity["runtime"] = _fidelity({"baseline": sessions["baseline"], "result": sessions["runtime"]}, plan,
                                        output_pairs, batch, math.ceil(FIDELITY_SAMPLES / batch), run.spec.seed,
                                        _Progress(None), run.checkpoint)
    dataset = run.spec.dataset
    if dataset is None:
        return fidelity, None
    on_dataset = evaluate_dataset(
        sessions, plan, output_pairs, dataset, max_samples=run.spec.dataset_max_samples, checkpoint=run.checkpoint,
        on_batch=lambda n: run.progress.advance(2 * n, f"evaluating on dataset {dataset.name or ''}".rstrip()),
    )
    run.notes += on_dataset["notes"]
    return fidelity, on_dataset


def _brief(spec: MeasureSpec, fidelity: dict[str, Any], on_dataset: dict[str, Any] | None) -> str | None:
    """Why the latency is timed in brief (MeasureSpec.brief_below), or None. The figure is the one the verdict
    (workers.verdict._fidelity) reads: on the dataset where there is one, else on random inputs; the worst
    sample's cosine, else the mean cosine."""
    if on_dataset:
        worst, mean = on_dataset["fidelity"].get("worst_cosine"), on_dataset["fidelity"].get("mean_cosine")
    else:
        worst, mean = fidelity.get("worst_sample_cosine"), fidelity.get("cosine_similarity")
    worst = mean if worst is None else worst
    if spec.brief_below is None or worst is None or worst >= spec.brief_below:
        return None
    return (f"timed in brief ({min(spec.iterations, BRIEF_ITERATIONS)} calls per model, one session set): the "
            f"outputs' cosine {worst:.4f} is below the search's budget {spec.brief_below:g}, so this candidate "
            "cannot be handed over and its interval is evidence only")


def _measure_provider(run: _Measuring, entry: dict[str, Any], plan: InputPlan,
                      rebalance: bool, brief: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(latency, energy and cold start on one provider; its raw per-call samples). `brief`: why the latency is
    timed in brief (BRIEF_ITERATIONS), or None."""
    spec, provider = run.spec, entry["provider"]
    # A CPU target runtime takes host arrays like ONNX Runtime's CPU provider: nothing to bind on a device; a GPU
    # target's entry says on_device.
    on_device = provider != "CPUExecutionProvider" and ("target" not in entry or bool(entry.get("on_device")))
    warmup, iterations = spec.warmup, spec.iterations
    if brief:
        warmup, iterations = min(warmup, BRIEF_WARMUP), min(iterations, BRIEF_ITERATIONS)
        # The calls left out still count toward the progress bar's total.
        run.progress.advance(sum(2 * b * (spec.warmup + spec.iterations - warmup - iterations)
                                 for b in entry["working"]), "timing in brief: the outputs broke the budget")
    latency, kept = _latency(entry, plan, warmup, iterations, spec.seed, run.progress, run.checkpoint,
                             sets=spec.session_sets or SESSION_SETS,
                             bound=on_device and not spec.include_io,
                             reopen=(entry["reopen"] if "reopen" in entry else
                                     _reopener(run.paths, provider, run.threads)) if rebalance else None)
    latency.update(provider=provider, threads=run.threads, skipped=entry["skipped"],
                   include_io=spec.include_io if on_device else True, **({"brief": brief} if brief else {}))
    measured = {"provider": provider, "available": True, "primary": False,
                "cold_start": _cold_start(entry), "latency": latency,
                "energy": _energy(run, entry, plan, latency, bound=on_device and not spec.include_io)}
    return measured, kept


def _cold_start(entry: dict[str, Any]) -> dict[str, Any]:
    return {role: {"load_ms": significant(entry["load_ms"][role]),
                   "first_run_ms": significant(entry["first_run_ms"][role]),
                   "batch_size": entry["working"][0]} for role in entry["sessions"]} | {
        "note": "load: creating the ONNX Runtime session from the file (read just before, so from the "
                "page cache); first run: the first call after it, at the smallest batch size. Process "
                "start and importing onnxruntime are not included"}


def _energy(run: _Measuring, entry: dict[str, Any], plan: InputPlan, latency: dict[str, Any], *,
            bound: bool) -> dict[str, Any]:
    """Energy per inference from the provider's counter, or null with the reason (and an estimate if asked)."""
    counter, counter_reason = open_counter(entry["provider"])
    entries = []
    if counter is not None:
        for batch in entry["working"]:
            feeds = plan.feeds(batch, np.random.default_rng([run.spec.seed, 0, batch]))
            calls = {role: _caller(entry["sessions"][role], feeds[role], bound) for role in ROLES}
            try:
                entries.append(energy_entry(batch, measure_windows(counter, calls, checkpoint=run.checkpoint)))
            except (OSError, ValueError) as exc:
                counter, counter_reason, entries = None, f"the energy counter stopped being readable: {exc}", []
                break
    energy = energy_report(counter, entries, counter_reason)
    tdp = run.spec.energy_estimate_tdp_watts
    if energy["value"] is None and tdp:
        energy["estimate"] = energy_estimate(latency["batch_sizes"], tdp_watts=tdp, threads=run.threads,
                                             logical_cores=logical_cores())
    return energy


def _memory(run: _Measuring, plan: InputPlan, batch: int, provider: str,
            first_entry: dict[str, Any] | None = None) -> dict[str, Any]:
    """Peak resident memory of each model, each in a fresh process, at the largest batch size measured."""
    run.checkpoint()
    engines = (first_entry or {}).get("engines")
    memory = measure_memory(run.paths, plan.feeds(batch, np.random.default_rng([run.spec.seed, 3, batch])),
                            batch_size=batch, providers=session_providers(provider) if engines is None else
                            engines["baseline"], threads=run.threads,
                            result_providers=None if engines is None else engines["result"])
    memory["arena"] = ARENA
    run.progress.advance(2 * batch * (MEMORY_RUNS + 2), "measured memory")
    return memory


def _assemble(run: _Measuring, plan: InputPlan, working: list[int], size: dict, provider_reports: list[dict],
              first: dict, fidelity: dict, on_dataset: dict | None, memory: dict, samples: dict) -> dict[str, Any]:
    """The report: the primary provider's figures at the top level, every provider's under `providers`."""
    notes = run.notes + _findings(size, first["latency"], fidelity, memory, on_dataset)
    environment = describe(provider=first["provider"], threads=run.threads)
    if run.spec.target is not None:
        from workers.measure.environment import package_version

        environment["target"] = dict(run.spec.target)
        runtime = run.spec.target.get("runtime") or "openvino"
        if runtime != "onnxruntime":  # its version is there already
            environment["versions"][runtime] = package_version(runtime) or package_version(f"{runtime}-cu13") \
                or package_version(f"{runtime}-cu12")
        if runtime == "litert":  # LiteRT's interpreter, and what exported the .tflite it runs
            environment["versions"].update({name: package_version(name) for name in ("ai-edge-litert", "onnx2tf")})
            environment["versions"]["litert"] = environment["versions"]["ai-edge-litert"]
    report = {
        "environment": environment,
        "inputs": [i.describe() for i in plan.inputs],
        # The shapes at the smallest batch size measured; per batch size in latency.batch_sizes[].input_shapes.
        "input_shapes": plan.shapes(working[0]),
        "input_shapes_source": plan.sources(),
        "size": size,
        "latency": first["latency"],
        "cold_start": first["cold_start"],
        "providers": provider_reports,
        "fidelity": fidelity,
        "dataset": on_dataset,
        "energy": first["energy"],
        "memory": memory,
        "notes": notes,
    }
    report["measurements"] = _rows(report)
    report["samples"] = samples
    return report


def _warm_up_runtime(threads: int) -> None:
    """Pay ONNX Runtime's one-time set-up in a process (its environment, kernel registries) on a one-node
    model, so that the first model loaded is not charged for it in its cold start."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "warm-up",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = min(model.ir_version, onnx.IR_VERSION)
    session = ort.InferenceSession(model.SerializeToString(), sess_options=session_options(threads),
                                   providers=["CPUExecutionProvider"])
    session.run(None, {"x": np.zeros(1, np.float32)})


def _size_report(paths: dict[str, Path], structures: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    size: dict[str, Any] = {role: lowered_size(paths[role]) if is_lowered(paths[role])
                            else model_size(paths[role], structures[role]) for role in ROLES}
    base, res = size["baseline"]["file_bytes"], size["result"]["file_bytes"]
    size["ratio"] = round(res / base, 4) if base else None
    if base and res > base:
        notes.append(f"the compressed model's files are larger than the original's (x{res / base:.2f}: "
                     f"{res} bytes vs {base} bytes)")
    return size


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
                checkpoint: Callable[[], None]) -> tuple[list[int], dict[str, float]]:
    """One untimed call per model and batch size; a batch size either model cannot run is skipped. Also
    gives each model's first call's time (its cold start), at the first batch size that runs."""
    working: list[int] = []
    failures: list[str] = []
    first_ms: dict[str, float] = {}
    original_failed: list[tuple[int, Exception]] = []
    for batch in to_measure:
        checkpoint()
        feeds = plan.feeds(batch, np.random.default_rng([seed, 1, batch]))
        for role in sessions:
            try:
                clock = time.perf_counter()
                sessions[role].run(None, feed_of(feeds, role))
                first_ms.setdefault(role, (time.perf_counter() - clock) * 1000)
            except Exception as exc:
                reason = f"{ROLE_NAMES[role]} fails to run at batch {batch}: {ort_error_text(exc)}"
                if role == "baseline":
                    original_failed.append((batch, exc))
                failures.append(reason)
                skipped.append({"batch_size": batch, "reason": reason})
                break
        else:
            working.append(batch)
    if not working:
        # The original runs at no batch size: where the plan chose sizes for its dynamic dims, say so.
        shape_failure = plan.shape_failure(original_failed[0][1], original_failed[0][0]) if len(
            original_failed) == len(to_measure) else None
        raise shape_failure or MeasurementFailed("; ".join(failures))
    skipped.sort(key=lambda s: s["batch_size"])
    return working, first_ms


def _run(session: Any, feed: dict[str, np.ndarray], role: str, batch: int) -> list[Any]:
    try:
        return session.run(None, feed)
    except Exception as exc:
        raise MeasurementFailed(f"{ROLE_NAMES[role]} fails to run at batch {batch}: {ort_error_text(exc)}") from exc


def _fidelity(sessions, plan: InputPlan, output_pairs, batch: int, runs: int, seed: int, progress: _Progress,
              checkpoint: Callable[[], None]) -> dict[str, Any]:
    """Outputs compared on `runs` random batches at least; more (FIDELITY_MAX_SAMPLES at most) where the first
    run's pace says they fit in FIDELITY_SECONDS. The progress advances by the planned runs' share either way."""
    comparisons = [OutputComparison(name, result_name, dtype) for _, _, name, result_name, dtype in output_pairs]
    rng = np.random.default_rng([seed, 2])
    planned, run = runs, 0
    while run < runs:
        checkpoint()
        started = time.perf_counter()
        feeds = plan.feeds(batch, rng)
        outputs = {role: _run(sessions[role], feeds[role], role, batch) for role in ROLES}
        for comparison, (i, j, *_rest) in zip(comparisons, output_pairs):
            comparison.add(outputs["baseline"][i], outputs["result"][j], batch)
        if run == 0:
            affordable = int(FIDELITY_SECONDS / max(time.perf_counter() - started, 1e-6))
            runs = max(runs, min(affordable, FIDELITY_MAX_SAMPLES // batch))
        run += 1
        progress.advance(2 * batch * planned / runs, f"comparing outputs: run {run}/{runs}")
    return summarize_outputs(comparisons, batch_size=batch, runs=runs)


def _reopener(paths: dict[str, Path], provider: str, threads: int) -> Callable[[tuple[str, ...]], dict[str, Any]]:
    def reopen(order: tuple[str, ...]) -> dict[str, Any]:
        sessions = {}
        for role in order:
            sessions[role], why = start_provider(paths[role], role=role, provider=provider, threads=threads)
            if sessions[role] is None:
                raise MeasurementFailed(f"{provider} stopped starting halfway through the measurement: {why}")
        return sessions

    return reopen


def _caller(session: Any, feed: dict[str, np.ndarray], bound: bool) -> Callable[[], Any]:
    return bound_call(session, feed) if bound else plain_call(session, feed)


def _latency(entry: dict[str, Any], plan: InputPlan, warmup: int, iterations: int, seed: int,
             progress: _Progress, checkpoint: Callable[[], None], *, bound: bool,
             reopen: Callable[[tuple[str, ...]], dict[str, Any]] | None,
             sets: int = SESSION_SETS) -> tuple[dict, dict]:
    """(latency report, raw samples): per batch size, warm-up rounds then timed rounds, ABBA.

    Two sessions of the very same model can differ by a percent or two for as long as they live: where ONNX
    Runtime put each one's weights and buffers (which follows the order they were created in), where their
    threads landed. With `reopen`, the sessions are created again, in alternating order, every few rounds
    (and warmed up again), so each model's rounds run on several session sets, and the interval is drawn
    over sets as well as rounds (workers.measure.stats.speedup_interval)."""
    blocks = split(iterations, choose_rounds(iterations))
    warmup_blocks = split(warmup, choose_rounds(warmup)) if warmup else []
    # A new session set every `every` rounds (at least two sets, at most `sets`).
    every = max(2, math.ceil(len(blocks) / sets)) if reopen is not None and len(blocks) >= 4 else None
    per_batch, kept = [], {}
    order = tuple(entry["sessions"])
    turns = Turns({role: runtime_of(session) for role, session in entry["sessions"].items()})
    for batch in entry["working"]:
        feeds = plan.feeds(batch, np.random.default_rng([seed, 0, batch]))

        def warm_up(calls: dict[str, Callable[[], Any]], blocks_: list[int], advance: bool, batch: int = batch) -> None:
            for index, count in enumerate(blocks_):
                checkpoint()
                for role in round_order(index, tuple(calls)):
                    time_calls(calls[role], count)
                    turns.last = role
                if advance:
                    progress.advance(2 * batch * count, f"warming up at batch {batch}")

        roles = tuple(role for role in MEASURED_ROLES if role in entry["sessions"])
        calls = {role: _caller(entry["sessions"][role], feed_of(feeds, role), bound) for role in roles}
        warm_up(calls, warmup_blocks, True)
        rounds: dict[str, list[list[int]]] = {role: [] for role in roles}
        strata: list[int] = []
        for index, count in enumerate(blocks):
            checkpoint()
            if every is not None and reopen is not None and index and index % every == 0:
                calls.clear()
                order = order[::-1]
                entry["sessions"] = reopen(order)
                calls = {role: _caller(entry["sessions"][role], feed_of(feeds, role), bound) for role in roles}
                warm_up(calls, warmup_blocks or [2], False)
            for role in round_order(index, roles):
                rounds[role].append([])
                turns.take(role, calls[role])
                time_calls(calls[role], count, rounds[role][-1])
            strata.append(0 if every is None else index // every)
            progress.advance(2 * batch * count, f"timing batch {batch}: round {index + 1}/{len(blocks)}")
        flat = {role: [t for r in rounds[role] for t in r] for role in roles}
        interval = speedup_interval(rounds["baseline"], rounds["result"], seed=seed,
                                    strata=strata if every is not None else None)
        base_p50, result_p50 = float(np.median(flat["baseline"])), float(np.median(flat["result"]))
        summary = {role: summarize(flat[role], batch) for role in roles}
        per_batch.append({
            "batch_size": batch,
            "input_shapes": plan.shapes(batch),
            "baseline": summary["baseline"],
            "result": summary["result"],
            "p50_ratio": round(result_p50 / base_p50, 4),
            "speedup": interval["speedup"],
            "speedup_ci": interval,
            "speedup_text": show_speedup(interval),
            "noisy": summary["baseline"]["noisy"] or summary["result"]["noisy"],
        })
        if "runtime" in roles:  # a target runtime: the runtime's gain and the compression's, each with its interval
            per_batch[-1]["runtime"] = summary["runtime"]
            for name, (slow, fast) in (("runtime", ("baseline", "runtime")), ("compression", ("runtime", "result"))):
                part = speedup_interval(rounds[slow], rounds[fast], seed=seed,
                                        strata=strata if every is not None else None)
                per_batch[-1].update({f"{name}_speedup": part["speedup"], f"{name}_speedup_ci": part,
                                      f"{name}_speedup_text": show_speedup(part)})
        kept[str(batch)] = rounds | {"session_set": strata}
    report = {
        "warmup": warmup,
        "iterations": iterations,
        "rounds": len(blocks),
        "order": "per round each model runs a block of iterations; the first model alternates (ABBA)" + (
            f"; a block that follows another runtime's starts with untimed calls for {SETTLE_S * 1e3:g} ms, so the "
            f"other runtime's lingering threads are not charged to it ({turns.settled} calls in all)"
            if turns.settled else ""),
        "session_sets": (f"the sessions were created again, in alternating order, every {every} rounds: where "
                         "a session's memory and threads land moves its time by a percent or two for as long as "
                         "it lives, so the rounds of each batch size ran on several session sets"
                         if every is not None else
                         "one set of sessions" + ("" if reopen is not None else
                                                   " (the models are too large to load twice more)")),
        "timer": "time.perf_counter_ns around each call (Python call overhead included)" + (
            "; inputs are bound on the device once (I/O binding) and each call ends with a device "
            "synchronisation, so host-device copies are not counted" if bound else
            "; on a GPU provider, host-device copies of inputs and outputs included"),
        "throughput": "batch_size * 1000 / mean_ms: one caller, calls back to back",
        "noisy_above_cv": NOISY_CV,
        "check_runs": 1,
        # Spinning is off for both sessions (see runtime.session_options); a lone session
        # with spinning on can be some 10% faster on a small model.
        "thread_spinning": False,
        "batch_sizes": per_batch,
    }
    return report, kept


def _findings(size: dict, latency: dict, fidelity: dict, memory: dict, on_dataset: dict | None) -> list[str]:
    """Plain statements of what a reader might otherwise miss."""
    found = []
    for entry in latency["batch_sizes"]:
        speedup, interval, batch = entry["speedup"], entry["speedup_ci"], entry["batch_size"]
        times = f"p50 {entry['result']['p50_ms']:.4g} ms vs {entry['baseline']['p50_ms']:.4g} ms"
        if interval.get("low") is not None and interval["low"] <= 1 <= interval["high"]:
            if speedup < 1:
                found.append(f"at batch {batch} the two models are not told apart: the speedup "
                             f"{entry['speedup_text']} includes 1.00 ({times})")
        elif speedup < 1:
            found.append(f"the compressed model is slower than the original at batch {batch} "
                         f"({entry['speedup_text']}: {times})")
        if entry.get("noisy"):
            cvs = f"{entry['baseline']['cv']:.0%} and {entry['result']['cv']:.0%}"
            found.append(f"the latency at batch {entry['batch_size']} is noisy (coefficient of variation {cvs}, "
                         f"above {NOISY_CV:.0%}): something else was running, or the model's time varies by "
                         "itself; the interval around the speedup shows how much it moves")
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
    if memory.get("reason") and memory.get("asked", True):
        found.append(f"memory was not measured: {memory['reason']}")
    return found


def _rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    primary = report["latency"]["provider"]

    def add(model: str, batch: int | None, metric: str, value: float | None, unit: str,
            provider: str = primary) -> None:
        if value is not None:
            rows.append({"model": model, "provider": provider, "batch_size": batch, "metric": metric,
                         "value": float(value), "unit": unit})

    for role in ROLES:
        sized = report["size"][role]
        add(role, None, "file_bytes", sized["file_bytes"], "bytes")
        add(role, None, "parameters", sized["parameters"], "count")
        add(role, None, "initializer_bytes", sized["initializer_bytes"], "bytes")
    for measured in report["providers"]:
        if not measured["available"]:
            continue
        provider = measured["provider"]
        for entry in measured["latency"]["batch_sizes"]:
            batch = entry["batch_size"]
            for role in (r for r in MEASURED_ROLES if r in entry):  # "runtime": the original on a target runtime
                for metric in LATENCY_METRICS:
                    add(role, batch, metric, entry[role][metric], UNITS.get(metric, "ms"), provider)
            add("result", batch, "speedup", entry["speedup"], "x", provider)
            for part in ("runtime", "compression"):
                if f"{part}_speedup" in entry:
                    add("result", batch, f"{part}_speedup", entry[f"{part}_speedup"], "x", provider)
            add("result", batch, "speedup_ci_low", entry["speedup_ci"].get("low"), "x", provider)
            add("result", batch, "speedup_ci_high", entry["speedup_ci"].get("high"), "x", provider)
        for role in ROLES:
            cold = measured["cold_start"][role]
            add(role, cold["batch_size"], "load_ms", cold["load_ms"], "ms", provider)
            add(role, cold["batch_size"], "first_run_ms", cold["first_run_ms"], "ms", provider)
        for entry in measured["energy"].get("batch_sizes", []):
            for role in ROLES:
                add(role, entry["batch_size"], "energy_per_inference", entry[f"{role}_j_per_inference"], "J",
                    provider)
                add(role, entry["batch_size"], "power", entry[f"{role}_watts"], "W", provider)
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
    memory = report["memory"]
    for role in ROLES:
        if memory.get(role):
            add(role, memory["batch_size"], "peak_rss_increase", memory[role]["peak_rss_increase_bytes"], "bytes")
    return rows
