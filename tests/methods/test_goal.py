"""Goal jobs (issue 19): a goal instead of steps, the search over families and targets, a verdict, candidates
stored as they finish, the time budget; and the goal's validation at submit."""
from __future__ import annotations

import io
import time

import numpy as np
import pytest

from tests.helpers import digits_classifier
from tests.stack import wait_for_job

FAST = {"batch_sizes": [1], "warmup": 2, "iterations": 20}


def npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


@pytest.fixture(scope="module")
def cnn():
    return digits_classifier("cnn")


def upload(http, name: str, data: bytes, kind: str = "models") -> str:
    resp = http.post(f"/v1/{kind}", files={"file": (name, data)})
    assert resp.status_code == 201, resp.text
    return resp.json()["id"]


def wait_for_targets(http, timeout: float = 90) -> None:
    """The worker registers what it serves once it is ready, a moment after the API answers."""
    deadline = time.monotonic() + timeout
    while not any(t["runtime"] == "openvino" for t in http.get("/v1/targets").json()["targets"]):
        assert time.monotonic() < deadline, "the worker registered no OpenVINO target"
        time.sleep(0.5)


def test_a_model_alone_runs_the_default_goal_and_ends_with_a_verdict(http, cnn):
    onnx_bytes, x, y = cnn
    wait_for_targets(http)
    model = upload(http, "digits-cnn.onnx", onnx_bytes)
    evaluation = upload(http, "eval.npz", npz(images=x[:200], labels=y[:200]), "datasets")
    created = http.post("/v1/jobs", json={"model_id": model, "evaluate": FAST | {"eval_dataset_id": evaluation}})
    assert created.status_code == 202, created.text
    assert created.json()["goal"]["min_cosine"] == 0.99 and created.json()["steps"] == []
    job = wait_for_job(http, created.json()["id"], timeout=600)
    assert job["status"] == "succeeded", job
    verdict = job["summary"]["verdict"]
    assert verdict["verdict"] in ("beneficial", "not_beneficial") and verdict["reason"]
    report = http.get(f"/v1/jobs/{job['id']}/report").json()
    candidates = {c["name"]: c for c in report["candidates"]}
    assert {"openvino-f32", "int8_static", "int8_dynamic"} <= set(candidates), list(candidates)
    measured = [c for c in candidates.values() if c["status"] == "measured"]
    assert measured and all(c["verdict"]["verdict"] in ("beneficial", "not_beneficial") for c in measured)
    names = {a["name"] for a in http.get(f"/v1/jobs/{job['id']}/artifacts").json()}
    assert {c["artifact"] for c in measured} <= names  # every measured candidate is downloadable
    search = report["search"]
    if verdict["verdict"] == "beneficial":
        chosen = candidates[search["chosen"]]
        assert chosen["verdict"]["verdict"] == "beneficial"
        assert search["result_artifact"] in names
        assert verdict["improvement"]["low"] > 1.0
    else:
        assert "model.onnx" not in names and "model_openvino.zip" not in names
    assert search["elapsed_s"] <= search["time_budget_s"] + 60
