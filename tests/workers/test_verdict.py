"""The verdict every job ends with, and the Pareto front of its models (workers.verdict).

The judge both ways on summaries built here (slower, faster within the noise, faster and faithful, faster but
unfaithful, an accuracy drop over budget, the size objective, a skipped batch size, no interval); the front on
hand-made points; and two real jobs through `modelpress run`: one clearly beneficial (OpenVINO bf16 on a real face
detector) and one clearly not (dynamic int8 on a Conv model: ConvInteger runs several times slower than float Conv
on x86).
"""
from __future__ import annotations

import pytest

from app.reports import JobSummary, load_report
from tests.helpers import SHARED_MODELS, digits_classifier
from tests.methods.conftest import http  # noqa: F401 - the session's `modelpress run` service, for the end to end
from tests.stack import wait_for_job
from workers.verdict import Budget, job_points, judge, pareto_front


def summary(speedup=1.8, low=1.6, high=2.0, *, batch=1, worst=0.9995, on="dataset eval.npz (64 samples)",
            **fields) -> JobSummary:
    """A measured result as the summary holds it: at one batch size, fidelity on a dataset, no labels."""
    key = str(batch)
    data = {
        "original_size_bytes": 4_000_000, "compressed_size_bytes": 1_100_000, "size_ratio": 0.275,
        "latency_p50_ms": {key: {"original": 2.0, "compressed": round(2.0 / speedup, 4)}},
        "speedup": {key: speedup},
        "speedup_ci": {key: f"{speedup:.2f}x ({low:.2f}-{high:.2f})"} if low is not None else {},
        "speedup_interval": {key: {"low": low, "high": high} if low is not None else
                             {"low": None, "high": None, "reason": "one round: no spread between rounds to resample"}},
        "fidelity": {"cosine_similarity": 0.9999, "max_abs_diff": 0.01, "top1_agreement": 1.0, "worst_cosine": worst},
        "fidelity_on": on, "steps": ["quantize.int8_static"],
    }
    return JobSummary.model_validate(data | fields)


DEFAULT = Budget.from_evaluate({"batch_sizes": [1]})


def test_the_budget_of_a_steps_job_and_of_a_goal():
    assert Budget.from_evaluate({"batch_sizes": [1]}).model_dump() == {
        "objective": "latency", "batch_size": 1, "min_cosine": 0.99, "max_accuracy_drop": 1.0, "max_latency_ms": None,
        "max_size_bytes": None, "min_speedup": None}
    stored = {"batch_sizes": [8, 32], "objective": "size", "objective_batch_size": None, "min_cosine": 0.95}
    assert Budget.from_evaluate(stored) == Budget(objective="size", batch_size=8, min_cosine=0.95)
    goal = {"objective": "latency", "batch_size": 4, "min_cosine": None, "max_accuracy_drop": 0.5,
            "max_latency_ms": 3.0, "max_size_bytes": None, "time_budget_s": 900}
    assert Budget.from_goal(goal) == Budget(batch_size=4, min_cosine=None, max_accuracy_drop=0.5, max_latency_ms=3.0)


def test_faster_and_faithful_is_beneficial_with_every_check_named():
    verdict = judge(summary(), DEFAULT)
    assert verdict.verdict == "beneficial"
    assert verdict.reason == ("faster: 1.80x (1.60-2.00) at batch 1, the interval's lower bound is above 1.00; outputs "
                              "kept: worst-sample cosine 0.9995 >= 0.99 on dataset eval.npz (64 samples)")
    assert [(c.name, c.passed, c.value, c.limit) for c in verdict.checks] == [
        ("objective", True, 1.6, 1.0), ("min_cosine", True, 0.9995, 0.99)]
    assert verdict.improvement == {"speedup": 1.8, "low": 1.6, "high": 2.0, "batch_size": 1}
    dumped = verdict.model_dump(mode="json")
    assert dumped["budget"] == {"objective": "latency", "batch_size": 1, "min_cosine": 0.99, "max_accuracy_drop": 1.0,
                                "max_latency_ms": None, "max_size_bytes": None, "min_speedup": None}


