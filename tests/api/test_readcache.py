"""The API's read cache (app.readcache) on PostgreSQL: keys and job views kept per process, dropped by the
notifications every committed change sends.

Two API processes on one fresh database: this test process (a TestClient) and a real `modelpress api`
subprocess. That the subprocess caches is shown by changing rows behind its back with raw SQL (which sends no
notification: it keeps serving what it read); that it follows every committed change, by making them through
the first process (the ORM, whose commits notify) and watching the subprocess follow within seconds.
"""
from __future__ import annotations

import os
import time
import uuid

import httpx
import pytest

from app.readcache import JOBS, KEYS, ReadCache
from tests.helpers import REDIS_URL, make_key, mlp_onnx_bytes
from tests.stack import BIN, base_env, free_port, logs, processes, wait_ready, wait_until


def sql(query: str, *args):
    """A statement on the test's database over a connection of its own, outside the ORM: no notification."""
    import psycopg

    with psycopg.connect(os.environ["MODELPRESS_DATABASE_URL"].replace("+psycopg", "", 1), autocommit=True) as conn:
        cursor = conn.execute(query, args)
        return cursor.fetchall() if cursor.description else None


@pytest.fixture
def two_apps(data_dir, redis_prefix, monkeypatch, tmp_path, request):
    """(first, other): an app in this process and an httpx client of a `modelpress api` process, both in
    production mode on one fresh PostgreSQL database, one store and one Redis (under this test's prefix)."""
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.readcache import get_cache
    from tests.helpers import use_database

    monkeypatch.setenv("MODELPRESS_MODE", "production")
    database = use_database("postgresql", monkeypatch)
    next(database)  # migrated, and MODELPRESS_DATABASE_URL points at it
    env = base_env(data_dir, MODELPRESS_MODE="production",
                   MODELPRESS_DATABASE_URL=os.environ["MODELPRESS_DATABASE_URL"],
                   MODELPRESS_BROKER_URL=REDIS_URL, MODELPRESS_QUEUE_PREFIX=redis_prefix)
    port = free_port()
    api = [str(BIN / "modelpress"), "api", "--port", str(port), "--log-level", "warning"]
    try:
        with TestClient(create_app()) as first, processes(api, env=env, log_dir=tmp_path) as procs:
            wait_until(lambda: get_cache().enabled, 5, every=0.02)  # this process's listener listens
            wait_ready(f"http://127.0.0.1:{port}", procs)
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as other:
                yield first, other
    finally:
        next(database, None)
        if getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed:
            print(logs(tmp_path))


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def submit(first, headers) -> tuple[dict, dict]:
    model = first.post("/v1/models", files={"file": ("m.onnx", mlp_onnx_bytes())}, headers=headers).json()
    job = first.post("/v1/jobs", json={"model_id": model["id"], "steps": [{"method": "quantize.int8_dynamic"}]},
                     headers=headers).json()
    assert job["status"] == "queued", job
    return model, job


def cached_view(other, headers, job_id: str) -> httpx.Response:
    """Polls the job in the other process, renames its row behind that process's back, polls again, until the
    second poll still shows the first's view: it is served from that process's cache. (Retried: until its
    listener listens it caches nothing, and a notification of the job's creation landing after the first
    poll drops what it stored.) Returns the cached response; the row's name is then the last one set here."""
    def attempt() -> httpx.Response | None:
        before = other.get(f"/v1/jobs/{job_id}", headers=headers)
        assert before.status_code == 200, before.text
        renamed = f"renamed-{uuid.uuid4().hex[:8]}"
        sql("UPDATE jobs SET name = %s WHERE id = %s", renamed, job_id)
        assert sql("SELECT name FROM jobs WHERE id = %s", job_id) == [(renamed,)]
        after = other.get(f"/v1/jobs/{job_id}", headers=headers)
        assert after.status_code == 200, after.text
        return after if after.json()["name"] != renamed and after.content == before.content else None

    return wait_until(attempt, 10, every=0.05)


