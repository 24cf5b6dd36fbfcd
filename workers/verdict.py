"""Every job's verdict, and the Pareto front of the models it measured.

`judge(summary, budget)`: `beneficial` only when the objective improved beyond its interval (latency: the speedup
interval's lower bound above 1.00 at the objective's batch size; size: a smaller file; energy: fewer joules per
inference) and every constraint of the budget holds (worst-sample cosine, top-1 drop where there are labels,
max_latency_ms, max_size_bytes); otherwise `not_beneficial`, with the reason in a sentence that names the figures.
`pareto_front(points)`: which of a job's models (the original, each step's, a search's candidates) no other model
beats on latency, size, fidelity and energy together.

Pure: no I/O, nothing heavy; a steps job (workers.steps) and a goal search both call it.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from app.reports import Budget, CheckName, JobSummary, ParetoPoint, Verdict, VerdictCheck

__all__ = ["Budget", "job_points", "judge", "objective_batch", "pareto_front"]

# The Pareto front's dimensions: (field, +1 when lower is better, -1 when higher is).
DIMENSIONS = (("p50_ms", 1), ("size_bytes", 1), ("worst_cosine", -1), ("energy_j", 1))


def judge(summary: JobSummary, budget: Budget) -> Verdict:
    """The verdict on a measured result: its objective, then each constraint the budget sets."""
    batch = objective_batch(summary, budget)
    if budget.objective == "latency":
        objective, improvement = _latency(summary, batch, budget.min_speedup)
    else:
        objective, improvement = {"size": _size, "energy": _energy}[budget.objective](summary, batch)
    checks = [objective, *_constraints(summary, budget, batch)]
    failed = [c for c in checks if not c.passed]
    return Verdict(verdict="not_beneficial" if failed else "beneficial",
                   reason="; ".join(c.text for c in failed or checks), objective=budget.objective, checks=checks,
                   improvement=improvement, budget=budget.model_copy(update={"batch_size": batch}))


def objective_batch(summary: JobSummary, budget: Budget) -> int | None:
    """The budget's batch size, else the smallest one measured (or skipped)."""
    if budget.batch_size is not None:
        return budget.batch_size
    sizes = [int(b) for b in summary.speedup] + [s.batch_size for s in summary.skipped_batch_sizes]
    return min(sizes) if sizes else None


def _check(name: CheckName, passed: bool, text: str, value=None, limit=None) -> VerdictCheck:
    return VerdictCheck(name=name, value=value, limit=limit, passed=passed, text=text)


def _not_measured(summary: JobSummary, batch: int | None) -> str | None:
    """Why there is no latency at the objective's batch size, or None when there is."""
    skipped = next((s for s in summary.skipped_batch_sizes if s.batch_size == batch), None)
    if skipped is not None:
        return f"not measured at batch {batch}, the batch size the objective names: {skipped.reason}"
    if str(batch) not in summary.speedup:
        measured = ", ".join(summary.speedup) or "none"
        return f"not measured at batch {batch}, the batch size the objective names (measured: {measured})"
    return None


def _latency(summary: JobSummary, batch: int | None, least: float | None = None) -> tuple[VerdictCheck, dict | None]:
    """Faster when the speedup interval's lower bound is above 1.00, or reaches `least` (the goal's min_speedup)."""
    limit = 1.0 if least is None else float(least)
    missing = _not_measured(summary, batch)
    if missing is not None:
        return _check("objective", False, missing, limit=limit), None
    key = str(batch)
    speedup = summary.speedup[key]
    bounds = summary.speedup_interval.get(key)
    low, high = (bounds.low, bounds.high) if bounds is not None else (None, None)
    improvement = {"speedup": speedup, "low": low, "high": high, "batch_size": batch}
    where = f"at batch {batch}"
    if summary.target:  # the total gain: the result on the target against the original on ONNX Runtime fp32
        where += (f" on {'/'.join(str(summary.target[k]) for k in ('runtime', 'precision') if summary.target.get(k))}"
                  " (against the original on ONNX Runtime fp32)")
    if low is None:
        why = (bounds.reason if bounds is not None and bounds.reason else "the measurement gave none")
        return _check("objective", False, f"no interval around the speedup {speedup:.2f}x {where} ({why}): one figure "
                      "alone cannot tell a gain from noise", limit=limit), improvement
    shown = summary.speedup_ci.get(key) or f"{speedup:.2f}x ({low:.2f}-{high:.2f})"
    # A bound that rounds to 1.00 is shown with the digit that decides it.
    bound = f" ({low:.3f})" if round(low, 2) == 1 else ""
    if least is not None and least > 1:
        if low >= least:
            return _check("objective", True, f"faster: {shown} {where}, the interval's lower bound reaches the goal's "
                          f"min_speedup {least:g}", low, limit), improvement
        side = "slower: the whole interval is below 1.00" if high is not None and high < 1 else \
            "faster, but not by the least gain asked" if low > 1 else "the models are not told apart"
        return _check("objective", False, f"not fast enough: {shown} {where}, the interval's lower bound {low:.2f} "
                      f"is below the goal's min_speedup {least:g} ({side})", low, limit), improvement
    if low > 1:
        return _check("objective", True, f"faster: {shown} {where}, the interval's lower bound{bound} is above 1.00",
                      low, 1.0), improvement
    side = "slower: the whole interval is below 1.00" if high is not None and high < 1 else \
        "the models are not told apart"
    return _check("objective", False, f"not faster: {shown} {where}, the interval's lower bound{bound} is not above "
                  f"1.00 ({side})", low, 1.0), improvement


