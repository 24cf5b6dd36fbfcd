"""Jobs that name datasets: checked against the model at submit time, loaded by the worker, accuracy reported."""
from __future__ import annotations

import io

import numpy as np
import onnxruntime as ort
import pytest

from app.dbmodels import Job, JobDataset
from tests.helpers import digits_classifier, row_count
from workers.supervise import run_job

FAST = {"batch_sizes": [1], "warmup": 1, "iterations": 4}


def npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


@pytest.fixture
def digits(client, alice):
    onnx_bytes, x, y = digits_classifier("mlp")
    model = client.post("/v1/models", files={"file": ("digits.onnx", onnx_bytes)}, headers=alice).json()
    data = client.post("/v1/datasets", files={"file": ("digits.npz", npz(features=x, labels=y))},
                       data={"name": "digits-test"}, headers=alice)
    assert data.status_code == 201, data.text
    return {"model": model, "dataset": data.json(), "onnx": onnx_bytes, "x": x, "y": y}


def test_eval_dataset_gives_accuracy_in_summary_and_report(client, alice, digits):
    spec = {"model_id": digits["model"]["id"], "steps": [{"method": "quantize.int8_dynamic"}],
            "evaluate": FAST | {"eval_dataset_id": digits["dataset"]["id"]}}
    job = client.post("/v1/jobs", json=spec, headers=alice).json()
    run_job(job["id"])
    job = client.get(f"/v1/jobs/{job['id']}", headers=alice).json()
    assert job["status"] == "succeeded", job
    acc = job["summary"]["accuracy"]
    # Independent count on the downloaded result.
    result = client.get(f"/v1/jobs/{job['id']}/artifacts/model.onnx", headers=alice).content
    logits = ort.InferenceSession(result, providers=["CPUExecutionProvider"]).run(None, {"features": digits["x"]})[0]
    assert acc["compressed_top1"] == pytest.approx(float((logits.argmax(1) == digits["y"]).mean()), abs=1e-6)
    assert acc["original_top1"] > 0.9 and acc["samples"] == len(digits["y"])
    assert job["summary"]["fidelity_on"] == f"dataset digits-test ({len(digits['y'])} samples)"
    assert "top-1" in job["message"]
    report = client.get(f"/v1/jobs/{job['id']}/report", headers=alice).json()
    assert report["measurement"]["dataset"]["accuracy"]["original"]["top1"] == acc["original_top1"]


@pytest.mark.parametrize("arrays,needle", [
    ({"pixels": np.zeros((4, 64), np.float32)}, "features"),                  # wrong name
    ({"features": np.zeros((4, 64), np.float64)}, "float32"),                 # wrong dtype
    ({"features": np.zeros((4, 32), np.float32)}, "64"),                      # wrong shape
])
def test_dataset_that_does_not_fit_the_model_is_422_and_nothing_queued(client, alice, digits, arrays, needle):
    bad = client.post("/v1/datasets", files={"file": ("bad.npz", npz(**arrays))}, headers=alice).json()
    jobs_before = row_count(Job)
    spec = {"model_id": digits["model"]["id"], "steps": [{"method": "quantize.int8_dynamic"}],
            "evaluate": FAST | {"eval_dataset_id": bad["id"]}}
    resp = client.post("/v1/jobs", json=spec, headers=alice)
    assert resp.status_code == 422, resp.text
    body = resp.json()
    assert body["code"] == "dataset_mismatch" and body["field"] == "evaluate.eval_dataset_id"
    assert needle in body["detail"]
    assert row_count(Job) == jobs_before and row_count(JobDataset) == 0


def test_another_tenants_dataset_is_404(client, alice, bob, digits):
    model = client.post("/v1/models", files={"file": ("digits.onnx", digits["onnx"])}, headers=bob).json()
    spec = {"model_id": model["id"], "steps": [{"method": "quantize.int8_dynamic"}],
            "evaluate": FAST | {"eval_dataset_id": digits["dataset"]["id"]}}
    resp = client.post("/v1/jobs", json=spec, headers=bob)
    assert resp.status_code == 404 and resp.json()["code"] == "dataset_not_found"
    assert row_count(Job) == 0


def test_dataset_linked_to_a_queued_job_cannot_be_deleted(client, alice, digits):
    spec = {"model_id": digits["model"]["id"], "steps": [{"method": "quantize.int8_dynamic"}],
            "evaluate": FAST | {"eval_dataset_id": digits["dataset"]["id"]}}
    job = client.post("/v1/jobs", json=spec, headers=alice).json()
    resp = client.delete(f"/v1/datasets/{digits['dataset']['id']}", headers=alice)
    assert resp.status_code == 409 and resp.json()["code"] == "dataset_in_use"
    run_job(job["id"])
    assert client.delete(f"/v1/datasets/{digits['dataset']['id']}", headers=alice).status_code == 204
