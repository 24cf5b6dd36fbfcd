"""Rate limits per key, quotas per tenant (429 + Retry-After, nothing stored), and the audit log."""
from __future__ import annotations

import numpy as np

from app.dbmodels import AuditEntry, Blob, Job, Model
from tests.helpers import REDIS_URL, make_key, npz_bytes, row_count, store_files, tmp_leftovers


def set_limits(tenant: str, **limits) -> None:
    from sqlalchemy import select

    from app.db import session_scope
    from app.dbmodels import Tenant

    with session_scope() as db:
        row = db.scalar(select(Tenant).where(Tenant.name == tenant))
        for name, value in limits.items():
            setattr(row, name, value)


def job_spec(model_id: str) -> dict:
    return {"model_id": model_id, "steps": [{"method": "quantize.int8_dynamic"}],
            "evaluate": {"warmup": 1, "iterations": 3}}


def test_rate_limit_per_key_answers_429_with_retry_after(client):
    alice = {"Authorization": f"Bearer {make_key('alice')}"}
    other_key = {"Authorization": f"Bearer {make_key('alice')}"}
    set_limits("alice", requests_per_minute=3)
    assert [client.get("/v1/models", headers=alice).status_code for _ in range(3)] == [200, 200, 200]
    resp = client.get("/v1/models", headers=alice)
    assert resp.status_code == 429
    assert resp.json()["code"] == "rate_limited" and resp.json()["limit_per_minute"] == 3
    assert 1 <= int(resp.headers["retry-after"]) <= 20  # one request's worth of a 3-per-minute bucket
    assert client.get("/v1/models", headers=other_key).status_code == 200  # each key has its own bucket
    set_limits("alice", requests_per_minute=0)  # 0: unlimited
    assert client.get("/v1/models", headers=alice).status_code == 200


def test_rate_limit_is_shared_through_redis_by_every_api_process(data_dir, redis_prefix, monkeypatch):
    from fastapi.testclient import TestClient

    from app.main import create_app

    monkeypatch.setenv("MODELPRESS_RATE_LIMIT_PER_MINUTE", "4")
    from tests.helpers import clear_caches

    clear_caches()

    def no_memory_bucket():
        raise AssertionError("the rate limit used this process's memory, not Redis")

    # Only Redis may answer: this process's own bucket (the embedded default's) would give the same statuses.
    monkeypatch.setattr("app.limits._memory", no_memory_bucket)
    headers = {"Authorization": f"Bearer {make_key('alice')}"}
    with TestClient(create_app()) as first, TestClient(create_app()) as second:
        statuses = [(first if i % 2 else second).get("/v1/models", headers=headers).status_code for i in range(6)]
    # Two apps (two API processes in production) drew from one bucket of 4.
    assert statuses == [200, 200, 200, 200, 429, 429]
    import redis

    keys = list(redis.Redis.from_url(REDIS_URL).scan_iter(match=f"{redis_prefix}modelpress:ratelimit:*"))
    assert len(keys) == 1


def test_concurrent_jobs_quota_is_429_until_a_job_finishes(client, alice, mlp_onnx):
    model = client.post("/v1/models", files={"file": ("m.onnx", mlp_onnx)}, headers=alice).json()
    set_limits("alice", max_concurrent_jobs=1)
    first = client.post("/v1/jobs", json=job_spec(model["id"]), headers={**alice, "Idempotency-Key": "one"})
    assert first.status_code == 202
    resp = client.post("/v1/jobs", json=job_spec(model["id"]), headers=alice)
    assert resp.status_code == 429 and resp.json()["code"] == "quota_exceeded"
    assert resp.json()["limit"] == 1 and resp.json()["active"] == 1
    assert int(resp.headers["retry-after"]) >= 1
    assert row_count(Job) == 1
    # Retrying the accepted submission is no new job: it is answered, not refused.
    again = client.post("/v1/jobs", json=job_spec(model["id"]), headers={**alice, "Idempotency-Key": "one"})
    assert again.status_code == 202 and again.json()["id"] == first.json()["id"]
    assert client.post(f"/v1/jobs/{first.json()['id']}/cancel", headers=alice).json()["status"] == "cancelled"
    assert client.post("/v1/jobs", json=job_spec(model["id"]), headers=alice).status_code == 202


