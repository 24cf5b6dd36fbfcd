"""prune.channels, prune.magnitude and prune.2_4 through the API on the worker's pipeline.

Models are trained here on scikit-learn's digits (bench.common.digits_classifier); every
figure a job reports is checked against an independent computation on the downloaded model.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from tests.helpers import digits_classifier
from tests.methods.factories import FAST, download, submit_and_run, weights


def top1(model_bytes: bytes, x: np.ndarray, y: np.ndarray) -> float:
    logits = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]
    return float((logits.argmax(1) == y).mean())


def test_channels_with_fine_tuning_gives_a_smaller_dense_model_that_keeps_accuracy(client, alice, digits):
    step = {"method": "prune.channels", "params": {"ratio": 0.5, "train_dataset_id": digits["train"],
                                                   "eval_dataset_id": digits["eval"], "epochs": 8, "lr": 2e-3}}
    job = submit_and_run(client, alice, digits["model"], [step], FAST | {"eval_dataset_id": digits["eval"]})
    assert job["status"] == "succeeded", job
    result = download(client, alice, job["id"])

    # The channels are really gone: the first conv keeps 8 of 16 filters, the second 16 of 32; the head stays whole.
    shapes = sorted(w.shape for w in weights(result).values())
    assert shapes == sorted([(8, 1, 3, 3), (16, 8, 3, 3), (10, 256)]), shapes
    session = ort.InferenceSession(result, providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"] and [o.name for o in session.get_outputs()] == ["logits"]
    assert session.get_inputs()[0].shape[0] == "batch"  # the dynamic batch axis survives the round trip

    acc = job["summary"]["accuracy"]
    x_eval, y_eval = digits["x"][200:], digits["y"][200:]
    assert acc["compressed_top1"] == pytest.approx(top1(result, x_eval, y_eval), abs=1e-6)
    assert acc["original_top1"] == pytest.approx(top1(digits["onnx"], x_eval, y_eval), abs=1e-6)
    assert acc["top1_drop_points"] <= 3.0, acc  # measured: 0.5 points

    report = client.get(f"/v1/jobs/{job['id']}/report", headers=alice).json()
    details = report["steps"][0]["details"]
    # Both conversions were checked on the step's own data, not on generated inputs.
    assert details["conversion"]["check"]["inputs"] == details["export"]["check"]["inputs"] == "dataset"
    assert details["pruning"]["params_ratio"] < 0.6
    tuning = details["fine_tuning"]
    assert tuning["metric_name"] == "accuracy" and tuning["metric_after"] > tuning["metric_before"]
    assert len(tuning["history"]) >= 1
    messages = [e["message"] for e in client.get(f"/v1/jobs/{job['id']}/events", headers=alice).json()]
    assert any("fine-tuning epoch" in (m or "") for m in messages)


def test_magnitude_stores_zeros_and_says_dense_runtimes_gain_nothing(client, alice, digits):
    step = {"method": "prune.magnitude", "params": {"sparsity": 0.8, "train_dataset_id": digits["train"],
                                                    "epochs": 4}}
    job = submit_and_run(client, alice, digits["model"], [step])
    assert job["status"] == "succeeded", job
    result = download(client, alice, job["id"])
    pruned = np.concatenate([w.ravel() for w in weights(result).values()])
    assert (pruned == 0).mean() == pytest.approx(0.8, abs=0.01)
    details = client.get(f"/v1/jobs/{job['id']}/report", headers=alice).json()["steps"][0]["details"]
    assert details["sparsity"]["total"]["sparsity"] == pytest.approx(0.8, abs=0.01)
    sizes = details["compressed_size"]
    assert sizes["result"]["raw"] == len(result)
    assert sizes["result"]["zstd"] < 0.5 * sizes["original"]["zstd"]
    assert "same latency" in details["warnings"][0]
    assert any("prune.magnitude" in n and "zeros" in n for n in job["summary"]["notes"])


def test_gradual_magnitude_without_labels_distills_from_the_unpruned_model(client, alice, digits):
    step = {"method": "prune.magnitude", "params": {"sparsity": 0.7, "schedule": "gradual", "epochs": 4,
                                                    "train_dataset_id": digits["train_unlabelled"]}}
    job = submit_and_run(client, alice, digits["model"], [step])
    assert job["status"] == "succeeded", job
    details = client.get(f"/v1/jobs/{job['id']}/report", headers=alice).json()["steps"][0]["details"]
    assert details["fine_tuning"]["metric_name"] == "cosine"
    assert details["sparsity"]["total"]["sparsity"] == pytest.approx(0.7, abs=0.01)
    assert job["summary"]["fidelity"]["cosine_similarity"] > 0.95


def test_2_4_on_an_mlp_keeps_two_of_every_four_and_claims_no_cpu_speedup(client, alice):
    onnx_bytes, x, _ = digits_classifier("mlp")
    model = client.post("/v1/models", files={"file": ("mlp.onnx", onnx_bytes)}, headers=alice).json()
    job = submit_and_run(client, alice, model["id"], [{"method": "prune.2_4"}])
    assert job["status"] == "succeeded", job
    for w in weights(download(client, alice, job["id"])).values():
        # ONNX Gemm weights here are [out, in] (transB=1): groups of 4 run along the input axis
        groups = w.reshape(w.shape[0], -1, 4)
        assert ((groups != 0).sum(axis=2) <= 2).all()
    details = client.get(f"/v1/jobs/{job['id']}/report", headers=alice).json()["steps"][0]["details"]
    assert details["pattern"]["fraction"] == 1.0
    import torch

    if torch.cuda.is_available():
        assert details["sparse_tensor_cores"]["available"] is True
    else:
        assert details["sparse_tensor_cores"]["available"] is False
        assert "no CPU speedup" in details["sparse_tensor_cores"]["reason"]


def test_a_chain_prune_then_quantize_keeps_every_step(client, alice, digits):
    steps = [{"method": "prune.channels", "params": {"ratio": 0.25, "round_to": 4}},
             {"method": "quantize.int8_static", "params": {"calibration_dataset_id": digits["train_unlabelled"]}}]
    job = submit_and_run(client, alice, digits["model"], steps)
    assert job["status"] == "succeeded", job
    names = {a["name"] for a in client.get(f"/v1/jobs/{job['id']}/artifacts", headers=alice).json()}
    assert {"step-1-prune.channels.onnx", "model.onnx", "report.json"} <= names
    step1 = download(client, alice, job["id"], "step-1-prune.channels.onnx")
    assert (12, 1, 3, 3) in [w.shape for w in weights(step1).values()]


@pytest.mark.parametrize("params,needle", [
    ({}, "exactly one of ratio"),
    ({"ratio": 0.5, "target_params_ratio": 0.5}, "exactly one of ratio"),
    ({"ratio": 0.5, "importance": "taylor"}, "train_dataset_id"),
    ({"ratio": 1.5}, "ratio"),
])
def test_bad_channel_params_are_422_before_anything_is_queued(client, alice, digits, params, needle):
    resp = client.post("/v1/jobs", json={"model_id": digits["model"], "steps": [{"method": "prune.channels",
                                                                                "params": params}]}, headers=alice)
    assert resp.status_code == 422, resp.text
    assert needle in resp.json()["detail"]


def test_gradual_schedule_without_training_data_is_422(client, alice, digits):
    resp = client.post("/v1/jobs", json={"model_id": digits["model"], "steps": [
        {"method": "prune.magnitude", "params": {"sparsity": 0.5, "schedule": "gradual"}}]}, headers=alice)
    assert resp.status_code == 422 and "train_dataset_id" in resp.json()["detail"]


def test_an_ignored_layer_that_does_not_exist_fails_the_job_naming_it(client, alice, digits):
    job = submit_and_run(client, alice, digits["model"], [
        {"method": "prune.channels", "params": {"ratio": 0.5, "ignored_layers": ["no_such_layer"]}}])
    assert job["status"] == "failed"
    assert job["error"]["code"] == "invalid_params"
    assert "no_such_layer" in job["error"]["message"] and "Conv" in job["error"]["message"]


def test_ignored_layers_by_onnx_node_name_stay_whole(client, alice, digits):
    first_conv = next(n.name for n in onnx.load_from_string(digits["onnx"]).graph.node if n.op_type == "Conv")
    job = submit_and_run(client, alice, digits["model"], [
        {"method": "prune.channels", "params": {"ratio": 0.5, "ignored_layers": [first_conv]}}])
    assert job["status"] == "succeeded", job
    shapes = [w.shape for w in weights(download(client, alice, job["id"])).values()]
    assert (16, 1, 3, 3) in shapes and (16, 16, 3, 3) in shapes


def test_a_model_with_an_op_pytorch_cannot_take_fails_naming_the_op_and_node(client, alice):
    from onnx import TensorProto, helper

    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((10, 4)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"], name="project"),
         helper.make_node("Hardmax", ["h"], ["y"], name="pick_one", axis=-1)],
        "hardmax", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 10])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])], [weight])
    model_bytes = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]).SerializeToString()
    ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])  # ONNX Runtime runs it; PyTorch cannot
    model = client.post("/v1/models", files={"file": ("hardmax.onnx", model_bytes)}, headers=alice).json()
    job = submit_and_run(client, alice, model["id"], [{"method": "prune.magnitude", "params": {"sparsity": 0.5}}])
    assert job["status"] == "failed"
    assert job["error"]["code"] == "unsupported_op"
    assert "Hardmax" in job["error"]["message"] and "pick_one" in job["error"]["message"]
    names = {a["name"] for a in client.get(f"/v1/jobs/{job['id']}/artifacts", headers=alice).json()}
    assert "model.onnx" not in names


def test_params_and_macs_are_counted_from_the_graph(tmp_path, cnn):
    from workers.onnx_tools.counting import count

    path = tmp_path / "cnn.onnx"
    path.write_bytes(cnn[0])
    counted = count(path, batch=2)
    # conv 1->16 (3x3) and conv 16->32 (3x3) on 8x8, then Linear 512->10; per sample:
    per_sample = 16 * 64 * 9 + 32 * 64 * 16 * 9 + 512 * 10
    assert counted["macs"] == 2 * per_sample
    assert counted["params"] == (16 * 9 + 16) + (32 * 16 * 9 + 32) + (512 * 10 + 10)
