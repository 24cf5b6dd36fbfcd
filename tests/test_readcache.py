"""The API's read cache (app.readcache) on PostgreSQL: keys and job views kept per process, dropped by the
notifications every committed change sends. Two apps on one database stand for two API processes."""
from __future__ import annotations

import time

import pytest

from app.readcache import JOBS, KEYS, ReadCache
from tests.conftest import make_key, mlp_onnx_bytes


def eventually(check, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.02)


@pytest.fixture
def two_apps(data_dir, monkeypatch):
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.readcache import get_cache
    from tests.conftest import use_database

    database = use_database("postgresql", monkeypatch)
    next(database)
    try:
        with TestClient(create_app()) as first, TestClient(create_app()) as second:
            assert eventually(lambda: get_cache().enabled), "the listener never started listening"
            yield first, second
    finally:
        next(database, None)


def test_a_cached_job_view_follows_every_committed_change(two_apps):
    first, second = two_apps
    headers = {"Authorization": f"Bearer {make_key('alice')}"}
    model = first.post("/v1/models", files={"file": ("m.onnx", mlp_onnx_bytes())}, headers=headers).json()
    job = first.post("/v1/jobs", json={"model_id": model["id"], "steps": [{"method": "quantize.int8_dynamic"}]},
                     headers=headers).json()
    polled = second.get(f"/v1/jobs/{job['id']}", headers=headers)
    assert polled.json()["status"] == "queued"
    from app.readcache import get_cache

    assert get_cache().get(JOBS, job["id"]) is not None  # it is served from the cache now
    etag = polled.headers["etag"]
    assert second.get(f"/v1/jobs/{job['id']}", headers={**headers, "If-None-Match": etag}).status_code == 304
    # Cancelled through the other process: the poll sees it as soon as the notification lands.
    assert first.post(f"/v1/jobs/{job['id']}/cancel", headers=headers).json()["status"] == "cancelled"
    assert eventually(lambda: second.get(f"/v1/jobs/{job['id']}", headers=headers).json()["status"] == "cancelled")
    assert second.get(f"/v1/jobs/{job['id']}", headers={**headers, "If-None-Match": etag}).status_code == 200
    # A change the database makes on its own (ON DELETE SET NULL of the model) is followed too.
    assert first.delete(f"/v1/models/{model['id']}", headers=headers).status_code == 204
    assert eventually(lambda: second.get(f"/v1/jobs/{job['id']}", headers=headers).json()["model_id"] is None)


def test_a_revoked_key_is_refused_at_once_here_and_within_a_notification_elsewhere(two_apps):
    first, second = two_apps
    admin = {"Authorization": f"Bearer {make_key('alice')}"}
    created = first.post("/v1/keys", json={"scopes": ["read"]}, headers=admin).json()
    reader = {"Authorization": f"Bearer {created['key']}"}
    assert first.get("/v1/models", headers=reader).status_code == 200
    assert second.get("/v1/models", headers=reader).status_code == 200  # both processes cache it now
    assert first.delete(f"/v1/keys/{created['id']}", headers=admin).status_code == 200
    assert first.get("/v1/models", headers=reader).status_code == 401  # the revoking process: at once
    started = time.monotonic()
    assert eventually(lambda: second.get("/v1/models", headers=reader).status_code == 401, timeout=2.0)
    assert time.monotonic() - started < 2.0


def test_another_tenant_never_gets_a_cached_view(two_apps):
    first, second = two_apps
    alice = {"Authorization": f"Bearer {make_key('alice')}"}
    bob = {"Authorization": f"Bearer {make_key('bob')}"}
    model = first.post("/v1/models", files={"file": ("m.onnx", mlp_onnx_bytes())}, headers=alice).json()
    job = first.post("/v1/jobs", json={"model_id": model["id"], "steps": [{"method": "quantize.int8_dynamic"}]},
                     headers=alice).json()
    assert second.get(f"/v1/jobs/{job['id']}", headers=alice).status_code == 200  # cached for alice
    resp = second.get(f"/v1/jobs/{job['id']}", headers=bob)
    assert resp.status_code == 404 and resp.json()["code"] == "job_not_found"


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