@pytest.mark.parametrize(("figures", "reason"), [
    ((0.78, 0.70, 0.85), "not faster: 0.78x (0.70-0.85) at batch 1, the interval's lower bound is not above 1.00 "
                         "(slower: the whole interval is below 1.00)"),
    ((1.04, 0.97, 1.10), "not faster: 1.04x (0.97-1.10) at batch 1, the interval's lower bound is not above 1.00 "
                         "(the models are not told apart)"),
    ((1.30, None, None), "no interval around the speedup 1.30x at batch 1 (one round: no spread between rounds to "
                         "resample): one figure alone cannot tell a gain from noise"),
])
def test_slower_or_within_the_noise_or_without_an_interval_is_not_beneficial(figures, reason):
    verdict = judge(summary(*figures), DEFAULT)
    assert verdict.verdict == "not_beneficial"
    assert verdict.reason == reason  # the fidelity check held, so the reason names the speed alone


def test_a_goals_min_speedup_is_the_least_gain_the_lower_bound_must_reach():
    least = Budget.from_goal({"objective": "latency", "batch_size": 1, "min_cosine": 0.99, "min_speedup": 1.3})
    held = judge(summary(1.5, 1.35, 1.6), least)
    assert held.verdict == "beneficial" and "reaches the goal's min_speedup 1.3" in held.reason
    assert (held.checks[0].name, held.checks[0].value, held.checks[0].limit) == ("objective", 1.35, 1.3)
    short = judge(summary(1.25, 1.18, 1.3), least)  # faster beyond the noise, but not by the gain asked
    assert short.verdict == "not_beneficial"
    assert short.reason.startswith("not fast enough: 1.25x (1.18-1.30) at batch 1, the interval's lower bound 1.18 "
                                   "is below the goal's min_speedup 1.3 (faster, but not by the least gain asked)")
    assert "slower: the whole interval" in judge(summary(0.8, 0.7, 0.9), least).reason
    assert judge(summary(1.25, 1.18, 1.3), DEFAULT).verdict == "beneficial"  # without it: above 1.00 is enough


def test_a_lower_bound_that_rounds_to_one_is_shown_with_its_deciding_digit():
    assert "lower bound (1.004) is above 1.00" in judge(summary(1.05, 1.004, 1.09), DEFAULT).reason
    assert "lower bound (0.998) is not above 1.00" in judge(summary(1.05, 0.998, 1.09), DEFAULT).reason


def test_faster_but_unfaithful_is_not_beneficial_and_says_where_fidelity_was_taken():
    verdict = judge(summary(worst=0.83), DEFAULT)
    assert verdict.verdict == "not_beneficial"
    assert verdict.reason == "outputs moved: worst-sample cosine 0.8300 < 0.99 on dataset eval.npz (64 samples)"
    random_inputs = judge(summary(worst=0.98996, on="synthetic random inputs (no eval dataset)"), DEFAULT)
    assert random_inputs.reason == ("outputs moved: worst-sample cosine 0.9899 < 0.99 on synthetic random inputs (no "
                                    "eval dataset)")
    assert judge(summary(worst=0.83), Budget(batch_size=1, min_cosine=0.8)).verdict == "beneficial"


def test_an_accuracy_drop_over_budget_is_not_beneficial():
    def with_drop(points: float) -> JobSummary:
        return summary(accuracy={"samples": 397, "original_top1": 0.975, "compressed_top1": 0.975 - points / 100,
                                 "top1_drop_points": points, "original_top5": None, "compressed_top5": None})

    verdict = judge(with_drop(2.4), DEFAULT)
    assert verdict.verdict == "not_beneficial"
    assert verdict.reason == "top-1 dropped 2.40 points > 1 (97.50% -> 95.10% on 397 samples)"
    assert judge(with_drop(0.5), DEFAULT).verdict == "beneficial"
    assert judge(with_drop(2.4), Budget(batch_size=1, max_accuracy_drop=3.0)).verdict == "beneficial"
    # no labels, no accuracy check: the summary without `accuracy` is judged on speed and fidelity
    assert [c.name for c in judge(summary(), DEFAULT).checks] == ["objective", "min_cosine"]


def test_the_size_objective_judges_the_file_not_the_speed():
    size = Budget(objective="size", batch_size=1)
    slower_but_smaller = judge(summary(0.5, 0.45, 0.55), size)
    assert slower_but_smaller.verdict == "beneficial"
    assert slower_but_smaller.checks[0].text == "smaller: 0.275x the original's size (4.0 MB -> 1.1 MB)"
    assert slower_but_smaller.improvement == {"size_ratio": 0.275, "original_bytes": 4_000_000,
                                              "compressed_bytes": 1_100_000}
    larger = judge(summary(size_ratio=1.02, compressed_size_bytes=4_080_000), size)
    assert larger.verdict == "not_beneficial"
    assert larger.reason == "not smaller: size ratio 1.02 (4.0 MB -> 4.1 MB) is not below 1.00"


