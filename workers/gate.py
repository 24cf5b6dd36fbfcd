"""A regression gate (jobs.kind = "gate", queued by POST /v1/gates): a candidate model against a baseline on this
worker, in this one process, turned into pass or fail by a policy, with each check's evidence in the report.

The latency check, and why it has the power it states
------------------------------------------------------
The figure is the slowdown s = median(candidate) / median(baseline) - 1, both medians taken over the per-round
medians of paired, interleaved rounds: in each round each model runs a block of calls back to back, the first
model alternating (ABBA, as workers.measure times every job), so drift and a neighbour's load land on both.
Every `ROUNDS_PER_SET` rounds both sessions are created again, in alternating order (a session's memory and
threads can move its time by a percent or two for as long as it lives; workers.measure._latency does the same),
and the interval resamples session sets, then rounds within each (a paired, two-level bootstrap).

The hypotheses, with m = policy.max_slowdown_pct / 100:
    H0: s <= m (the candidate is within the policy)        H1: s > m (it is slower than the policy allows)
The gate fails when H0 is rejected: the one-sided 95% lower bound of s is above m. It passes early when the
one-sided 95% upper bound is at or below m (the reverse hypothesis rejected). It looks at the data after
MIN_SETS (6) session sets and then whenever their number has grown by half, so a gross regression or a clear pass
stops within seconds; between looks it measures on, up to the time budget. When the budget runs out with the
interval still straddling m, the point estimate decides and the check says that it was undecided.

What that gives (bench/gate.py measures it; its figures are in bench/RESULTS.md): comparing a model with itself
(s = 0) raises a false alarm only if the lower bound, or at the end the estimate, lands above m, which needs an
error of m, i.e. several standard errors; a true 5% regression with m = 2 or 3 passes only if the upper bound,
or at the end the estimate, falls to m, an error of 2 to 3 points the other way. Both stay under 5% once the
standard error of s is below about 1%. On 2 cores shared with other work (load average 5 to 11) 60 s of rounds
on ultraface-rfb320 gave about 2.5%, and 10 of 12 regressions detected with 1 false alarm in 12; on a quiet
machine the same gates decided in 2 to 3 s (bench/RESULTS.md, 2026-12-06). Exactly at s = m nothing can tell
the two apart: the gate fails about half of the time there, which is what a limit means. A limit of 0 is refused
at submission for that reason.

Fidelity: the worst sample's cosine between the two models' outputs, on an eval dataset's samples when the gate
names one, else on synthetic random inputs (said so in the check). Accuracy: top-1 on the dataset's labels, the
drop in points. Size: the candidate's files (the .onnx and its external data), against a limit or against the
baseline's.
"""
from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from app.errors import MeasurementFailed
from app.formats.onnx_files import materialize
from app.settings import get_settings

ROUNDS_PER_SET = 6
MIN_SETS = 6                 # session sets before the first look
LOOK_GROWTH = 1.5            # the next look when the number of sets has grown by half
ROUND_TARGET_S = 0.025       # one model's block of calls in a round takes about this long
MAX_BLOCK = 200
ONE_SIDED = 0.95             # confidence of each bound
RESAMPLES = 2000
FIDELITY_SAMPLES = 16
NO_LIMIT_MEASURE_S = 10.0    # latency measured for the report alone when the policy sets no slowdown limit
CPU = "CPUExecutionProvider"
ROLE_WORDS = {"baseline": "the baseline", "result": "the candidate"}


# --- statistics ------------------------------------------------------------------------------------

