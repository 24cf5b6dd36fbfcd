"""The job runner in-process (SQLite): results, idempotency, restart after a lost worker, failures, cancel."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from sqlalchemy import select

from app import catalog
from app.catalog.base import MethodParams, MethodSpec
from app.db import session_scope
from app.dbmodels import Artifact, Job, JobEvent, Measurement
from app.errors import StepFailed
from tests.helpers import row_count, store_files
from workers import methods
from workers.methods.base import StepOutput
from workers.supervise import run_job

FAST = {"batch_sizes": [1, 4], "warmup": 1, "iterations": 4}


@pytest.fixture
def submit(client, alice, mlp_onnx):
    model_id = client.post("/v1/models", files={"file": ("mlp.onnx", mlp_onnx)}, headers=alice).json()["id"]

    def _submit(steps=None, evaluate=FAST) -> str:
        steps = steps or [{"method": "quantize.int8_dynamic"}]
        resp = client.post("/v1/jobs", json={"model_id": model_id, "steps": steps, "evaluate": evaluate}, headers=alice)
        assert resp.status_code == 202, resp.text
        return resp.json()["id"]

    return _submit


@pytest.fixture
def register_method(monkeypatch):
    """Register a method for the duration of one test. It lives in this process only, so the job runs here
    too (MODELPRESS_JOB_ISOLATED=false); every other test runs jobs in their fenced process."""
    from app.settings import get_settings

    monkeypatch.setenv("MODELPRESS_JOB_ISOLATED", "false")
    get_settings.cache_clear()
    added = []

    def _register(method_id: str, fn) -> None:
        catalog.register(MethodSpec(id=method_id, version=1, description="test only", params_model=MethodParams))
        methods.implements(method_id)(fn)
        added.append(method_id)

    yield _register
    for method_id in added:
        methods.REGISTRY.pop(method_id, None)
        catalog.SPECS.pop(method_id, None)
    get_settings.cache_clear()


def job_row(job_id: str) -> Job:
    with session_scope() as db:
        return db.get(Job, job_id)


def test_job_runs_to_success_with_artifacts_measurements_and_events(client, alice, submit, data_dir):
    job_id = submit()
    run_job(job_id)
    job = client.get(f"/v1/jobs/{job_id}", headers=alice).json()
    assert job["status"] == "succeeded", job
    assert job["attempts"] == 1 and job["progress"] == 1.0
    summary = job["summary"]
    assert summary["size_ratio"] < 0.5
    assert set(summary["speedup"]) == {"1", "4"}
    assert summary["fidelity"]["cosine_similarity"] > 0.99
    names = {a["name"] for a in client.get(f"/v1/jobs/{job_id}/artifacts", headers=alice).json()}
    assert names == {"model.onnx", "report.json", "latency-samples.json", "recipe.json"}
    report = client.get(f"/v1/jobs/{job_id}/report", headers=alice).json()
    assert report["steps"][0]["method"] == "quantize.int8_dynamic"
    assert report["measurement"]["environment"]["threads"] >= 1
    with session_scope() as db:
        roles = set(db.scalars(select(Measurement.model_role).where(Measurement.job_id == job_id)))
        batch_sizes = set(db.scalars(select(Measurement.batch_size).where(Measurement.job_id == job_id)))
    assert roles == {"baseline", "result"}
    assert {1, 4} <= batch_sizes
    events = client.get(f"/v1/jobs/{job_id}/events", headers=alice).json()
    states = [e["status"] for e in events if e["kind"] == "state"]
    assert states == ["queued", "running", "succeeded"]
    assert any(e["kind"] == "progress" and e["stage"] == "measuring" for e in events)


def test_running_twice_yields_one_result(client, alice, submit, data_dir):
    job_id = submit()
    run_job(job_id)
    files, measurements, events = store_files(data_dir), row_count(Measurement), row_count(JobEvent)
    run_job(job_id)  # a duplicate delivery of the same message
    assert job_row(job_id).attempts == 1
    assert store_files(data_dir) == files
    assert row_count(Measurement) == measurements and row_count(JobEvent) == events


def test_job_found_running_is_started_over_cleanly(client, alice, submit, data_dir):
    """Its worker died mid-job (acks_late redelivered the message): no duplicate artifacts."""
    job_id = submit()
    run_job(job_id)
    with session_scope() as db:
        job = db.get(Job, job_id)
        job.status, job.report, job.summary, job.finished_at = "running", None, None, None
    run_job(job_id)
    job = job_row(job_id)
    assert job.status == "succeeded" and job.attempts == 2
    with session_scope() as db:
        names = list(db.scalars(select(Artifact.name).where(Artifact.job_id == job_id)))
    assert sorted(names) == ["latency-samples.json", "model.onnx", "recipe.json", "report.json"]
    messages = [e["message"] for e in client.get(f"/v1/jobs/{job_id}/events", headers=alice).json()]
    assert any("again after a lost worker" in (m or "") for m in messages)


def test_failing_step_fails_the_job_with_its_reason(client, alice, submit, register_method):
    def refuse(path: Path, params, out_dir: Path, ctx=None) -> StepOutput:
        raise StepFailed("the model has no weights to quantize", code="nothing_to_quantize")

    register_method("test.refuse", refuse)
    job_id = submit([{"method": "quantize.int8_dynamic"}, {"method": "test.refuse"}])
    run_job(job_id)
    job = client.get(f"/v1/jobs/{job_id}", headers=alice).json()
    assert job["status"] == "failed"
    assert job["error"]["code"] == "nothing_to_quantize"
    assert "step 2 (test.refuse)" in job["error"]["message"]
    # The steps before the failure stay downloadable, and the recipe it was run with (written before the steps).
    names = [a["name"] for a in client.get(f"/v1/jobs/{job_id}/artifacts", headers=alice).json()]
    assert sorted(names) == ["recipe.json", "step-1-quantize.int8_dynamic.onnx"]


def test_unexpected_error_is_reported_not_swallowed(client, alice, submit, register_method):
    def crash(path, params, out_dir, ctx=None):
        raise RuntimeError("out of disk")

    register_method("test.crash", crash)
    job_id = submit([{"method": "test.crash"}])
    run_job(job_id)
    job = client.get(f"/v1/jobs/{job_id}", headers=alice).json()
    assert job["status"] == "failed"
    assert job["error"]["code"] == "step_failed"
    assert "RuntimeError: out of disk" in job["error"]["message"]
    assert "no specific code" in job["error"]["message"]  # the last resort says that it is one


def test_cancel_while_running_stops_at_the_next_step_boundary(client, alice, submit, register_method):
    def copy_and_cancel(path: Path, params, out_dir: Path, ctx=None) -> StepOutput:
        # The user cancels while this step runs.
        client.post(f"/v1/jobs/{job_id}/cancel", headers=alice)
        target = out_dir / "model.onnx"
        shutil.copyfile(path, target)
        return StepOutput(model_path=target, details={})

    register_method("test.copy_and_cancel", copy_and_cancel)
    job_id = submit([{"method": "test.copy_and_cancel"}, {"method": "quantize.int8_dynamic"}])
    run_job(job_id)
    job = client.get(f"/v1/jobs/{job_id}", headers=alice).json()
    assert job["status"] == "cancelled"
    assert job["summary"] is None
    names = [a["name"] for a in client.get(f"/v1/jobs/{job_id}/artifacts", headers=alice).json()]
    assert sorted(names) == ["recipe.json", "step-1-test.copy_and_cancel.onnx"]  # step 2 never ran
