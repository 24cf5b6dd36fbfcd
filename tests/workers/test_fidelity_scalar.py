"""Fidelity of an output with one value per sample (workers.measure.fidelity.OutputComparison).

The cosine of two one-element vectors only compares signs: 1.0 for any two positive probabilities. Such an output is
compared as one vector over the samples seen; here on models built in the test (a [batch, 1] sigmoid, faithful and
reversed copies, a model with a probability beside a score vector, a 0-d output seen once), through measure_pair,
the job summary and the verdict, and on the real silero-vad-fw against its int8 dynamic copy where bench's zoo
cache has it.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from app.reports import Budget, Measurement
from tests.workers.factories import opset_model, save
from workers.measure import measure_pair
from workers.measure.fidelity import OutputComparison, summarize_outputs
from workers.steps import _summary
from workers.verdict import judge

FAST = {"warmup": 1, "iterations": 4}
WIDTH = 8
SILERO = Path(__file__).resolve().parents[2] / "bench/.zoo-cache/models/faster-whisper-1.2.1/silero_vad_v6.onnx"


def scorer(*, sign: float = 1.0, nudge: float = 0.0, scores: bool = False, score_sign: float = 1.0) -> onnx.ModelProto:
    """x [batch, 8] -> prob = sigmoid(sign * (x W + b)) [batch, 1]; with `scores`, also scores = score_sign * x V
    [batch, 4]. `nudge`: relative noise on W (a faithful copy). The weights are the same draw for every variant."""
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((WIDTH, 1)) * 1.5
    weight = weight * (1 + nudge * rng.standard_normal(weight.shape))
    inits = [numpy_helper.from_array((sign * weight).astype(np.float32), "w"),
             numpy_helper.from_array(np.array([sign * 0.3], np.float32), "b")]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["z0"]), helper.make_node("Add", ["z0", "b"], ["z"]),
             helper.make_node("Sigmoid", ["z"], ["prob"])]
    outputs = [helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["batch", 1])]
    if scores:
        vectors = np.random.default_rng(1).standard_normal((WIDTH, 4))
        inits.append(numpy_helper.from_array((score_sign * vectors).astype(np.float32), "v"))
        nodes.append(helper.make_node("MatMul", ["x", "v"], ["scores"]))
        outputs.append(helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", 4]))
    graph = helper.make_graph(nodes, "scorer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", WIDTH])],
                              outputs, initializer=inits)
    return opset_model(graph)


def compare(original: Path, copy: Path, *, batch: int = 4, runs: int = 4) -> list[OutputComparison]:
    """The two models' outputs on standard normal inputs, as workers.measure compares them."""
    sessions = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (original, copy)]
    names = [o.name for o in sessions[0].get_outputs()]
    comparisons = [OutputComparison(name, name, "float") for name in names]
    rng = np.random.default_rng(5)
    for _ in range(runs):
        feed = {"x": rng.standard_normal((batch, WIDTH)).astype(np.float32)}
        for comparison, want, have in zip(comparisons, sessions[0].run(None, feed), sessions[1].run(None, feed)):
            comparison.add(want, have, batch)
    return comparisons


def min_cosine_check(measured: dict):
    """The min_cosine 0.99 check of a steps job's verdict on this measurement."""
    verdict = judge(_summary(Measurement.model_validate(measured), []), Budget(min_cosine=0.99))
    return next(c for c in verdict.checks if c.name == "min_cosine")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("scalar")
    return {
        "original": save(scorer(), folder / "original.onnx"),
        "faithful": save(scorer(nudge=0.001), folder / "faithful.onnx"),
        "reversed": save(scorer(sign=-1.0), folder / "reversed.onnx"),
        "both": save(scorer(scores=True), folder / "both.onnx"),
        "both-reversed": save(scorer(sign=-1.0, scores=True), folder / "both-reversed.onnx"),
        "both-scores-negated": save(scorer(scores=True, score_sign=-1.0), folder / "both-scores-negated.onnx"),
    }


