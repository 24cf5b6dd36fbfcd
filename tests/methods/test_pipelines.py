"""Jobs with several steps: each step takes the previous step's model, each intermediate model is kept and measured."""
from __future__ import annotations

import hashlib

import pytest
from sqlalchemy import select

from app.db import session_scope
from app.dbmodels import Measurement
from tests.methods.factories import download, submit_and_run, weights

FAST = {"batch_sizes": [1], "warmup": 1, "iterations": 4}


def test_three_steps_keep_and_measure_every_intermediate_model(client, alice, digits):
    steps = [
        {"method": "prune.channels", "params": {"ratio": 0.5, "train_dataset_id": digits["train"], "epochs": 3}},
        {"method": "prune.magnitude", "params": {"sparsity": 0.5}},
        {"method": "quantize.int8_static", "params": {"calibration_dataset_id": digits["train_unlabelled"]}},
    ]
    job = submit_and_run(client, alice, digits["model"], steps, FAST | {"eval_dataset_id": digits["eval"]})
    assert job["status"] == "succeeded", job
    artifacts = {a["name"]: a for a in client.get(f"/v1/jobs/{job['id']}/artifacts", headers=alice).json()}
    assert {"step-1-prune.channels.onnx", "step-2-prune.magnitude.onnx", "model.onnx", "report.json"} <= artifacts.keys()

    trajectory = job["summary"]["trajectory"]
    assert [t["method"] for t in trajectory] == [s["method"] for s in steps]
    assert [t["artifact"] for t in trajectory] == ["step-1-prune.channels.onnx", "step-2-prune.magnitude.onnx",
                                                   "model.onnx"]
    for entry in trajectory:
        size = len(download(client, alice, job["id"], entry["artifact"]))
        assert entry["size_bytes"] == size
        assert entry["top1"] is not None and entry["latency_p50_ms"]["1"] > 0
    # channel pruning halves the convs; magnitude keeps the size; int8 shrinks it again
    assert trajectory[0]["size_ratio"] < 0.5 and trajectory[2]["size_ratio"] < trajectory[1]["size_ratio"]
    assert trajectory[-1]["top1"] == job["summary"]["accuracy"]["compressed_top1"]
    step2 = download(client, alice, job["id"], "step-2-prune.magnitude.onnx")
    with session_scope() as db:
        roles = set(db.scalars(select(Measurement.model_role).where(Measurement.job_id == job["id"])))
        shas = set(db.scalars(select(Measurement.model_sha256).where(Measurement.model_role == "step-2",
                                                                    Measurement.job_id == job["id"])))
    assert roles == {"baseline", "result", "step-1", "step-2"}
    assert shas == {hashlib.sha256(step2).hexdigest()}


def test_a_failing_second_step_keeps_the_first_steps_model_and_names_the_step(client, alice, digits):
    steps = [{"method": "prune.channels", "params": {"ratio": 0.5}},
             {"method": "prune.channels", "params": {"ratio": 0.5, "ignored_layers": ["no_such_layer"]}}]
    job = submit_and_run(client, alice, digits["model"], steps)
    assert job["status"] == "failed"
    assert job["error"]["code"] == "invalid_params"
    assert job["error"]["message"].startswith("step 2 (prune.channels) failed")
    artifacts = {a["name"]: a for a in client.get(f"/v1/jobs/{job['id']}/artifacts", headers=alice).json()}
    assert set(artifacts) == {"step-1-prune.channels.onnx", "recipe.json"}  # the recipe: stored before step 1
    first = download(client, alice, job["id"], "step-1-prune.channels.onnx")
    assert hashlib.sha256(first).hexdigest() == artifacts["step-1-prune.channels.onnx"]["sha256"]
    assert (8, 1, 3, 3) in [w.shape for w in weights(first).values()]


@pytest.mark.parametrize("student", ["someone-elses", "missing"])
def test_a_student_model_the_caller_does_not_own_is_404(client, alice, bob, digits, student):
    if student == "someone-elses":
        model_id = client.post("/v1/models", files={"file": ("m.onnx", digits["onnx"])}, headers=bob).json()["id"]
    else:
        model_id = "00000000-0000-0000-0000-000000000000"
    resp = client.post("/v1/jobs", headers=alice, json={"model_id": digits["model"], "steps": [
        {"method": "distill.kd", "params": {"student": "model", "student_model_id": model_id,
                                            "train_dataset_id": digits["train"]}}]})
    assert resp.status_code == 404, resp.text
    assert "student_model_id" in resp.json()["detail"]