def test_a_skipped_objective_batch_size_is_not_beneficial_with_the_reason():
    skipped = summary(skipped_batch_sizes=[{"batch_size": 8, "reason": "input 'images' has a fixed batch of 1"}])
    verdict = judge(skipped, Budget(batch_size=8))
    assert verdict.verdict == "not_beneficial"
    assert verdict.reason == ("not measured at batch 8, the batch size the objective names: input 'images' has a "
                              "fixed batch of 1")
    assert judge(summary(), Budget(batch_size=4)).reason.startswith("not measured at batch 4")


def test_max_latency_and_max_size_hold_or_fail_with_their_figures():
    budget = Budget(batch_size=1, max_latency_ms=1.0, max_size_bytes=1_000_000)
    verdict = judge(summary(), budget)  # p50 1.111 ms, 1.1 MB
    assert verdict.verdict == "not_beneficial"
    assert verdict.reason == "p50 1.111 ms > 1 ms at batch 1; size 1.1 MB > 1.0 MB"
    assert judge(summary(), Budget(batch_size=1, max_latency_ms=1.2, max_size_bytes=2_000_000)).verdict == "beneficial"


def test_a_target_job_is_judged_on_its_total_speedup():
    target = summary(3.4, 3.2, 3.6, target={"runtime": "openvino", "device": "cpu", "precision": "bf16"})
    verdict = judge(target, DEFAULT)
    assert verdict.verdict == "beneficial"
    assert verdict.checks[0].text == ("faster: 3.40x (3.20-3.60) at batch 1 on openvino/bf16 (against the original on "
                                      "ONNX Runtime fp32), the interval's lower bound is above 1.00")


def test_a_verdict_survives_the_report_round_trip_and_an_old_summary_loads_without_one():
    judged = summary()
    judged.verdict = judge(judged, DEFAULT)
    again = JobSummary.model_validate(judged.model_dump(mode="json"))
    assert again.verdict == judged.verdict
    old = judged.model_dump(mode="json")
    del old["verdict"], old["speedup_interval"]
    assert "verdict" not in JobSummary.model_validate(old).model_dump(mode="json")


# --- the Pareto front --------------------------------------------------------------------------------------

def point(name, p50, size, cosine, energy=None):
    return {"name": name, "p50_ms": p50, "size_bytes": size, "worst_cosine": cosine, "energy_j": energy}


def fronts(points) -> dict[str, list[str]]:
    """name -> the names that dominate it ([] on the front)."""
    return {p.name: p.dominated_by for p in pareto_front(points)}


def test_a_point_beaten_on_every_count_is_off_the_front_and_names_who_beat_it():
    points = [point("original", 10.0, 4000, 1.0), point("int8", 5.0, 1000, 0.995),
              point("broken", 6.0, 1200, 0.80), point("pruned", 4.0, 3000, 0.90)]
    assert fronts(points) == {"original": [], "int8": [], "broken": ["int8"], "pruned": []}
    marked = pareto_front(points)
    assert [p.on_front for p in marked] == [True, True, False, True]


def test_ties_stay_on_the_front_and_equal_on_all_but_one_count_is_dominated():
    assert fronts([point("a", 5.0, 1000, 0.99), point("b", 5.0, 1000, 0.99)]) == {"a": [], "b": []}
    assert fronts([point("a", 5.0, 1000, 0.99), point("b", 5.0, 1000, 0.98)]) == {"a": [], "b": ["a"]}


def test_a_dimension_null_for_any_point_is_left_out():
    # energy decides between a and b only when every point has it
    with_energy = [point("a", 5.0, 1000, 0.99, 0.02), point("b", 5.0, 1000, 0.99, 0.01)]
    assert fronts(with_energy) == {"a": ["b"], "b": []}
    one_missing = [point("a", 5.0, 1000, 0.99, 0.02), point("b", 5.0, 1000, 0.99, None)]
    assert fronts(one_missing) == {"a": [], "b": []}
    assert pareto_front([point("a", None, None, None)])[0].on_front


def test_a_steps_job_points_are_the_original_and_each_step():
    single = job_points(summary(), 1)
    assert single == [point("original", 2.0, 4_000_000, 1.0), point("step 1 (quantize.int8_static)", 1.1111, 1_100_000,
                                                                   0.9995)]
    trajectory = [{"step": i, "method": m, "artifact": a, "size_bytes": size, "size_ratio": None, "speedup": None,
                   "latency_p50_ms": {"1": p50}, "top1": None, "top1_drop_points": None, "cosine": 0.99,
                   "worst_cosine": worst}
                  for i, m, a, size, p50, worst in ((1, "prune.magnitude", "step-1.onnx", 4_000_000, 2.1, 0.97),
                                                    (2, "quantize.int8_static", "model.onnx", 1_100_000, 1.1, 0.96))]
    names = fronts(job_points(summary(trajectory=trajectory), 1))
    assert names == {"original": [], "step 1 (prune.magnitude)": ["original"], "step 2 (quantize.int8_static)": []}