def slowdown_interval(baseline_medians, candidate_medians, *, rounds_per_set: int, resamples: int = RESAMPLES,
                      one_sided: float = ONE_SIDED, seed: int = 0) -> dict[str, Any]:
    """The slowdown (candidate over baseline, minus 1) of paired per-round medians, and its one-sided bounds.

    Round k of both models is a pair; rounds come in session sets of `rounds_per_set` (complete sets only). The
    bootstrap draws session sets with replacement, then rounds within each drawn set, the same rounds for both
    models, and takes the ratio of the medians; the bounds are its `1 - one_sided` and `one_sided` quantiles,
    their distance from the estimate widened by sqrt(S / (S - 1)) for S sets (the bootstrap's small-sample shrink).
    With fewer than two sets there is no spread between sets to resample: the bounds are None."""
    base = np.asarray(baseline_medians, dtype=np.float64)
    cand = np.asarray(candidate_medians, dtype=np.float64)
    if base.shape != cand.shape or base.size == 0 or base.size % rounds_per_set:
        raise ValueError("need the same number of rounds for both models, in complete session sets")
    sets = base.size // rounds_per_set
    estimate = float(np.median(cand) / np.median(base) - 1)
    out: dict[str, Any] = {"slowdown": estimate, "low": None, "high": None, "sets": sets, "rounds": int(base.size),
                           "confidence_one_sided": one_sided}
    if sets < 2:
        return out
    rng = np.random.default_rng(seed)
    chosen_sets = rng.integers(0, sets, size=(resamples, sets))
    within = rng.integers(0, rounds_per_set, size=(resamples, sets, rounds_per_set))
    index = (chosen_sets[:, :, None] * rounds_per_set + within).reshape(resamples, -1)
    ratios = np.median(cand[index], axis=1) / np.median(base[index], axis=1) - 1
    low, high = np.quantile(ratios, [1 - one_sided, one_sided])
    # Resampling S sets spreads a mean of them by (S - 1) / S of its variance: the bounds are widened to make up.
    widen = math.sqrt(sets / (sets - 1))
    out.update(low=float(estimate - widen * (estimate - low)), high=float(estimate + widen * (high - estimate)))
    return out


def decide(interval: dict[str, Any], limit: float) -> str | None:
    """"fail" when the lower bound is above the limit, "pass" when the upper bound is at or below it, else None."""
    if interval["low"] is None:
        return None
    if interval["low"] > limit:
        return "fail"
    if interval["high"] <= limit:
        return "pass"
    return None