def test_storage_quota_is_429_and_keeps_nothing(client, alice, data_dir, mlp_onnx):
    from tests.helpers import mlp_onnx_bytes

    set_limits("alice", max_stored_bytes=len(mlp_onnx) + 1000)
    assert client.post("/v1/models", files={"file": ("m.onnx", mlp_onnx)}, headers=alice).status_code == 201
    before = store_files(data_dir)
    other = mlp_onnx_bytes(seed=1)
    # Streamed past the quota (chunked: no Content-Length), and declared too large (Content-Length).
    streamed = client.post("/v1/models", content=iter([other[:4096], other[4096:]]),
                           headers={**alice, "Content-Type": "application/octet-stream", "X-Filename": "other.onnx"})
    assert "content-length" not in streamed.request.headers
    declared = client.post("/v1/datasets", files={"file": ("d.npz", npz_bytes(features=np.zeros((64, 64), np.float32)))},
                           headers=alice)
    for resp in (streamed, declared):
        assert resp.status_code == 429, resp.text
        assert resp.json()["code"] == "storage_quota_exceeded" and int(resp.headers["retry-after"]) >= 1
    assert store_files(data_dir) == before and tmp_leftovers(data_dir) == []
    assert row_count(Model) == 1 and row_count(Blob) == 1
    # Deleting frees the quota.
    model_id = client.get("/v1/models", headers=alice).json()["items"][0]["id"]
    assert client.delete(f"/v1/models/{model_id}", headers=alice).status_code == 204
    assert client.post("/v1/models", files={"file": ("o.onnx", other)}, headers=alice).status_code == 201


def test_audit_log_records_who_did_what_and_only_for_its_tenant(client, mlp_onnx):
    admin = {"Authorization": f"Bearer {make_key('alice')}"}
    bob = {"Authorization": f"Bearer {make_key('bob')}"}
    created = client.post("/v1/keys", json={"scopes": ["read", "write"]}, headers=admin).json()
    writer = {"Authorization": f"Bearer {created['key']}"}
    model = client.post("/v1/models", files={"file": ("m.onnx", mlp_onnx)}, headers=writer).json()
    dataset = client.post("/v1/datasets", files={"file": ("d.npz", npz_bytes(features=np.zeros((4, 64), np.float32)))},
                          headers=writer).json()
    job = client.post("/v1/jobs", json=job_spec(model["id"]), headers=writer).json()
    client.post(f"/v1/jobs/{job['id']}/cancel", headers=writer)
    assert client.delete(f"/v1/datasets/{dataset['id']}", headers=writer).status_code == 204
    client.post("/v1/webhook-secret", headers=admin)
    client.delete(f"/v1/keys/{created['id']}", headers=admin)
    # Refused actions leave no row.
    assert client.post("/v1/models", files={"file": ("x.onnx", b"<html>")}, headers=admin).status_code == 422
    assert client.delete(f"/v1/models/{model['id']}", headers=bob).status_code == 404

    items = client.get("/v1/audit", headers=admin).json()["items"]
    actions = [(i["action"], i["object_id"], i["key_id"]) for i in reversed(items)]
    by_action = {a: (o, k) for a, o, k in actions}
    assert [a for a, _o, _k in actions] == ["key.create", "key.create", "model.upload", "dataset.upload",
                                            "job.submit", "job.cancel", "dataset.delete", "webhook_secret.create",
                                            "key.revoke"]
    admin_key_id = actions[0][1]
    assert actions[0][2] is None  # created at the command line (make_key): the operator, no key
    assert by_action["model.upload"] == (model["id"], created["id"])
    assert by_action["job.submit"] == (job["id"], created["id"])
    assert by_action["key.revoke"] == (created["id"], admin_key_id)
    assert all(i["client_ip"] for i in items if i["key_id"])
    upload = next(i for i in items if i["action"] == "model.upload")
    assert upload["detail"]["sha256"] == model["sha256"]
    # bob's log holds only his own key's creation; a filter narrows it.
    assert [i["action"] for i in client.get("/v1/audit", headers=bob).json()["items"]] == ["key.create"]
    assert [i["action"] for i in client.get("/v1/audit?action=job.submit", headers=admin).json()["items"]] == ["job.submit"]
    assert row_count(AuditEntry) == 10


def test_broker_down_at_submit_leaves_no_audit_row(client, alice, mlp_onnx, monkeypatch):
    import app.jobs.service as jobs_service

    model = client.post("/v1/models", files={"file": ("m.onnx", mlp_onnx)}, headers=alice).json()

    def broken(job_id, queue):
        raise ConnectionError("connection refused")

    monkeypatch.setattr(jobs_service, "enqueue_job", broken)
    assert client.post("/v1/jobs", json=job_spec(model["id"]), headers=alice).status_code == 503
    assert [i["action"] for i in client.get("/v1/audit", headers=alice).json()["items"]] == ["model.upload",
                                                                                           "key.create"]
