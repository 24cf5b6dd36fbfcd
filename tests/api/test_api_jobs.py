"""POST/GET /v1/jobs: validation before queueing, idempotency, ETag polling, cancel, listing."""
from __future__ import annotations

import pytest

from app.dbmodels import Job, JobEvent
from tests.helpers import queued_messages, row_count


@pytest.fixture
def model_id(client, alice, mlp_onnx) -> str:
    resp = client.post("/v1/models", files={"file": ("mlp.onnx", mlp_onnx)}, headers=alice)
    assert resp.status_code == 201, resp.text
    return resp.json()["id"]


def job_spec(model_id: str, **extra) -> dict:
    return {"model_id": model_id, "steps": [{"method": "quantize.int8_dynamic", "params": {"per_channel": True}}],
            "evaluate": {"batch_sizes": [1, 8], "warmup": 2, "iterations": 5}, **extra}


def test_create_job_is_queued_with_location_and_one_message(client, alice, model_id, data_dir):
    resp = client.post("/v1/jobs", json=job_spec(model_id, name="first"), headers=alice)
    assert resp.status_code == 202, resp.text
    job = resp.json()
    assert job["status"] == "queued"
    assert job["name"] == "first"
    assert resp.headers["location"] == f"/v1/jobs/{job['id']}"
    # Defaults are filled in: the worker runs exactly what was accepted.
    assert job["steps"][0]["params"] == {"per_channel": True, "weight_type": "auto", "reduce_range": False, "op_types": None,
                                         "keep_depthwise_conv_float": True, "nodes_to_exclude": [],
                                         "fuse_transformer": "auto"}
    messages = queued_messages(data_dir)
    assert len(messages) == 1
    assert messages[0] == {"task": "modelpress.run_job", "args": [job["id"]]}


def test_idempotency_key_returns_the_same_job(client, alice, model_id, data_dir):
    headers = {**alice, "Idempotency-Key": "build-42"}
    first = client.post("/v1/jobs", json=job_spec(model_id), headers=headers)
    second = client.post("/v1/jobs", json=job_spec(model_id), headers=headers)
    assert first.status_code == second.status_code == 202
    assert first.json()["id"] == second.json()["id"]
    assert row_count(Job) == 1
    assert len(queued_messages(data_dir)) == 1
    other = client.post("/v1/jobs", json=job_spec(model_id, name="different"), headers=headers)
    assert other.status_code == 422
    assert other.json()["code"] == "idempotency_key_reused"


@pytest.mark.parametrize(
    "steps,code,field",
    [
        ([{"method": "quantize.int3_magic"}], "unknown_method", "steps[0].method"),
        ([{"method": "quantize.int8_dynamic", "params": {"per_channel": "maybe"}}], "invalid_params",
         "steps[0].params.per_channel"),
        ([{"method": "quantize.int8_dynamic", "params": {"no_such_param": 1}}], "invalid_params",
         "steps[0].params.no_such_param"),
        ([{"method": "quantize.int8_dynamic"}, {"method": "quantize.int8_dynamic", "params": {"op_types": ["Nope"]}}],
         "invalid_params", "steps[1].params.op_types"),
    ],
)
def test_bad_steps_are_422_naming_the_field_and_nothing_is_queued(client, alice, model_id, data_dir, steps, code, field):
    resp = client.post("/v1/jobs", json={"model_id": model_id, "steps": steps}, headers=alice)
    assert resp.status_code == 422, resp.text
    body = resp.json()
    assert body["code"] == code
    assert body["field"].startswith(field)
    if code == "unknown_method":  # the answer lists what the caller may use instead
        assert "quantize.int8_dynamic" in body["known"]
    assert row_count(Job) == 0 and row_count(JobEvent) == 0
    assert queued_messages(data_dir) == []


@pytest.mark.parametrize(
    "evaluate,field",
    [({"batch_sizes": [0]}, "evaluate.batch_sizes"), ({"iterations": 0}, "evaluate.iterations"),
     ({"warmup": -1}, "evaluate.warmup"), ({"providers": ["FPGAExecutionProvider"]}, "evaluate.providers"),
     # An energy estimate needs the TDP it is computed from, and a TDP alone asks for nothing.
     ({"energy_estimate": True}, "evaluate"), ({"tdp_watts": 65}, "evaluate"),
     ({"energy_estimate": True, "tdp_watts": 0}, "evaluate.tdp_watts")],
)
def test_bad_evaluate_spec_is_422(client, alice, model_id, evaluate, field):
    resp = client.post("/v1/jobs", json={"model_id": model_id, "steps": [{"method": "quantize.int8_dynamic"}],
                                         "evaluate": evaluate}, headers=alice)
    assert resp.status_code == 422
    assert resp.json()["code"] == "invalid_request"
    assert any(e["field"].startswith(field) for e in resp.json()["errors"])
    assert row_count(Job) == 0