def test_a_faithful_copy_keeps_the_probabilities_over_the_samples(models):
    measured = measure_pair(models["original"], models["faithful"], batch_sizes=[4], **FAST)
    (prob,) = measured["fidelity"]["outputs"]
    samples = measured["fidelity"]["samples"]
    assert samples >= 16
    assert prob["compared"] == f"one value per sample: compared as one vector over the {samples} samples, not sample by " \
        "sample"
    assert 0.9999 < prob["cosine_similarity"] <= 1.0 and prob["min_sample_cosine"] == prob["cosine_similarity"]
    assert prob["correlation"] > 0.9999 and 0 < prob["max_abs_diff_to_spread"] < 0.01
    assert measured["fidelity"]["worst_sample_cosine"] == prob["cosine_similarity"]
    assert "not_compared" not in measured["fidelity"]
    assert min_cosine_check(measured).passed


def test_reversed_probabilities_fail_the_budget_that_per_sample_cosines_passed(models):
    (prob,) = compare(models["original"], models["reversed"])
    # Sample by sample every pair of positive values has cosine 1.0: the figure the budget used to read.
    assert prob.row_cosines == [1.0] * 16
    across = prob.across_samples()
    assert across["cosine"] < 0.9 and across["correlation"] < -0.99 and across["max_abs_diff_to_spread"] > 0.5
    assert prob.cosine_figures() == (across["cosine"], across["cosine"])

    measured = measure_pair(models["original"], models["reversed"], batch_sizes=[4], **FAST)
    assert measured["fidelity"]["worst_sample_cosine"] < 0.9
    check = min_cosine_check(measured)
    assert not check.passed and check.text.startswith("outputs moved: worst-sample cosine 0.")


def test_a_probability_beside_a_score_vector_each_counts_its_own_way(models):
    reversed_prob = compare(models["both"], models["both-reversed"])
    prob, scores = reversed_prob
    assert prob.one_value_per_sample and not scores.one_value_per_sample
    report = summarize_outputs(reversed_prob, batch_size=4, runs=4)
    by_name = {o["name"]: o for o in report["outputs"]}
    assert "compared" not in by_name["scores"] and by_name["scores"]["min_sample_cosine"] == 1.0
    assert by_name["prob"]["min_sample_cosine"] < 0.9
    assert report["worst_sample_cosine"] == by_name["prob"]["min_sample_cosine"]

    # The vector output still counts sample by sample: negated scores fail, the probability is kept.
    negated_scores = summarize_outputs(compare(models["both"], models["both-scores-negated"]), batch_size=4, runs=4)
    by_name = {o["name"]: o for o in negated_scores["outputs"]}
    assert by_name["prob"]["cosine_similarity"] == 1.0 and by_name["scores"]["min_sample_cosine"] == -1.0
    assert negated_scores["worst_sample_cosine"] == -1.0


def test_one_sample_has_no_figure_and_the_budget_is_not_shown_to_hold(models):
    (prob, scores) = compare(models["both"], models["both"], batch=1, runs=1)
    report = prob.report()
    assert report["cosine_similarity"] is None and report["min_sample_cosine"] is None
    assert report["compared"].startswith("one value per sample, and 1 sample(s) with finite values in both models")
    assert prob.cosines == [] and prob.cosine_figures() is None
    assert "equal_fraction" not in report  # a float output, not compared element by element

    summary = summarize_outputs([prob, scores], batch_size=1, runs=1)
    # The score vector's figure still counts; the probability is named as not compared.
    assert summary["worst_sample_cosine"] == 1.0
    assert summary["not_compared"] == [f"output 'prob': {report['compared']}"]
    alone = summarize_outputs([prob], batch_size=1, runs=1)
    assert alone["worst_sample_cosine"] is None and alone["cosine_similarity"] is None