def test_recipes_are_listed_with_their_steps_and_params_schema(client, alice):
    listed = {r["id"]: r for r in client.get("/v1/recipes", headers=alice).json()}
    assert set(listed) >= {"prune-finetune-int8", "distill-int8", "deep-compression"}
    assert listed["prune-finetune-int8"]["steps"] == ["prune.channels", "quantize.int8_static"]
    assert listed["distill-int8"]["steps"] == ["distill.kd", "quantize.int8_static"]
    assert listed["deep-compression"]["steps"] == ["prune.magnitude", "cluster.kmeans"]
    assert "train_dataset_id" in listed["deep-compression"]["params_schema"]["required"]


def test_prune_finetune_int8_recipe_runs_as_its_steps(client, alice, digits):
    resp = client.post("/v1/jobs", headers=alice, json={
        "model_id": digits["model"], "recipe": "prune-finetune-int8",
        "params": {"train_dataset_id": digits["train"], "eval_dataset_id": digits["eval"], "epochs": 10,
                   "lr": 2e-3},
        "evaluate": FAST | {"eval_dataset_id": digits["eval"]}})
    assert resp.status_code == 202, resp.text
    job = resp.json()
    assert [s["method"] for s in job["steps"]] == ["prune.channels", "quantize.int8_static"]
    assert job["steps"][1]["params"]["calibration_dataset_id"] == digits["train"]
    assert job["recipe"]["id"] == "prune-finetune-int8"
    from workers.supervise import run_job

    run_job(job["id"])
    job = client.get(f"/v1/jobs/{job['id']}", headers=alice).json()
    assert job["status"] == "succeeded", job
    trajectory = job["summary"]["trajectory"]
    assert len(trajectory) == 2, trajectory
    assert job["summary"]["size_ratio"] < 0.3, trajectory
    assert job["summary"]["accuracy"]["top1_drop_points"] <= 3.0, [(t["top1"], t["top1_drop_points"]) for t in trajectory]


def test_deep_compression_recipe_packs_a_small_artifact_with_few_shared_values(client, alice, digits):
    import io

    import onnx
    import zstandard
    from onnx import numpy_helper

    resp = client.post("/v1/jobs", headers=alice, json={
        "model_id": digits["model"], "recipe": "deep-compression",
        "params": {"train_dataset_id": digits["train"], "epochs": 30, "lr": 3e-3, "sparsity": 0.7, "clusters": 8},
        "evaluate": FAST | {"eval_dataset_id": digits["eval"]}})
    assert resp.status_code == 202, resp.text
    from workers.supervise import run_job

    run_job(resp.json()["id"])
    job = client.get(f"/v1/jobs/{resp.json()['id']}", headers=alice).json()
    assert job["status"] == "succeeded", job
    assert job["steps"][0]["params"]["schedule"] == "gradual"
    model = download(client, alice, job["id"])
    packed = download(client, alice, job["id"], "model.onnx.zst")
    assert zstandard.ZstdDecompressor().stream_reader(io.BytesIO(packed)).read() == model
    assert len(packed) * 8 < len(digits["onnx"]), (len(packed), len(digits["onnx"]))
    graph = onnx.load_from_string(model).graph
    codebooks = [numpy_helper.to_array(t) for t in graph.initializer if t.name.endswith("__codebook")]
    assert len(codebooks) == 2 and all(len(c) <= 8 and 0.0 in c for c in codebooks)  # zeros kept as zeros
    assert job["summary"]["accuracy"]["top1_drop_points"] <= 3.0, [(t["top1"], t["cosine"]) for t in job["summary"]["trajectory"]]
    details = client.get(f"/v1/jobs/{job['id']}/report", headers=alice).json()["steps"][1]["details"]
    assert details["sizes"]["zstd_bytes"] == len(packed)
    assert any("model.onnx.zst" in n for n in job["summary"]["notes"])


@pytest.mark.parametrize("body,needle", [
    ({"recipe": "no-such-recipe"}, "unknown recipe"),
    ({"recipe": "prune-finetune-int8", "params": {}}, "train_dataset_id"),
    ({"recipe": "prune-finetune-int8", "params": {"train_dataset_id": "x", "ratio": 2}}, "params.ratio"),
    ({"recipe": "deep-compression", "steps": [{"method": "quantize.fp16"}]}, "either steps or a recipe"),
    # (a model alone is the default goal: tests/methods/test_goal.py)
    ({"goal": {}, "steps": [{"method": "quantize.fp16"}]}, "a goal replaces steps"),
])
def test_bad_recipe_requests_are_422(client, alice, digits, body, needle):
    resp = client.post("/v1/jobs", headers=alice, json={"model_id": digits["model"], **body})
    assert resp.status_code == 422, resp.text
    assert needle in resp.text
