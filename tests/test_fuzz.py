"""Schemathesis over /openapi.json (issue 9): no route answers 5xx, whatever it is sent.

Every operation of the app's own OpenAPI schema is fuzzed in process (ASGI) against a tenant that owns a
model, a dataset and a job that a real run of the pipeline finished, on PostgreSQL when it answers (the
production database: NUL bytes and type errors surface there, not in SQLite), else on SQLite.
Hooks make the generated requests reach those objects: path ids are either the generated string or a real
id, most requests carry the tenant's key (some keep the generated Authorization header), and a job body's
model_id is sometimes the real model. The upload bodies (`POST /v1/models`, `/v1/datasets`) are not in the
schema (the routes stream the raw request), so only their headers and query are fuzzed; the real uploads
are the fixture's own.

Bounded and reproducible: 25 examples per operation, derandomized, no deadline.
"""
from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error

from app.main import create_app
from tests.conftest import IN_CI, PG_ADMIN_URL, clear_caches, make_key, mlp_onnx_bytes, use_database

MAX_EXAMPLES = 25


def postgres_reachable() -> bool:
    try:
        import psycopg

        psycopg.connect(PG_ADMIN_URL, connect_timeout=3).close()
        return True
    except Exception:
        if IN_CI:  # CI must fuzz the production database
            raise
        return False


def npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Iterator[dict]:
    """One deployment for the whole module: a tenant with a model, a dataset, a finished job, and a spare
    model and dataset for the DELETE routes to delete."""
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.migrate import upgrade
    from workers.pipeline import run_job

    folder = tmp_path_factory.mktemp("fuzz") / "data"
    folder.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MODELPRESS_DATA_DIR", str(folder))
        for var in ("MODELPRESS_DATABASE_URL", "MODELPRESS_BROKER_URL", "MODELPRESS_MODE", "MODELPRESS_QUEUE_PREFIX"):
            mp.delenv(var, raising=False)
        clear_caches()
        database = use_database("postgresql" if postgres_reachable() else "sqlite", mp)
        kind = next(database)
        if kind == "sqlite":
            upgrade()
        try:
            app = create_app()
            with TestClient(app) as client:
                key = make_key("fuzz")
                auth = {"Authorization": f"Bearer {key}"}
                onnx_bytes = mlp_onnx_bytes()
                x = np.random.default_rng(0).standard_normal((16, 64)).astype(np.float32)
                labels = np.arange(16, dtype=np.int64) % 10

                def upload(kind_path: str, filename: str, content: bytes) -> str:
                    resp = client.post(kind_path, files={"file": (filename, content)}, headers=auth)
                    assert resp.status_code == 201, resp.text
                    return resp.json()["id"]

                model_id = upload("/v1/models", "mlp.onnx", onnx_bytes)
                dataset_id = upload("/v1/datasets", "eval.npz", npz(features=x, labels=labels))
                spare_model_id = upload("/v1/models", "spare.onnx", onnx_bytes)
                spare_dataset_id = upload("/v1/datasets", "spare.npz", npz(features=x))
                resp = client.post("/v1/jobs", headers=auth, json={
                    "model_id": model_id, "steps": [{"method": "quantize.int8_dynamic"}],
                    "evaluate": {"batch_sizes": [1], "warmup": 1, "iterations": 4, "eval_dataset_id": dataset_id}})
                assert resp.status_code == 202, resp.text
                job_id = resp.json()["id"]
                run_job(job_id)
                job = client.get(f"/v1/jobs/{job_id}", headers=auth).json()
                assert job["status"] == "succeeded", job
                yield {"app": app, "key": key, "kind": kind, "model_id": model_id, "dataset_id": dataset_id,
                       "job_id": job_id, "spare_model_id": spare_model_id, "spare_dataset_id": spare_dataset_id,
                       "artifacts": [a["name"] for a in client.get(f"/v1/jobs/{job_id}/artifacts",
                                                                   headers=auth).json()]}
        finally:
            next(database, None)
            clear_caches()


# The schema is the app's own /openapi.json; reading it touches no database. The hooks read WORLD, which the
# module's fixture fills before the first case is generated. (schemathesis.pytest.from_fixture would be the
# lazy way, but it sets a private pytest attribute that pytest 9 no longer has.)
WORLD: dict = {}
schema = schemathesis.openapi.from_asgi("/openapi.json", create_app())


@schema.hook
def flatmap_path_parameters(context, path_parameters):
    # Each path id is either the generated value or the id of a real object (DELETE: of a spare one).
    deleting = context.operation.method.upper() == "DELETE"
    ids = {"model_id": WORLD["spare_model_id" if deleting else "model_id"],
           "dataset_id": WORLD["spare_dataset_id" if deleting else "dataset_id"], "job_id": WORLD["job_id"]}
    choices = {}
    for name, value in (path_parameters or {}).items():
        if name == "name":
            choices[name] = st.sampled_from([value, *WORLD["artifacts"]])
        elif name in ids:
            choices[name] = st.sampled_from([value, ids[name]])
        else:
            choices[name] = st.just(value)
    return st.fixed_dictionaries(choices)


@schema.hook
def flatmap_headers(context, headers):
    # Most requests are the tenant's; one in five keeps whatever Authorization was generated (or none).
    headers = dict(headers or {})
    valid = {**headers, "authorization": f"Bearer {WORLD['key']}"}
    return st.integers(0, 4).map(lambda pick: headers if pick == 0 else valid)


@schema.hook
def flatmap_body(context, body):
    if not isinstance(body, dict) or "model_id" not in body:
        return st.just(body)
    return st.sampled_from([body, {**body, "model_id": WORLD["model_id"]}])


@pytest.fixture(scope="module", autouse=True)
def _world_for_hooks(world):
    WORLD.update(world)
    yield
    WORLD.clear()


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
def test_no_route_answers_a_server_error(case, world):
    case.call_and_validate(app=world["app"], checks=[not_a_server_error])