def compare_latency(paths: dict[str, Path], feeds: dict[str, dict[str, np.ndarray]], *, limit: float | None,
                    budget_s: float, threads: int, batch: int = 1, seed: int = 0, early: bool = True,
                    checkpoint: Callable[[], None] = lambda: None,
                    on_progress: Callable[[float, str], None] | None = None,
                    clock: Callable[[], float] = time.monotonic) -> dict[str, Any]:
    """Time the baseline ("baseline") and the candidate ("result") in paired, interleaved rounds until the
    slowdown is clearly above or below `limit` (a fraction; None: no decision, measured for NO_LIMIT_MEASURE_S),
    or `budget_s` is spent (`early=False`: the whole budget, looks and all; bench/gate.py calibrates with it).
    Returns the evidence: the decision, how it was reached, each look, the per-model
    figures and the per-round medians (ns)."""
    from workers.measure import _reopener
    from workers.measure.latency import plain_call, round_order, time_calls
    from workers.measure.stats import summarize

    started = clock()
    deadline = started + (budget_s if limit is not None else min(budget_s, NO_LIMIT_MEASURE_S))
    roles = ("baseline", "result")

    open_sessions = _reopener(paths, CPU, threads)  # the harness's: sessions created in the order given
    # How long one call takes decides the block: a round's block runs about ROUND_TARGET_S.
    sessions = open_sessions(roles)
    calls = {role: plain_call(sessions[role], feeds[role]) for role in roles}
    probe: dict[str, list[int]] = {role: [] for role in roles}
    for index in range(3):
        for role in round_order(index, roles):
            time_calls(calls[role], 2, probe[role])
    per_call_s = max(float(np.median(probe[role])) for role in roles) / 1e9
    block = max(1, min(MAX_BLOCK, round(ROUND_TARGET_S / max(per_call_s, 1e-9))))
    medians: dict[str, list[float]] = {role: [] for role in roles}
    samples: dict[str, list[int]] = {role: [] for role in roles}
    looks: list[dict[str, Any]] = []
    decision, how = None, None
    next_look, sets, set_seconds = MIN_SETS, 0, 0.0
    order = roles
    while True:
        checkpoint()
        set_started = clock()
        if sets:  # a new session set, created in the other order
            calls.clear()
            sessions.clear()
            order = order[::-1]
            sessions = open_sessions(order)
            calls = {role: plain_call(sessions[role], feeds[role]) for role in roles}
        for role in round_order(sets, roles):  # warm-up of this set's sessions, not kept
            time_calls(calls[role], block)
        for index in range(ROUNDS_PER_SET):
            for role in round_order(index, roles):
                block_ns: list[int] = []
                time_calls(calls[role], block, block_ns)
                medians[role].append(float(np.median(block_ns)))
                samples[role].extend(block_ns)
        sets += 1
        now = clock()
        set_seconds = max(set_seconds * 0.8, now - set_started)  # a cautious guess at the next set's time
        out_of_time = now + set_seconds > deadline
        if limit is not None and (sets >= next_look or out_of_time):
            interval = slowdown_interval(medians["baseline"], medians["result"], rounds_per_set=ROUNDS_PER_SET,
                                         seed=seed + sets)
            decision = decide(interval, limit)
            looks.append({"sets": sets, "seconds": round(now - started, 2), **_rounded(interval),
                          "decided": decision})
            next_look = max(sets + 1, math.ceil(sets * LOOK_GROWTH))
            if decision is not None and early:
                how = "decided"
                break
            decision = None
        if on_progress is not None:
            on_progress(min(1.0, (now - started) / max(deadline - started, 1e-9)),
                        f"timing both models: {sets} session set(s), {len(medians['baseline'])} rounds")
        if out_of_time:
            break
    interval = slowdown_interval(medians["baseline"], medians["result"], rounds_per_set=ROUNDS_PER_SET, seed=seed)
    if limit is not None and decision is None:
        decision = "fail" if interval["slowdown"] > limit else "pass"
        how = "undecided at the time budget: the estimate decided"
    elif limit is not None:
        # The reported interval is the one the decision was made on (its look's draw).
        interval = {**interval, **{k: looks[-1][k] for k in ("low", "high")}}
    return {
        "decision": decision, "how": how, "limit": limit, "slowdown": interval["slowdown"],
        "low": interval["low"], "high": interval["high"], "confidence_one_sided": ONE_SIDED,
        "sets": sets, "rounds": len(medians["baseline"]), "rounds_per_set": ROUNDS_PER_SET, "block": block,
        "seconds": round(clock() - started, 2), "budget_s": budget_s, "threads": threads, "looks": looks,
        "baseline": summarize(samples["baseline"], batch), "result": summarize(samples["result"], batch),
        "round_medians_ns": medians,
    }


def _rounded(interval: dict[str, Any]) -> dict[str, Any]:
    return {key: (round(interval[key], 5) if interval[key] is not None else None) for key in ("slowdown", "low", "high")}


# --- the job -----------------------------------------------------------------------------------------

