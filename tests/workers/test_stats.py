"""The latency statistics and the speedup interval, checked against independent computations on fixed
samples: Python's statistics module for the summary, scipy's bootstrap for the interval."""
from __future__ import annotations

import statistics

import numpy as np
import pytest

from workers.measure.stats import NOISY_CV, show_speedup, speedup_interval, summarize

# Fixed per-call times in nanoseconds: a skewed, latency-like sample with one slow outlier.
SAMPLES_NS = [1_000_000 + 37_000 * ((i * 7919) % 101) + (900_000 if i == 55 else 0) for i in range(200)]


def test_summary_matches_the_statistics_module():
    ms = [t / 1e6 for t in SAMPLES_NS]
    got = summarize(SAMPLES_NS, batch_size=8)
    # numpy's linear interpolation is the 'inclusive' method: quantile i/100 at (n-1)*i/100.
    cuts = statistics.quantiles(ms, n=100, method="inclusive")
    assert got["count"] == 200
    assert got["p50_ms"] == pytest.approx(statistics.median(ms), rel=1e-5)
    for p in (90, 95, 99):
        assert got[f"p{p}_ms"] == pytest.approx(cuts[p - 1], rel=1e-5), p
    assert got["mean_ms"] == pytest.approx(statistics.fmean(ms), rel=1e-5)
    assert got["stdev_ms"] == pytest.approx(statistics.stdev(ms), rel=1e-5)
    assert got["cv"] == pytest.approx(statistics.stdev(ms) / statistics.fmean(ms), abs=1e-4)
    assert got["min_ms"] == pytest.approx(min(ms)) and got["max_ms"] == pytest.approx(max(ms))
    assert got["throughput_per_s"] == pytest.approx(8 * 1000 / statistics.fmean(ms), rel=1e-5)
    assert got["noisy"] is (got["cv"] > NOISY_CV)


def test_noisy_is_a_coefficient_of_variation_above_ten_percent():
    steady = summarize([1_000_000, 1_010_000, 990_000, 1_000_000], 1)
    jumpy = summarize([1_000_000, 1_500_000, 700_000, 1_200_000], 1)
    assert steady["noisy"] is False and jumpy["noisy"] is True


def rounds(seed: int, count: int, per_round: int, scale: float) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    drift = rng.normal(0, 0.03, count)  # rounds differ a little, as on a real machine
    return [scale * (1 + d) * rng.lognormal(0, 0.05, per_round) for d in drift]


def test_interval_matches_scipys_bootstrap_over_rounds():
    stats = pytest.importorskip("scipy.stats")
    base, res = rounds(1, 20, 25, 2.0), rounds(2, 20, 25, 1.0)
    ours = speedup_interval(base, res, resamples=20_000, seed=3)

    def ratio(indices, axis=-1):
        chosen = np.asarray(indices, dtype=int)
        return np.median(np.concatenate([base[k] for k in chosen])) / np.median(
            np.concatenate([res[k] for k in chosen]))

    theirs = stats.bootstrap((np.arange(20),), ratio, vectorized=False, n_resamples=20_000,
                             confidence_level=0.95, method="percentile", random_state=4).confidence_interval
    point = np.median(np.concatenate(base)) / np.median(np.concatenate(res))
    assert ours["speedup"] == pytest.approx(point, abs=1e-4)
    width = theirs.high - theirs.low
    # Two independent Monte Carlo runs of the same bootstrap: the ends agree to a few percent of the width.
    assert ours["low"] == pytest.approx(theirs.low, abs=0.05 * width)
    assert ours["high"] == pytest.approx(theirs.high, abs=0.05 * width)
    assert ours["low"] < point < ours["high"]


def test_a_known_ratio_is_inside_its_interval_and_a_model_against_itself_straddles_one():
    two_x = speedup_interval(rounds(5, 12, 20, 2.0), rounds(6, 12, 20, 1.0), seed=0)
    assert 1.85 < two_x["low"] < 2.0 < two_x["high"] < 2.15
    same = rounds(7, 12, 20, 1.0)
    itself = speedup_interval(same, [r[::-1] for r in same], seed=0)
    assert itself["speedup"] == 1.0 and itself["low"] <= 1.0 <= itself["high"]


def test_pairing_keeps_drift_that_hit_both_models_out_of_the_interval():
    # Rounds where the whole machine was 30% slower hit both models: paired resampling cancels it.
    rng = np.random.default_rng(0)
    slow = np.where(np.arange(16) % 4 == 0, 1.3, 1.0)
    base = [2.0 * s * rng.lognormal(0, 0.01, 20) for s in slow]
    res = [1.0 * s * rng.lognormal(0, 0.01, 20) for s in slow]
    interval = speedup_interval(base, res, seed=0)
    assert interval["high"] - interval["low"] < 0.1


def test_one_round_has_no_interval_and_says_why():
    one = speedup_interval([[2.0, 2.0]], [[1.0, 1.0]])
    assert one["speedup"] == 2.0 and one["low"] is None and "one round" in one["reason"]
    assert show_speedup(one) == "2.00x"
    assert show_speedup({"speedup": 1.834, "low": 1.79, "high": 1.881}) == "1.83x (1.79-1.88)"
    with pytest.raises(ValueError):
        speedup_interval([[1.0]], [[1.0], [1.0]])


def test_session_sets_that_disagree_widen_the_interval():
    # The same model on three session sets, each a percent or two off: within a set the rounds agree closely.
    rng = np.random.default_rng(1)
    offsets = [1.02, 0.98, 1.015]
    base = [o * 1.0 * rng.lognormal(0, 0.002, 20) for o in offsets for _ in range(4)]
    res = [1.0 * rng.lognormal(0, 0.002, 20) for _ in offsets for _ in range(4)]
    strata = [s for s in range(3) for _ in range(4)]
    flat = speedup_interval(base, res, seed=0)
    nested = speedup_interval(base, res, strata=strata, seed=0)
    assert nested["speedup"] == flat["speedup"]
    assert nested["high"] - nested["low"] >= flat["high"] - flat["low"] > 0.02
    assert nested["low"] <= 1.0 <= nested["high"] and "session sets" in nested["method"]
    with pytest.raises(ValueError):
        speedup_interval(base, res, strata=[0, 1])
