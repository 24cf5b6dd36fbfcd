"""Stored measurements: environment fingerprints, the two measurement routes, and their migration.

Most tests run on SQLite and on PostgreSQL (127.0.0.1:5432; skipped when unreachable, failed under CI=true).
Rows are inserted through the database to keep the tests fast; one test runs a real job end to end.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import threading
import time

import pytest
from sqlalchemy import func, inspect, select, text

from app.common import encode_cursor
from app.db import get_engine, session_scope
from app.dbmodels import Environment, Job, Measurement, Model
from app.measurements.fingerprint import FINGERPRINT_KEYS, fingerprint, fingerprint_id

T0 = dt.datetime(2026, 11, 1, 12, 0, tzinfo=dt.UTC)


@pytest.fixture
def backend(database) -> str:
    """This module's tests run on both databases (tests/conftest.py `database`)."""
    return database


@pytest.fixture
def client(backend):
    """The API on `backend` (this module's alice and bob get their keys there too)."""
    from fastapi.testclient import TestClient

    from app.main import create_app

    with TestClient(create_app()) as test_client:
        yield test_client


def environment(**changes) -> dict:
    """An environment dict as workers.measure.environment.describe() returns it, plus volatile keys."""
    return {
        "cpu": "Test CPU @ 3.00GHz", "physical_cores": 4, "logical_cores": 8, "usable_cores": 8,
        "memory_bytes": 16 << 30, "gpu": None, "gpu_driver": None, "os": "Linux-6.1-x86_64", "python": "3.11.9",
        "onnxruntime": "1.20.0", "torch": "2.5.0",
        "versions": {"onnxruntime": "1.20.0", "onnx": "1.17.0", "numpy": "2.1.0"},
        "providers": ["CPUExecutionProvider"], "provider": "CPUExecutionProvider", "threads": 4,
        "pinned_cores": [0, 1, 2, 3], "pid": 4242, "measured_at": "2026-11-25T12:00:00Z",
    } | changes


def upload(client, headers, content: bytes) -> dict:
    resp = client.post("/v1/models", files={"file": ("m.onnx", content)}, headers=headers)
    assert resp.status_code == 201, resp.text
    return resp.json()


def add_job(model: dict, rows: list[dict], *, at: dt.datetime = T0, apart: dt.timedelta = dt.timedelta(seconds=1)
            ) -> str:
    """A finished job on `model` with these measurement rows, created from `at` on, `apart` from each other.

    A row: {role, metric, value, provider?, batch_size?, unit?, sha256?, environment?}. A baseline row measured
    the job's model; a result row some other content unless it names its sha256.
    """
    with session_scope() as db:
        stored = db.get(Model, model["id"])
        job = Job(tenant_id=stored.tenant_id, model_id=stored.id, spec={"steps": []}, queue="cpu",
                  status="succeeded", created_at=at)
        db.add(job)
        db.flush()
        for index, row in enumerate(rows):
            env_id = None
            if row.get("environment") is not None:
                stack = fingerprint(row["environment"])
                env_id = fingerprint_id(stack)
                if db.get(Environment, env_id) is None:
                    db.add(Environment(id=env_id, fingerprint=stack))
                    db.flush()
            db.add(Measurement(
                job_id=job.id, tenant_id=stored.tenant_id, model_role=row["role"],
                model_sha256=row.get("sha256") or (stored.sha256 if row["role"] == "baseline" else "f" * 64),
                provider=row.get("provider", "CPUExecutionProvider"), batch_size=row.get("batch_size", 1),
                metric=row["metric"], value=row["value"], unit=row.get("unit", "ms"), environment_id=env_id,
                created_at=at + apart * index,
            ))
        return job.id


def grid(**fixed) -> list[dict]:
    """Rows for 2 roles x 2 providers x 2 batch sizes x 2 metrics, values 0..15 in that order."""
    rows = []
    for role in ("baseline", "result"):
        for provider in ("CPUExecutionProvider", "CUDAExecutionProvider"):
            for batch_size in (1, 8):
                for metric, unit in (("p50_ms", "ms"), ("throughput_per_s", "samples/s")):
                    rows.append({"role": role, "provider": provider, "batch_size": batch_size, "metric": metric,
                                 "unit": unit, "value": float(len(rows))} | fixed)
    return rows


# --- the fingerprint -------------------------------------------------------------------------------------