def test_job_on_unknown_or_foreign_model_is_404(client, alice, bob, model_id, data_dir):
    for headers, mid in ((alice, "missing"), (bob, model_id)):
        resp = client.post("/v1/jobs", json=job_spec(mid), headers=headers)
        assert resp.status_code == 404
        assert resp.json()["code"] == "model_not_found"
    assert row_count(Job) == 0
    assert queued_messages(data_dir) == []


def test_empty_steps_are_refused(client, alice, model_id):
    resp = client.post("/v1/jobs", json={"model_id": model_id, "steps": []}, headers=alice)
    assert resp.status_code == 422


def test_etag_gives_304_until_the_job_changes(client, alice, model_id):
    job = client.post("/v1/jobs", json=job_spec(model_id), headers=alice).json()
    first = client.get(f"/v1/jobs/{job['id']}", headers=alice)
    etag = first.headers["etag"]
    same = client.get(f"/v1/jobs/{job['id']}", headers={**alice, "If-None-Match": etag})
    assert same.status_code == 304
    assert same.content == b""
    client.post(f"/v1/jobs/{job['id']}/cancel", headers=alice)
    changed = client.get(f"/v1/jobs/{job['id']}", headers={**alice, "If-None-Match": etag})
    assert changed.status_code == 200
    assert changed.json()["status"] == "cancelled"
    assert changed.headers["etag"] != etag


def test_cancel_queued_then_cancel_again_is_409(client, alice, model_id):
    job = client.post("/v1/jobs", json=job_spec(model_id), headers=alice).json()
    resp = client.post(f"/v1/jobs/{job['id']}/cancel", headers=alice)
    assert resp.status_code == 202
    assert resp.json()["status"] == "cancelled"
    assert resp.json()["finished_at"] is not None
    again = client.post(f"/v1/jobs/{job['id']}/cancel", headers=alice)
    assert again.status_code == 409
    assert again.json()["code"] == "job_not_cancellable"
    events = client.get(f"/v1/jobs/{job['id']}/events", headers=alice).json()
    assert [e["status"] for e in events] == ["queued", "cancelled"]


def test_cancelled_job_is_left_alone_by_the_worker(client, alice, model_id):
    """A queued job cancelled before a worker takes it: the task does nothing."""
    from workers.supervise import run_job

    job = client.post("/v1/jobs", json=job_spec(model_id), headers=alice).json()
    client.post(f"/v1/jobs/{job['id']}/cancel", headers=alice)
    run_job(job["id"])
    after = client.get(f"/v1/jobs/{job['id']}", headers=alice).json()
    assert after["status"] == "cancelled"
    assert after["attempts"] == 0


def test_report_before_finish_is_409(client, alice, model_id):
    job = client.post("/v1/jobs", json=job_spec(model_id), headers=alice).json()
    resp = client.get(f"/v1/jobs/{job['id']}/report", headers=alice)
    assert resp.status_code == 409
    assert resp.json()["code"] == "report_not_ready"
    assert client.get(f"/v1/jobs/{job['id']}/artifacts", headers=alice).json() == []
    missing = client.get(f"/v1/jobs/{job['id']}/artifacts/model.onnx", headers=alice)
    assert missing.status_code == 404 and missing.json()["code"] == "artifact_not_found"


def test_list_newest_first_with_status_filter_and_cursor(client, alice, bob, model_id):
    ids = [client.post("/v1/jobs", json=job_spec(model_id), headers=alice).json()["id"] for _ in range(3)]
    client.post(f"/v1/jobs/{ids[1]}/cancel", headers=alice)
    page = client.get("/v1/jobs?limit=2", headers=alice).json()
    assert [j["id"] for j in page["items"]] == [ids[2], ids[1]]
    rest = client.get(f"/v1/jobs?limit=2&cursor={page['next_cursor']}", headers=alice).json()
    assert [j["id"] for j in rest["items"]] == [ids[0]] and rest["next_cursor"] is None
    queued = client.get("/v1/jobs?status=queued", headers=alice).json()["items"]
    assert {j["id"] for j in queued} == {ids[0], ids[2]}
    assert client.get("/v1/jobs", headers=bob).json()["items"] == []
    assert client.get("/v1/jobs?cursor=garbage!!", headers=alice).status_code == 422


def test_broker_down_at_submit_is_503_and_leaves_no_row(client, alice, model_id, monkeypatch):
    import app.jobs.service as jobs_service

    def broken(job_id, queue):
        raise ConnectionError("connection refused")

    monkeypatch.setattr(jobs_service, "enqueue_job", broken)
    resp = client.post("/v1/jobs", json=job_spec(model_id), headers=alice)
    assert resp.status_code == 503
    assert resp.json()["code"] == "broker_unavailable"
    assert row_count(Job) == 0 and row_count(JobEvent) == 0


def test_methods_are_published_with_their_schema(client, alice):
    methods = client.get("/v1/methods", headers=alice).json()
    by_id = {m["id"]: m for m in methods}
    schema = by_id["quantize.int8_dynamic"]["params_schema"]
    assert {"per_channel", "reduce_range", "op_types", "nodes_to_exclude"} <= schema["properties"].keys()
    assert by_id["quantize.int8_dynamic"]["description"]