def _size(summary: JobSummary, batch: int | None) -> tuple[VerdictCheck, dict | None]:
    original, compressed = summary.original_size_bytes, summary.compressed_size_bytes
    ratio = summary.size_ratio if summary.size_ratio is not None else (
        compressed / original if original and compressed is not None else None)
    if ratio is None:
        return _check("objective", False, "no size was measured", limit=1.0), None
    improvement = {"size_ratio": ratio, "original_bytes": original, "compressed_bytes": compressed}
    files = f"{_bytes(original)} -> {_bytes(compressed)}"
    if ratio < 1:
        return _check("objective", True, f"smaller: {ratio:.4g}x the original's size ({files})", ratio, 1.0), improvement
    return _check("objective", False, f"not smaller: size ratio {ratio:.4g} ({files}) is not below 1.00", ratio,
                  1.0), improvement


def _energy(summary: JobSummary, batch: int | None) -> tuple[VerdictCheck, dict | None]:
    measured = summary.energy_j_per_inference or {}
    original, compressed = measured.get("baseline"), measured.get("result")
    if not original or compressed is None:
        why = summary.energy_note or "no energy counter was read"
        return _check("objective", False, f"energy was not measured ({why}), so it cannot have improved",
                      limit=1.0), None
    ratio = compressed / original
    improvement = {"energy_ratio": round(ratio, 4), "original_j": original, "compressed_j": compressed}
    joules = f"{original:.4g} J -> {compressed:.4g} J per inference at batch {measured.get('batch_size', '?')}"
    if ratio < 1:
        return _check("objective", True, f"less energy: {ratio:.3g}x the original's ({joules})", ratio,
                      1.0), improvement
    return _check("objective", False, f"no less energy: {ratio:.3g}x the original's ({joules})", ratio,
                  1.0), improvement


def _constraints(summary: JobSummary, budget: Budget, batch: int | None) -> list[VerdictCheck]:
    checks = []
    if budget.min_cosine is not None:
        checks.append(_fidelity(summary, budget.min_cosine))
    accuracy = summary.accuracy
    if budget.max_accuracy_drop is not None and accuracy is not None and accuracy.top1_drop_points is not None:
        drop, limit = accuracy.top1_drop_points, budget.max_accuracy_drop
        top1 = (f"{100 * accuracy.original_top1:.2f}% -> {100 * accuracy.compressed_top1:.2f}% on "
                f"{accuracy.samples} samples" if accuracy.original_top1 is not None
                and accuracy.compressed_top1 is not None else f"{accuracy.samples} samples")
        text = (f"top-1 dropped {drop:.2f} points > {limit:g} ({top1})" if drop > limit else
                f"top-1 rose {-drop:.2f} points ({top1})" if drop < 0 else
                f"top-1 dropped {drop:.2f} points <= {limit:g} ({top1})")
        checks.append(_check("max_accuracy_drop", drop <= limit, text, drop, limit))
    if budget.max_latency_ms is not None:
        p50 = summary.latency_p50_ms.get(str(batch))
        limit = budget.max_latency_ms
        if p50 is None or p50.compressed is None:
            checks.append(_check("max_latency_ms", False, f"p50 not measured at batch {batch}: max_latency_ms "
                                 f"{limit:g} cannot be checked", limit=limit))
        else:
            fits = p50.compressed <= limit
            checks.append(_check("max_latency_ms", fits, f"p50 {p50.compressed:.4g} ms {'<=' if fits else '>'} "
                                 f"{limit:g} ms at batch {batch}", p50.compressed, limit))
    if budget.max_size_bytes is not None:
        size, limit = summary.compressed_size_bytes, budget.max_size_bytes
        fits = size is not None and size <= limit
        checks.append(_check("max_size_bytes", fits, f"size {_bytes(size)} {'<=' if fits else '>'} {_bytes(limit)}",
                             size, limit))
    return checks