def test_fingerprint_keeps_the_stack_and_drops_what_changes_run_to_run():
    full = fingerprint(environment())
    assert list(full) == list(FINGERPRINT_KEYS)
    assert "pid" not in full and "measured_at" not in full and "providers" not in full
    assert full["cpu"] == "Test CPU @ 3.00GHz" and full["pinned_cores"] == [0, 1, 2, 3]
    # A describe() without the newer keys still fingerprints, with None for them.
    older = {k: v for k, v in environment().items() if k not in ("gpu_driver", "torch", "pinned_cores")}
    assert fingerprint(older)["torch"] is None and fingerprint(older)["pinned_cores"] is None
    # The id is the sha256 of the canonical JSON, whatever the key order or the volatile keys say.
    expected = hashlib.sha256(json.dumps(full, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    shuffled = dict(reversed(list(environment(pid=1, measured_at="later").items())))
    assert fingerprint_id(fingerprint(shuffled)) == fingerprint_id(full) == expected
    assert fingerprint_id(fingerprint(environment(threads=2))) != expected


# --- GET /v1/jobs/{id}/measurements ------------------------------------------------------------------------


def test_job_measurements_in_order_with_filters_and_environment(client, alice, mlp_onnx):
    model = upload(client, alice, mlp_onnx)
    env = environment()
    job_id = add_job(model, grid(environment=env) + [
        {"role": "step-1", "metric": "p95_ms", "value": 2.5, "unit": "ms", "environment": None},
        {"role": "result", "metric": "speedup_ci_low", "value": 1.7, "unit": "ratio (median)"},
    ])
    resp = client.get(f"/v1/jobs/{job_id}/measurements", headers=alice)
    assert resp.status_code == 200, resp.text
    items = resp.json()["items"]
    assert len(items) == 18
    assert [i["id"] for i in items] == sorted(i["id"] for i in items)
    first = items[0]
    assert set(first) == {"id", "job_id", "model_role", "model_sha256", "provider", "batch_size", "metric", "value",
                          "unit", "created_at", "environment"}
    assert first | {"id": 0, "created_at": None} == {
        "id": 0, "job_id": job_id, "model_role": "baseline", "model_sha256": model["sha256"],
        "provider": "CPUExecutionProvider", "batch_size": 1, "metric": "p50_ms", "value": 0.0, "unit": "ms",
        "created_at": None, "environment": fingerprint(env),
    }
    assert items[-2]["environment"] is None and items[-1]["unit"] == "ratio (median)"

    def values(**query) -> list[float]:
        resp = client.get(f"/v1/jobs/{job_id}/measurements", params=query, headers=alice)
        assert resp.status_code == 200, resp.text
        return [i["value"] for i in resp.json()["items"]]

    assert values(metric="p50_ms", provider="CUDAExecutionProvider") == [4.0, 6.0, 12.0, 14.0]
    assert values(model_role="result", batch_size=8, metric="throughput_per_s") == [11.0, 15.0]
    assert values(model_role="step-1") == [2.5]
    assert values(metric="no_such_metric") == []
    bad = client.get(f"/v1/jobs/{job_id}/measurements", params={"batch_size": 0}, headers=alice)
    assert bad.status_code == 422 and bad.json()["code"] == "invalid_request"


# --- GET /v1/models/{id}/measurements ----------------------------------------------------------------------


def test_model_measurements_across_jobs_newest_first_with_filters(client, alice, bob, mlp_onnx):
    model = upload(client, alice, mlp_onnx)
    older = add_job(model, grid(environment=environment()), at=T0)
    newer = add_job(model, grid(environment=environment(threads=1)), at=T0 + dt.timedelta(hours=1))
    # The result of a third job that produced exactly the model's bytes counts as the model too.
    same_bytes = add_job(model, [{"role": "result", "metric": "p50_ms", "value": 99.0, "sha256": model["sha256"]}],
                         at=T0 + dt.timedelta(hours=2))
    # bob stored the same bytes: his rows have the same sha256 but are never alice's.
    add_job(upload(client, bob, mlp_onnx), grid(), at=T0 + dt.timedelta(hours=3))

    resp = client.get(f"/v1/models/{model['id']}/measurements", headers=alice)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["next_cursor"] is None
    items = body["items"]
    # Baseline rows of the two jobs (8 each) and the third job's result; the other result rows are other content.
    assert len(items) == 17
    assert {i["model_sha256"] for i in items} == {model["sha256"]}
    assert [i["job_id"] for i in items] == [same_bytes] + [newer] * 8 + [older] * 8
    assert [i["value"] for i in items[1:9]] == [7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.0]
    assert items[1]["environment"]["threads"] == 1 and items[9]["environment"]["threads"] == 4

    def jobs_and_values(**query) -> list[tuple[str, float]]:
        resp = client.get(f"/v1/models/{model['id']}/measurements", params=query, headers=alice)
        assert resp.status_code == 200, resp.text
        return [(i["job_id"], i["value"]) for i in resp.json()["items"]]

    assert jobs_and_values(metric="p50_ms", provider="CPUExecutionProvider", batch_size=8) == [
        (newer, 2.0), (older, 2.0)]
    assert jobs_and_values(provider="CUDAExecutionProvider", metric="throughput_per_s") == [
        (newer, 7.0), (newer, 5.0), (older, 7.0), (older, 5.0)]


def test_model_measurements_cursor_walks_every_row_once(client, alice, mlp_onnx):
    model = upload(client, alice, mlp_onnx)
    for hour in range(3):
        add_job(model, grid(), at=T0 + dt.timedelta(hours=hour))
    # Rows stored in the same instant are ordered by id, so a page boundary inside them loses none.
    add_job(model, [{"role": "baseline", "metric": "mean_ms", "value": float(v)} for v in range(5)],
            at=T0 + dt.timedelta(hours=5), apart=dt.timedelta(0))

    everything = client.get(f"/v1/models/{model['id']}/measurements", headers=alice).json()["items"]
    assert len(everything) == 3 * 8 + 5
    for limit in (1, 4, 7, 29, 1000):
        seen, cursor, pages = [], None, 0
        while True:
            params = {"limit": limit} | ({"cursor": cursor} if cursor else {})
            resp = client.get(f"/v1/models/{model['id']}/measurements", params=params, headers=alice)
            assert resp.status_code == 200, resp.text
            page = resp.json()
            assert len(page["items"]) <= limit
            seen += [i["id"] for i in page["items"]]
            pages += 1
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert seen == [i["id"] for i in everything], limit
        assert pages == -(-len(everything) // limit), limit


def test_model_measurements_limit_and_cursor_are_checked(client, alice, mlp_onnx):
    model = upload(client, alice, mlp_onnx)
    url = f"/v1/models/{model['id']}/measurements"
    for params in ({"limit": 0}, {"limit": 1001}):
        resp = client.get(url, params=params, headers=alice)
        assert resp.status_code == 422 and resp.json()["code"] == "invalid_request", params
    for cursor in ("not-a-cursor", encode_cursor(T0, "abc")):  # measurement ids are integers
        resp = client.get(url, params={"cursor": cursor}, headers=alice)
        assert resp.status_code == 422 and resp.json()["code"] == "invalid_cursor", cursor


# --- tenant isolation --------------------------------------------------------------------------------------


def test_another_tenants_job_and_model_are_404_and_own_lists_are_empty(client, alice, bob, mlp_onnx):
    model = upload(client, alice, mlp_onnx)
    job_id = add_job(model, grid(environment=environment()))
    resp = client.get(f"/v1/jobs/{job_id}/measurements", headers=bob)
    assert resp.status_code == 404 and resp.json()["code"] == "job_not_found"
    resp = client.get(f"/v1/models/{model['id']}/measurements", headers=bob)
    assert resp.status_code == 404 and resp.json()["code"] == "model_not_found"
    # The same answers as for ids that do not exist.
    assert client.get("/v1/jobs/nope/measurements", headers=alice).json()["code"] == "job_not_found"
    assert client.get("/v1/models/nope/measurements", headers=alice).json()["code"] == "model_not_found"
    # bob's own upload of the same bytes, and a job of his without measurements: empty, never alice's rows.
    own_model = upload(client, bob, mlp_onnx)
    own_job = add_job(own_model, [])
    assert client.get(f"/v1/jobs/{own_job}/measurements", headers=bob).json() == {"items": []}
    assert client.get(f"/v1/models/{own_model['id']}/measurements", headers=bob).json() == {
        "items": [], "next_cursor": None}
    assert len(client.get(f"/v1/models/{model['id']}/measurements", headers=alice).json()["items"]) == 8


# --- storing environments in the worker --------------------------------------------------------------------


def test_worker_stores_each_environment_once_even_when_two_workers_race(backend):
    from workers.supervise import _store_environments

    rows = [{"environment": environment()}, {"environment": environment(pid=7)}, {},
            {"environment": environment(provider="CUDAExecutionProvider")}]
    ids = [fingerprint_id(fingerprint(environment())), fingerprint_id(fingerprint(environment())), None,
           fingerprint_id(fingerprint(environment(provider="CUDAExecutionProvider")))]
    # Worker A inserts and holds its transaction open; worker B inserts the same environments meanwhile and
    # must wait for A, then succeed without a row of its own.
    outcome: dict = {}
    with session_scope() as first:
        assert _store_environments(first, rows) == ids

        def second_worker() -> None:
            try:
                with session_scope() as second:
                    outcome["ids"] = _store_environments(second, rows)
            except Exception as exc:  # the assertion below shows it
                outcome["error"] = exc

        thread = threading.Thread(target=second_worker)
        thread.start()
        time.sleep(0.5)
        assert thread.is_alive(), "the second insert should wait for the first transaction"
    thread.join(timeout=60)
    assert outcome == {"ids": ids}
    with session_scope() as db:
        stored = {e.id: e.fingerprint for e in db.scalars(select(Environment))}
    assert stored == {ids[0]: fingerprint(environment()),
                      ids[3]: fingerprint(environment(provider="CUDAExecutionProvider"))}


def test_a_real_job_stores_its_measurements_with_this_machines_environment(client, alice, mlp_onnx):
    from workers.measure.environment import cpu_model
    from workers.supervise import run_job

    model = upload(client, alice, mlp_onnx)
    job = client.post("/v1/jobs", json={"model_id": model["id"], "steps": [{"method": "quantize.int8_dynamic"}],
                                        "evaluate": {"batch_sizes": [1, 2], "warmup": 1, "iterations": 4}},
                      headers=alice).json()
    run_job(job["id"])
    assert client.get(f"/v1/jobs/{job['id']}", headers=alice).json()["status"] == "succeeded"
    items = client.get(f"/v1/jobs/{job['id']}/measurements", headers=alice).json()["items"]
    assert {i["model_role"] for i in items} == {"baseline", "result"}
    assert {i["batch_size"] for i in items} >= {1, 2}
    assert all(i["environment"] is not None and i["environment"]["cpu"] == cpu_model() for i in items)
    assert all(i["environment"]["provider"] == i["provider"] for i in items)
    baseline = [i["id"] for i in items if i["model_role"] == "baseline"]
    charted = client.get(f"/v1/models/{model['id']}/measurements", headers=alice).json()["items"]
    assert sorted(i["id"] for i in charted) == sorted(baseline)


# --- the migration -----------------------------------------------------------------------------------------


def test_migration_0004_upgrades_and_downgrades_keeping_the_rows(client, alice, mlp_onnx):
    from alembic import command

    from app.migrate import alembic_config, upgrade

    model = upload(client, alice, mlp_onnx)
    job_id = add_job(model, [{"role": "baseline", "metric": "p50_ms", "value": 1.5, "environment": environment()}])
    get_engine().dispose()
    command.downgrade(alembic_config(), "0003")
    get_engine().dispose()
    inspector = inspect(get_engine())
    assert "environments" not in inspector.get_table_names()
    assert "environment_id" not in {c["name"] for c in inspector.get_columns("measurements")}
    with get_engine().connect() as conn:
        assert conn.scalar(text("SELECT value FROM measurements WHERE job_id = :j"), {"j": job_id}) == 1.5

    upgrade()
    get_engine().dispose()
    inspector = inspect(get_engine())
    assert "ix_measurements_environment_id" in {i["name"] for i in inspector.get_indexes("measurements")}
    assert [fk["referred_table"] for fk in inspector.get_foreign_keys("measurements")
            if fk["constrained_columns"] == ["environment_id"]] == ["environments"]
    with session_scope() as db:
        assert db.scalar(select(func.count()).select_from(Environment)) == 0
    items = client.get(f"/v1/jobs/{job_id}/measurements", headers=alice).json()["items"]
    assert [(i["value"], i["environment"]) for i in items] == [(1.5, None)]


def test_migrating_leaves_the_apps_sqlite_connections_enforcing_foreign_keys(tmp_path, monkeypatch):
    # The migration turns SQLite's foreign keys off on its connection; a pooled connection that kept them
    # off would let a deleted job leave its events behind.
    from app.migrate import upgrade
    from tests.helpers import clear_caches

    monkeypatch.setenv("MODELPRESS_DATA_DIR", str(tmp_path / "fresh"))
    monkeypatch.delenv("MODELPRESS_DATABASE_URL", raising=False)
    clear_caches()
    try:
        upgrade()  # every migration, from an empty database
        for _ in range(3):
            with session_scope() as db:
                assert db.execute(text("PRAGMA foreign_keys")).scalar() == 1
    finally:
        clear_caches()