def execute_gate(run, workdir: Path, model_path: Path, model_format: str, spec: dict):
    """Returns (report, summary, rows) like workers.steps.execute; rows stay empty (the report holds the figures)."""
    from workers.measure.environment import default_threads, describe
    from workers.steps import Cancelled

    gate = spec["gate"]
    settings = get_settings()
    run.progress(0.02, "loading", "unpacking the candidate and the baseline", force=True)
    paths = {"result": materialize(model_path, model_format, workdir / "candidate", settings.file_limits()),
             "baseline": run.model(gate["baseline"]["input_id"], workdir)}
    dataset = run.dataset(gate["eval_dataset_id"]) if gate.get("eval_dataset_id") else None
    threads = int(settings.measure_threads or default_threads())
    batch = int(gate["batch_size"])

    def checkpoint() -> None:
        if run.cancel_requested():
            raise Cancelled()

    plan, sessions, output_pairs, notes = plan_pair(paths, dataset, threads)
    feeds = plan.feeds(batch, np.random.default_rng([0, 0, batch]))
    _check_runs(sessions, feeds, batch)
    run.progress(0.05, "comparing outputs", "comparing the two models' outputs", force=True)
    fidelity, on_dataset = _outputs(sessions, plan, output_pairs, dataset, gate, batch, checkpoint)
    del sessions  # the latency rounds open sessions of their own
    policy = gate["policy"]
    limit = policy.get("max_slowdown_pct")
    latency = compare_latency(
        paths, feeds, limit=None if limit is None else limit / 100, budget_s=float(gate["time_budget_s"]),
        threads=threads, batch=batch, checkpoint=checkpoint,
        on_progress=lambda fraction, message: run.progress(0.1 + 0.85 * fraction, "timing", message))
    round_medians = latency.pop("round_medians_ns")
    size = {role: _file_bytes(paths[role]) for role in ("baseline", "result")}
    checks = judge(policy, latency=latency, fidelity=fidelity, on_dataset=on_dataset, size=size, batch=batch)
    failed = [c for c in checks if not c["passed"]]
    verdict = "fail" if failed else "pass"
    reason = "; ".join(c["text"] for c in failed or checks)
    summary = {
        "gate": verdict,
        "verdict": {"verdict": verdict, "reason": reason},
        "checks": [{k: c[k] for k in ("name", "passed", "value", "limit")} for c in checks],
        "slowdown_pct": round(100 * latency["slowdown"], 3),
        "slowdown_interval_pct": [None if latency[k] is None else round(100 * latency[k], 3) for k in ("low", "high")],
        "latency_p50_ms": {"baseline": latency["baseline"]["p50_ms"], "candidate": latency["result"]["p50_ms"]},
        "worst_cosine": _worst_cosine(fidelity, on_dataset),
        "fidelity_on": _fidelity_on(on_dataset),
        "size_bytes": {"baseline": size["baseline"], "candidate": size["result"]},
        "measured_seconds": latency["seconds"],
    }
    if on_dataset and on_dataset.get("accuracy"):
        summary["top1_drop_points"] = on_dataset["accuracy"]["top1_drop_points"]
    report = {
        "report_version": 2, "job_id": run.job_id, "kind": "gate", "sandbox": run.sandbox,
        "verdict": verdict, "reason": reason, "checks": checks, "policy": policy,
        "baseline": {k: v for k, v in gate["baseline"].items() if k != "input_id"},
        "candidate_model_id": gate.get("candidate_model_id"), "batch_size": batch,
        "input_shapes": plan.shapes(batch), "latency": latency | {"statistics": STATISTICS},
        "fidelity": fidelity, "dataset": on_dataset, "size": size,
        "environment": describe(provider=CPU, threads=threads), "notes": notes, "summary": summary,
    }
    rounds_path = workdir / "latency-rounds.json"
    rounds_path.write_text(json.dumps({"unit": "ns", "what": "each round's median call time per model, in the "
                                       "order measured", "rounds_per_set": ROUNDS_PER_SET, **round_medians}))
    run.store_artifact(rounds_path, name="latency-rounds.json", kind="samples", content_type="application/json")
    report["artifacts"] = list(run.artifacts) + [{"name": "report.json", "kind": "report"}]
    report_path = workdir / "report.json"
    report_path.write_text(json.dumps(report, indent=2, default=str))
    run.store_artifact(report_path, name="report.json", kind="report", content_type="application/json")
    run.progress(0.99, "done", f"{verdict}: {reason}", force=True)
    return report, summary, []


STATISTICS = ("H0: slowdown <= max_slowdown_pct; fail when the one-sided 95% lower bound of the slowdown (a paired "
              "two-level bootstrap over session sets and the ABBA rounds within them, on per-round medians) is above "
              "the limit, pass when the upper bound is at or below it; looked at after 6 session sets and whenever "
              "their number grew by half; undecided at the time budget: the estimate decides (see workers/gate.py)")


def plan_pair(paths: dict[str, Path], dataset, threads: int):
    """(input plan, sessions, output pairs, notes) for the two models: the same inputs for both, or MeasurementFailed."""
    from workers.measure.fidelity import pair_outputs
    from workers.measure.runtime import start_provider
    from workers.measure.size import load_structure
    from workers.onnx_tools.inputs import job_input_shapes, plan_inputs

    sessions = {}
    for role in ("baseline", "result"):
        sessions[role], why = start_provider(paths[role], role=role, provider=CPU, threads=threads)
        if sessions[role] is None:
            raise MeasurementFailed(f"ONNX Runtime's CPU provider did not start for {ROLE_WORDS[role]}: {why}")
    structures = {role: load_structure(paths[role], role_name=ROLE_WORDS[role]) for role in paths}
    shapes = job_input_shapes(None, [dataset] if dataset is not None else [])
    plan = plan_inputs(sessions, structures, shapes=shapes)
    output_pairs, output_notes = pair_outputs(sessions["baseline"], sessions["result"])
    notes = [_candidate_words(n) for n in plan.notes + output_notes]
    return plan, sessions, output_pairs, notes