def _fidelity(summary: JobSummary, limit: float) -> VerdictCheck:
    fidelity = summary.fidelity
    worst = fidelity.worst_cosine if fidelity is not None else None
    what = "worst-sample cosine"
    if worst is None and fidelity is not None and fidelity.cosine_similarity is not None:
        worst, what = fidelity.cosine_similarity, "mean cosine (no worst-sample figure)"
    # An output with no cosine (workers.measure.fidelity: one value per sample, fewer than 2 samples) is not shown
    # to be kept: the others' figure decides only where it fails.
    missing = "; ".join(fidelity.not_compared or []) if fidelity is not None else ""
    if worst is None:
        return _check("min_cosine", False, f"no output cosine was measured to hold to {limit:g}"
                      + (f" ({missing})" if missing else ""), limit=limit)
    on = summary.fidelity_on or "random inputs"
    # Shown cut, not rounded, to four places: 0.98996 reads 0.9899 < 0.99, never 0.9900 < 0.99.
    shown = f"{int(worst * 10_000) / 10_000:.4f}"
    if worst >= limit and missing:
        return _check("min_cosine", False, f"outputs not all compared: {what} {shown} >= {limit:g} on {on} for the "
                      f"others, but {missing}", worst, limit)
    if worst >= limit:
        return _check("min_cosine", True, f"outputs kept: {what} {shown} >= {limit:g} on {on}", worst, limit)
    return _check("min_cosine", False, f"outputs moved: {what} {shown} < {limit:g} on {on}", worst, limit)


def _bytes(size: float | None) -> str:
    if size is None:
        return "?"
    for unit in ("B", "KB", "MB"):
        if size < 1000:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.2f} GB"


# --- the Pareto front ---------------------------------------------------------------------------------------

def pareto_front(points: Sequence[Mapping[str, Any] | ParetoPoint]) -> list[ParetoPoint]:
    """Each point ({name, p50_ms, size_bytes, worst_cosine, energy_j}), marked on the front when no other point is
    at least as good in every dimension and better in one, else with the names of those that are. A dimension
    that is null for any point is left out (energy where no counter was read)."""
    rows = [p.model_dump() if isinstance(p, ParetoPoint) else dict(p) for p in points]
    dims = [(name, sign) for name, sign in DIMENSIONS if rows and all(r.get(name) is not None for r in rows)]

    def dominates(a: dict, b: dict) -> bool:
        pairs = [(sign * a[name], sign * b[name]) for name, sign in dims]
        return bool(pairs) and all(x <= y for x, y in pairs) and any(x < y for x, y in pairs)

    out = []
    for row in rows:
        by = [other["name"] for other in rows if other is not row and dominates(other, row)]
        out.append(ParetoPoint(name=row["name"], p50_ms=row.get("p50_ms"), size_bytes=row.get("size_bytes"),
                               worst_cosine=row.get("worst_cosine"), energy_j=row.get("energy_j"),
                               on_front=not by, dominated_by=by))
    return out


def job_points(summary: JobSummary, batch: int | None) -> list[dict[str, Any]]:
    """A steps job's models as Pareto points: the original, then each step's model (the last is the result), with
    p50 at `batch`. The original's p50 is the one measured beside the result."""
    key = str(batch)
    energy = summary.energy_j_per_inference or {}
    p50 = summary.latency_p50_ms.get(key)
    points = [{"name": "original", "p50_ms": p50.original if p50 else None, "size_bytes": summary.original_size_bytes,
               "worst_cosine": 1.0, "energy_j": energy.get("baseline")}]
    if summary.trajectory:
        points += [{"name": f"step {t.step} ({t.method})", "p50_ms": t.latency_p50_ms.get(key),
                    "size_bytes": t.size_bytes, "worst_cosine": t.worst_cosine if t.worst_cosine is not None
                    else t.cosine, "energy_j": t.energy_j} for t in summary.trajectory]
        return points
    fidelity = summary.fidelity
    name = f"step {len(summary.steps)} ({summary.steps[-1]})" if summary.steps else "result"
    points.append({"name": name, "p50_ms": p50.compressed if p50 else None, "size_bytes": summary.compressed_size_bytes,
                   "worst_cosine": None if fidelity is None else fidelity.worst_cosine if fidelity.worst_cosine
                   is not None else fidelity.cosine_similarity, "energy_j": energy.get("result")})
    return points