@pytest.mark.integration
def test_a_cached_job_view_follows_every_committed_change(two_apps):
    first, other = two_apps
    headers = bearer(make_key("alice"))
    model, job = submit(first, headers)
    cached = cached_view(other, headers, job["id"])
    (renamed,), = sql("SELECT name FROM jobs WHERE id = %s", job["id"])
    assert cached.json()["status"] == "queued" and cached.json()["name"] != renamed
    etag = cached.headers["etag"]
    assert other.get(f"/v1/jobs/{job['id']}", headers={**headers, "If-None-Match": etag}).status_code == 304
    # Cancelled through the first process (the ORM: its commit notifies): the other one reads the row again.
    assert first.post(f"/v1/jobs/{job['id']}/cancel", headers=headers).json()["status"] == "cancelled"

    def cancelled() -> httpx.Response | None:
        resp = other.get(f"/v1/jobs/{job['id']}", headers=headers)
        return resp if resp.json()["status"] == "cancelled" else None

    assert wait_until(cancelled, 5, every=0.02).json()["name"] == renamed  # read from the database, raw change included
    assert other.get(f"/v1/jobs/{job['id']}", headers={**headers, "If-None-Match": etag}).status_code == 200
    # A change the database makes on its own (ON DELETE SET NULL of the model) is followed too.
    assert other.get(f"/v1/jobs/{job['id']}", headers=headers).json()["model_id"] == model["id"]
    assert first.delete(f"/v1/models/{model['id']}", headers=headers).status_code == 204
    wait_until(lambda: other.get(f"/v1/jobs/{job['id']}", headers=headers).json()["model_id"] is None, 5,
               every=0.02)


@pytest.mark.integration
def test_a_revoked_key_is_refused_at_once_here_and_within_a_notification_elsewhere(two_apps):
    first, other = two_apps
    admin = bearer(make_key("alice"))
    created = first.post("/v1/keys", json={"scopes": ["read"]}, headers=admin).json()
    reader = bearer(created["key"])

    def served_from_cache_although_revoked() -> bool:
        # The other process reads the key; then it is revoked behind its back (raw SQL) and put back.
        if other.get("/v1/models", headers=reader).status_code != 200:
            return False
        sql("UPDATE api_keys SET revoked_at = now() WHERE id = %s", created["id"])
        try:
            assert first.get("/v1/models", headers=reader).status_code == 401  # a fresh read refuses it...
            return other.get("/v1/models", headers=reader).status_code == 200  # ...the cached key is served
        finally:
            sql("UPDATE api_keys SET revoked_at = NULL WHERE id = %s", created["id"])

    wait_until(served_from_cache_although_revoked, 10, every=0.05)
    assert first.get("/v1/models", headers=reader).status_code == 200  # both processes cache it now
    assert first.delete(f"/v1/keys/{created['id']}", headers=admin).status_code == 200
    assert first.get("/v1/models", headers=reader).status_code == 401  # the revoking process: at once
    started = time.monotonic()
    wait_until(lambda: other.get("/v1/models", headers=reader).status_code == 401, 2.0, every=0.02)
    assert time.monotonic() - started < 2.0
    assert other.get("/v1/models", headers=reader).json()["code"] == "invalid_api_key"


@pytest.mark.integration
def test_another_tenant_never_gets_a_cached_view(two_apps):
    first, other = two_apps
    alice = bearer(make_key("alice"))
    bob = bearer(make_key("bob"))
    _model, job = submit(first, alice)
    cached_view(other, alice, job["id"])  # the other process serves alice's poll from its cache
    resp = other.get(f"/v1/jobs/{job['id']}", headers=bob)
    assert resp.status_code == 404 and resp.json()["code"] == "job_not_found"
    assert "model_id" not in resp.json() and "steps" not in resp.json()  # nothing of the job
    assert other.get(f"/v1/jobs/{job['id']}", headers=alice).status_code == 200  # still alice's


def test_a_read_that_raced_an_invalidation_is_not_stored():
    cache = ReadCache()
    cache.reset(enabled=True)
    ticket = cache.ticket(JOBS, "j")
    cache.drop(JOBS, "j")  # a notification arrives while the read is under way
    cache.put(JOBS, "j", "stale", ticket)
    assert cache.get(JOBS, "j") is None
    fresh = cache.ticket(JOBS, "j")
    cache.put(JOBS, "j", "fresh", fresh)
    assert cache.get(JOBS, "j") == "fresh"
    # Losing the listener switches the cache off and empties it; a ticket from before never stores.
    cache.reset(enabled=False)
    assert cache.get(JOBS, "j") is None
    cache.reset(enabled=True)
    cache.put(KEYS, "k", "old", fresh)
    assert cache.get(KEYS, "k") is None


def test_sqlite_deployments_do_not_cache(client):
    from app.readcache import get_cache

    headers = {"Authorization": f"Bearer {make_key('alice')}"}
    assert client.get("/v1/models", headers=headers).status_code == 200
    assert not get_cache().enabled