def _candidate_words(text: str) -> str:
    """The harness's messages name "the original" and "the compressed model": in a gate they are the baseline and
    the candidate."""
    return text.replace("the original model", "the baseline").replace("the compressed model", "the candidate")


def _check_runs(sessions: dict[str, Any], feeds: dict[str, dict[str, np.ndarray]], batch: int) -> None:
    for role in ("baseline", "result"):
        try:
            sessions[role].run(None, feeds[role])
        except Exception as exc:
            from workers.measure.runtime import ort_error_text

            raise MeasurementFailed(f"{ROLE_WORDS[role]} fails to run at batch {batch}: {ort_error_text(exc)}") from exc


def _outputs(sessions, plan, output_pairs, dataset, gate: dict, batch: int, checkpoint):
    """Fidelity on synthetic random inputs, and with an eval dataset its accuracy and fidelity."""
    from workers.measure.accuracy import evaluate_dataset
    from workers.measure.fidelity import OutputComparison, summarize_outputs

    comparisons = [OutputComparison(name, result_name, dtype) for _, _, name, result_name, dtype in output_pairs]
    runs = max(1, math.ceil(FIDELITY_SAMPLES / batch))
    rng = np.random.default_rng([0, 2])
    for _ in range(runs):
        checkpoint()
        feeds = plan.feeds(batch, rng)
        outputs = {role: sessions[role].run(None, feeds[role]) for role in ("baseline", "result")}
        for comparison, (i, j, *_rest) in zip(comparisons, output_pairs):
            comparison.add(outputs["baseline"][i], outputs["result"][j], batch)
    fidelity = summarize_outputs(comparisons, batch_size=batch, runs=runs)
    if dataset is None:
        return fidelity, None
    on_dataset = evaluate_dataset(sessions, plan, output_pairs, dataset, max_samples=gate.get("eval_max_samples"),
                                  checkpoint=checkpoint)
    on_dataset["notes"] = [_candidate_words(n) for n in on_dataset["notes"]]
    return fidelity, on_dataset


def _file_bytes(path: Path) -> int:
    """The .onnx file and every external-data file it names (workers.onnx_tools.graph.model_size)."""
    from workers.measure.size import load_structure
    from workers.onnx_tools.graph import model_size

    return int(model_size(path, load_structure(path, role_name="the model"))["file_bytes"])


def _worst_cosine(fidelity: dict, on_dataset: dict | None) -> float | None:
    if on_dataset is not None:
        return on_dataset["fidelity"]["worst_cosine"]
    return fidelity["worst_sample_cosine"]


def _fidelity_on(on_dataset: dict | None) -> str:
    if on_dataset is None:
        return "synthetic random inputs (no eval dataset)"
    return f"dataset {on_dataset['dataset'] or ''}".strip() + f" ({on_dataset['samples']} samples)"


# --- the verdict -------------------------------------------------------------------------------------