def test_a_single_value_seen_once_fails_the_verdict_and_the_gate(tmp_path, monkeypatch):
    """A 0-d output (the batch's mean) is one value per run; at batch 16 the measurement makes one run (a model too
    slow for more random draws than the 16 samples at least)."""
    import workers.measure

    monkeypatch.setattr(workers.measure, "FIDELITY_SECONDS", 0.0)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "v"], ["scores"]),
         helper.make_node("ReduceMean", ["scores"], ["mean"], keepdims=0)], "mean",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", WIDTH])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", 4]),
         helper.make_tensor_value_info("mean", TensorProto.FLOAT, [])],
        initializer=[numpy_helper.from_array(np.ones((WIDTH, 4), np.float32), "v")])
    path = save(opset_model(graph), tmp_path / "mean.onnx")
    measured = measure_pair(path, path, batch_sizes=[16], **FAST)
    fidelity = measured["fidelity"]
    assert fidelity["runs"] == 1 and fidelity["worst_sample_cosine"] == 1.0
    assert fidelity["not_compared"] == ["output 'mean': one value per sample, and 1 sample(s) with finite values in "
                                        "both models: no figure (the cosine of one value against one compares only "
                                        "their signs)"]
    check = min_cosine_check(measured)
    assert not check.passed and check.value == 1.0
    assert check.text.startswith("outputs not all compared: worst-sample cosine 1.0000 >= 0.99 on synthetic random "
                                 "inputs (no eval dataset) for the others, but output 'mean': one value per sample")

    from workers.gate import judge as gate_judge

    (gate_check,) = gate_judge({"min_cosine": 0.99}, latency={}, fidelity=fidelity, on_dataset=None,
                              size={"baseline": 1, "result": 1}, batch=16)
    assert gate_check["name"] == "min_cosine" and not gate_check["passed"] and "output 'mean'" in gate_check["text"]


def test_silero_vad_against_its_int8_dynamic_copy(tmp_path, capsys):
    """The real model (speech_probs [N]: one probability per chunk of audio); bench/zoo.py fetches it into its cache
    (`.venv/bin/python -c "from bench.zoo import CORPUS; ..."`), which this test does not do."""
    if not SILERO.is_file():
        pytest.skip(f"silero-vad-fw is not in bench's zoo cache ({SILERO}); fetch it with bench.zoo")
    from workers import methods
    from workers.quantize import int8_dynamic  # noqa: F401 - registers the method

    original = shutil.copy(SILERO, tmp_path / "silero.onnx")
    (tmp_path / "int8").mkdir()
    method = methods.get("quantize.int8_dynamic")
    method.run(Path(original), method.params_model(), tmp_path / "int8", None)
    sessions = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
                for p in (original, tmp_path / "int8" / "model.onnx")]
    comparisons = [OutputComparison(o.name, o.name, "float") for o in sessions[0].get_outputs()]
    rng = np.random.default_rng([0, 2])
    wanted, got = [], []
    for _ in range(4):  # what workers.measure draws: 4 runs at batch 4, standard normal floats
        feed = {"input": rng.standard_normal((4, 576)).astype(np.float32),
                "h": rng.standard_normal((1, 1, 128)).astype(np.float32),
                "c": rng.standard_normal((1, 1, 128)).astype(np.float32)}
        outs = [s.run(None, feed) for s in sessions]
        for comparison, want, have in zip(comparisons, *outs):
            comparison.add(want, have, 4)
        wanted.append(outs[0][0])
        got.append(outs[1][0])
    report = summarize_outputs(comparisons, batch_size=4, runs=4)
    probs = next(o for o in report["outputs"] if o["name"] == "speech_probs")
    want, have = np.concatenate(wanted).astype(np.float64), np.concatenate(got).astype(np.float64)
    expected = float(want @ have / np.linalg.norm(want) / np.linalg.norm(have))
    assert probs["min_sample_cosine"] == pytest.approx(expected, abs=1e-8)
    assert probs["correlation"] == pytest.approx(float(np.corrcoef(want, have)[0, 1]), abs=1e-8)
    assert "over the 16 samples" in probs["compared"]
    assert comparisons[0].row_cosines == [1.0] * 16  # probabilities are positive: sample by sample says nothing
    with capsys.disabled():
        print(f"\nsilero-vad-fw vs int8_dynamic, 16 random samples: speech_probs cosine {probs['cosine_similarity']:.4f}"
              f", correlation {probs['correlation']:.4f}, max_abs_diff/spread {probs['max_abs_diff_to_spread']:.4f}; "
              + ", ".join(f"{o['name']} {o['min_sample_cosine']:.4f}" for o in report["outputs"][1:])
              + f"; worst {report['worst_sample_cosine']:.4f}")