# --- end to end: `modelpress run` ------------------------------------------------------------------------------

def run_job(http, model: bytes, filename: str, **spec) -> tuple[dict, dict]:  # noqa: F811
    created = http.post("/v1/models", files={"file": (filename, model)})
    assert created.status_code == 201, created.text
    submitted = http.post("/v1/jobs", json={"model_id": created.json()["id"]} | spec)
    assert submitted.status_code == 202, submitted.text
    job = wait_for_job(http, submitted.json()["id"])
    assert job["status"] == "succeeded", job
    report = http.get(f"/v1/jobs/{job['id']}/report").json()
    load_report(report)  # the typed report, verdict and front included
    return job, report


def test_dynamic_int8_on_a_conv_model_is_not_beneficial_but_still_hands_over_its_model(http):  # noqa: F811
    """The digits CNN at batch 32: ConvInteger runs some 8x slower than float Conv on this x86 CPU."""
    onnx_bytes, _, _ = digits_classifier("cnn")
    job, report = run_job(http, onnx_bytes, "digits-cnn.onnx", steps=[{"method": "quantize.int8_dynamic"}],
                          evaluate={"batch_sizes": [32], "warmup": 2, "iterations": 24})
    verdict = job["summary"]["verdict"]
    assert verdict["verdict"] == "not_beneficial", verdict
    speedup = job["summary"]["speedup"]["32"]
    assert speedup < 0.5, job["summary"]
    assert verdict["reason"].startswith(f"not faster: {job['summary']['speedup_ci']['32']} at batch 32")
    assert job["message"].startswith("not beneficial: not faster:")
    assert report["verdict"] == verdict and verdict["budget"]["batch_size"] == 32
    names = {a["name"] for a in http.get(f"/v1/jobs/{job['id']}/artifacts").json()}
    assert "model.onnx" in names  # the user asked for this step: its model is there, the verdict says what it is
    front = {p["name"]: p for p in report["pareto"]}
    assert front["original"]["on_front"]  # faster and exact: nothing beats the original on both counts
    assert front["step 1 (quantize.int8_dynamic)"]["p50_ms"] > front["original"]["p50_ms"]


@pytest.mark.skipif(not (SHARED_MODELS / "ultraface-rfb320").is_dir(), reason="../shared/models is absent")
def test_openvino_bf16_on_a_real_detector_is_beneficial(http):  # noqa: F811
    """UltraFace RFB-320 lowered to OpenVINO at bf16 runs faster than on ONNX Runtime fp32 on a CPU with BF16,
    with its worst sample above cosine 0.99. How much faster is bench/'s to say: a speed goal is met in a
    benchmark, never in a timed test (a fixed "low > 1.5" failed at 1.04 on loaded CI cores); the beneficial
    verdict already says the interval's low end is above 1."""
    import time

    pytest.importorskip("openvino")
    deadline = time.monotonic() + 90  # the worker registers its targets a moment after the API answers
    while not (served := [t["precision"] for t in http.get("/v1/targets").json()["targets"]
                          if t["runtime"] == "openvino"]):
        assert time.monotonic() < deadline, "the worker registered no OpenVINO target"
        time.sleep(0.5)
    if "bf16" not in served:
        pytest.skip(f"this CPU has no BF16: the worker serves openvino/cpu {served}")
    model = (SHARED_MODELS / "ultraface-rfb320" / "version-RFB-320.onnx").read_bytes()
    job, report = run_job(http, model, "version-RFB-320.onnx",
                          target={"runtime": "openvino", "device": "cpu", "precision": "bf16"},
                          evaluate={"batch_sizes": [1], "warmup": 2, "iterations": 24})
    summary = job["summary"]
    verdict = summary["verdict"]
    assert verdict["verdict"] == "beneficial", verdict
    assert verdict["reason"].startswith(f"faster: {summary['speedup_ci']['1']} at batch 1 on openvino/bf16")
    assert job["message"].startswith("beneficial: faster:")
    assert [p["on_front"] for p in report["pareto"]] == [True, True]  # faster but not exact: both on the front