def judge(policy: dict, *, latency: dict, fidelity: dict, on_dataset: dict | None, size: dict[str, int],
          batch: int) -> list[dict[str, Any]]:
    """One check per limit the policy sets, each with its figure, its limit, whether it held and a sentence that
    names the evidence (as workers.verdict does for a job's verdict)."""
    checks = []
    limit = policy.get("max_slowdown_pct")
    if limit is not None:
        checks.append(_slowdown_check(latency, limit, batch))
    if policy.get("min_cosine") is not None:
        worst, least = _worst_cosine(fidelity, on_dataset), policy["min_cosine"]
        where = _fidelity_on(on_dataset)
        # An output without a cosine (one value per sample, fewer than 2 samples): the others' figure cannot pass.
        missing = "; ".join(((on_dataset or {}).get("fidelity") or fidelity).get("not_compared") or [])
        if worst is None:
            checks.append(_check("min_cosine", False, None, least, f"no output could be compared on {where}, so the "
                                 f"worst-sample cosine (at least {least}) was not measured"))
        elif missing and worst >= least:
            checks.append(_check("min_cosine", False, worst, least, f"worst-sample cosine of the candidate's other "
                                 f"outputs {worst:.5f} >= {least} on {where}, but {missing}"))
        else:
            checks.append(_check("min_cosine", worst >= least, worst, least,
                                 f"worst-sample cosine of the candidate's outputs against the baseline's {worst:.5f} "
                                 f"{'>=' if worst >= least else '<'} {least} on {where}"))
    if policy.get("max_accuracy_drop") is not None:
        cap = policy["max_accuracy_drop"]
        accuracy = (on_dataset or {}).get("accuracy")
        if not accuracy:
            why = (on_dataset or {}).get("accuracy_note") or "no labelled eval dataset"
            checks.append(_check("max_accuracy_drop", False, None, cap,
                                 f"top-1 accuracy could not be measured ({why}), so a drop of at most {cap} points "
                                 "is not shown"))
        else:
            drop = accuracy["top1_drop_points"]
            checks.append(_check("max_accuracy_drop", drop <= cap, drop, cap,
                                 f"top-1 {100 * accuracy['compressed']['top1']:.2f}% against the baseline's "
                                 f"{100 * accuracy['original']['top1']:.2f}% on {accuracy['samples']} samples: "
                                 f"{drop:+.2f} points lost, {'within' if drop <= cap else 'more than'} {cap}"))
    base, cand = size["baseline"], size["result"]
    if policy.get("max_size_bytes") is not None:
        cap = policy["max_size_bytes"]
        checks.append(_check("max_size_bytes", cand <= cap, cand, cap,
                             f"the candidate's files are {cand} bytes, {'within' if cand <= cap else 'above'} the "
                             f"limit of {cap} (the baseline's: {base})"))
    if policy.get("max_size_growth_pct") is not None:
        cap = policy["max_size_growth_pct"]
        growth = 100 * (cand / base - 1) if base else 0.0
        checks.append(_check("max_size_growth_pct", growth <= cap, round(growth, 3), cap,
                             f"the candidate's files are {cand} bytes against the baseline's {base} "
                             f"({growth:+.2f}%), {'within' if growth <= cap else 'more than'} +{cap}%"))
    return checks


def _slowdown_check(latency: dict, limit_pct: float, batch: int) -> dict[str, Any]:
    slowdown = 100 * latency["slowdown"]
    low, high = (None if latency[k] is None else 100 * latency[k] for k in ("low", "high"))
    p50 = f"p50 {latency['result']['p50_ms']:.4g} ms against {latency['baseline']['p50_ms']:.4g} ms"
    bounds = (f"one-sided 95% bounds {low:+.2f}% to {high:+.2f}%" if low is not None else "no interval (fewer than "
              "two session sets fitted in the time budget)")
    measured = f"{latency['rounds']} paired rounds in {latency['sets']} session sets, {latency['seconds']:.0f} s"
    passed = latency["decision"] == "pass"
    if latency["how"] == "decided":
        why = (f"its lower bound is above the limit of +{limit_pct}%" if not passed else
               f"its upper bound is within the limit of +{limit_pct}%")
    else:
        why = (f"the interval straddles the limit of +{limit_pct}% after the whole time budget; the estimate is "
               f"{'above' if not passed else 'within'} it")
    text = (f"the candidate is {slowdown:+.2f}% slower than the baseline at batch {batch} ({bounds}; {p50}; "
            f"{measured}): {why}")
    return _check("max_slowdown_pct", passed, round(slowdown, 3), limit_pct, text,
                  interval=[None if low is None else round(low, 3), None if high is None else round(high, 3)],
                  decided=latency["how"] == "decided")


def _check(name: str, passed: bool, value, limit, text: str, **evidence) -> dict[str, Any]:
    return {"name": name, "passed": bool(passed), "value": value, "limit": limit, "text": text, **evidence}


__all__ = ["compare_latency", "decide", "execute_gate", "judge", "slowdown_interval"]
