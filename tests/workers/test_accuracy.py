"""Accuracy and fidelity on a dataset, checked against an independent computation."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from tests.helpers import digits_classifier
from workers import methods
from workers.datasets import Dataset
from workers.measure import measure_pair


def independent_top1(path, name: str, x: np.ndarray, y: np.ndarray) -> float:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = np.concatenate([session.run(None, {name: x[i:i + 50]})[0] for i in range(0, len(x), 50)])
    return float((logits.argmax(axis=1) == y).mean())


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    onnx_bytes, x, y = digits_classifier("mlp")
    tmp = tmp_path_factory.mktemp("digits")
    original = tmp / "digits.onnx"
    original.write_bytes(onnx_bytes)
    method = methods.get("quantize.int8_dynamic")
    out = method.run(original, method.params_model(), tmp / "q", methods.StepContext())
    return original, out.model_path, x, y


def test_top1_accuracy_matches_an_independent_count(digits):
    original, quantized, x, y = digits
    measured = measure_pair(original, quantized, batch_sizes=[1], warmup=1, iterations=3,
                            dataset=Dataset(inputs={"features": x}, labels=y, name="digits-test"))
    on = measured["dataset"]
    acc = on["accuracy"]
    assert on["samples"] == len(x) == acc["samples"] == 397
    expected_original = independent_top1(original, "features", x, y)
    expected_result = independent_top1(quantized, "features", x, y)
    assert expected_original > 0.9  # a real, trained classifier
    assert acc["original"]["top1"] == pytest.approx(expected_original, abs=1e-6)
    assert acc["compressed"]["top1"] == pytest.approx(expected_result, abs=1e-6)
    assert acc["top1_drop_points"] == pytest.approx(100 * (expected_original - expected_result), abs=1e-3)
    assert acc["original"]["top5"] is not None and acc["original"]["top5"] >= acc["original"]["top1"]
    assert acc["output"] == "logits" and acc["classes"] == 10
    assert on["fidelity"]["worst_cosine"] <= on["fidelity"]["mean_cosine"] <= 1.0
    assert on["fidelity"]["mean_cosine"] > 0.99
    rows = {(r["model"], r["metric"]): r["value"] for r in measured["measurements"]}
    assert rows[("baseline", "top1_accuracy")] == acc["original"]["top1"]
    assert any("top-1 accuracy on 397 dataset samples" in n for n in measured["notes"])


def test_without_labels_only_fidelity_is_reported(digits):
    original, quantized, x, _ = digits
    measured = measure_pair(original, quantized, batch_sizes=[1], warmup=1, iterations=3,
                            dataset=Dataset(inputs={"features": x[:40]}, name="unlabelled"),
                            dataset_max_samples=33)
    on = measured["dataset"]
    assert on["accuracy"] is None and "no labels" in on["accuracy_note"]
    assert on["samples"] == 33 and on["fidelity"]["samples"] == 33
    assert "first 33 of 40" in " ".join(on["notes"])
    # Independent: per-sample cosine of the two models' logits.
    a = ort.InferenceSession(str(original)).run(None, {"features": x[:33]})[0].astype(np.float64)
    b = ort.InferenceSession(str(quantized)).run(None, {"features": x[:33]})[0].astype(np.float64)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert on["fidelity"]["mean_cosine"] == pytest.approx(cos.mean(), abs=1e-6)
    assert on["fidelity"]["worst_cosine"] == pytest.approx(cos.min(), abs=1e-6)
    assert on["fidelity"]["top1_agreement"] == pytest.approx((a.argmax(1) == b.argmax(1)).mean(), abs=1e-6)


def test_labels_without_a_score_output_give_a_reason(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "id",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])],
    )
    path = tmp_path / "id.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    data = Dataset(inputs={"x": np.arange(6, dtype=np.float32)}, labels=np.array([0, 1, 2, 0, 1, 2]))
    on = measure_pair(path, path, batch_sizes=[1], warmup=0, iterations=1, dataset=data)["dataset"]
    assert on["accuracy"] is None and "no output has the shape [batch, classes]" in on["accuracy_note"]
    assert on["fidelity"]["worst_cosine"] == 1.0


def test_padded_positions_are_left_out_of_fidelity():
    """A transformer's outputs at attention_mask 0 are never read; a result that moves only them is faithful."""
    import numpy as np

    from workers.measure.fidelity import OutputComparison, padding_mask, summarize_outputs

    rng = np.random.default_rng(0)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], np.int64)
    hidden = rng.standard_normal((2, 5, 8)).astype(np.float32)
    moved = hidden.copy()
    moved[0, 3:] = rng.standard_normal((2, 8)) * 100  # only the padding of sample 0 changes
    keep = padding_mask({"input_ids": np.ones((2, 5), np.int64), "attention_mask": mask}, 2)
    assert keep is not None and keep.sum() == 8
    masked, plain = OutputComparison("h", "h", "float"), OutputComparison("h", "h", "float")
    masked.add(hidden, moved, 2, keep)
    plain.add(hidden, moved, 2)
    report = summarize_outputs([masked], batch_size=2, runs=1)
    assert report["worst_sample_cosine"] == 1.0 and report["max_abs_diff"] == 0
    assert "2 padded position(s)" in report["outputs"][0]["padding_left_out"]
    assert summarize_outputs([plain], batch_size=2, runs=1)["worst_sample_cosine"] < 0.5
    # a change at a real position still counts
    moved[1, 0] += 1.0
    again = OutputComparison("h", "h", "float")
    again.add(hidden, moved, 2, keep)
    assert summarize_outputs([again], batch_size=2, runs=1)["worst_sample_cosine"] < 1.0
    assert padding_mask({"attention_mask": np.ones((2, 5), np.int64)}, 2) is None
