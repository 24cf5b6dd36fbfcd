"""Schemathesis over /openapi.json (issue 9): no route answers 5xx, whatever it is sent.

Every operation of the app's own OpenAPI schema is fuzzed in process (ASGI) against a tenant that owns a
model, a dataset and a job that a real run of the pipeline finished, on PostgreSQL when it answers (the
production database: NUL bytes and type errors surface there, not in SQLite), else on SQLite.
Hooks make the generated requests reach those objects: path ids are either the generated string or a real
id, most requests carry the tenant's key (some keep the generated Authorization header), and a job body's
model_id is sometimes the real model. The upload bodies (`POST /v1/models`, `/v1/datasets`) are not in the
schema (the routes stream the raw request), so only their headers and query are fuzzed; the real uploads
are the fixture's own.

Hostile values are mixed into the generated cases (issue 20): path ids, query values and every leaf of a JSON
body are sometimes swapped for NUL, lone surrogates, huge or negative numbers, extreme dates with offsets, or
100 KB strings, which schemathesis's own generation never produces (not even with NULs allowed). The assertion
stays: no 5xx, whatever the route.

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
from tests.helpers import IN_CI, PG_ADMIN_URL, clear_caches, make_key, mlp_onnx_bytes, use_database

MAX_EXAMPLES = 25
HOSTILE_STRINGS = ["\x00", "a\x00b", "\ud800", "x\udfffy", "9999-12-31T23:59:59-12:00", "0001-01-01T00:00:00+14:00",
                   "1" * 40, "-1", "\u202e\ufeff", "%00", "../../etc/passwd", "x" * 100_000]
# A URL cannot carry a lone surrogate as text (no client can encode it), nor 100 KB: paths and queries get these.
URL_HOSTILE = [text for text in HOSTILE_STRINGS if "\ud800" not in text and "\udfff" not in text and len(text) < 1000]
URL_HOSTILE += ["y" * 8000]
HOSTILE_NUMBERS = [2**70, -(2**70), 2**63, -1, 1e308, 0]
CASES: dict[str, int] = {"total": 0}


def hostile_variants(body, limit: int = 40) -> list:
    """Copies of a JSON body, each with one leaf (or the body itself) replaced by a hostile value."""
    variants: list = []

    def leaves(value, path):
        if isinstance(value, dict):
            for key, item in value.items():
                yield from leaves(item, path + [key])
        elif isinstance(value, list):
            for index, item in enumerate(value):
                yield from leaves(item, path + [index])
        else:
            yield path, value

    def replaced(value, path, new):
        if not path:
            return new
        copy = dict(value) if isinstance(value, dict) else list(value)
        copy[path[0]] = replaced(value[path[0]], path[1:], new)
        return copy

    for path, leaf in list(leaves(body, []))[:limit]:
        pool = HOSTILE_NUMBERS if isinstance(leaf, (int, float)) and not isinstance(leaf, bool) else HOSTILE_STRINGS
        variants += [replaced(body, path, new) for new in pool]
    if isinstance(body, dict):
        variants += [{**body, "\x00": 1}, {**body, "model_id": "\x00"}, {**body, "expires_at": HOSTILE_STRINGS[4]}]
    return variants


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
    from workers.supervise import run_job

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
    if not WORLD:  # the schema's explicit examples are drawn at collection, before the fixture has run
        return st.just(path_parameters)
    deleting = context.operation.method.upper() == "DELETE"
    ids = {"model_id": WORLD["spare_model_id" if deleting else "model_id"],
           "dataset_id": WORLD["spare_dataset_id" if deleting else "dataset_id"], "job_id": WORLD["job_id"]}
    choices = {}
    for name, value in (path_parameters or {}).items():
        if name == "name":
            choices[name] = st.sampled_from([value, *WORLD["artifacts"], *URL_HOSTILE])
        elif name in ids:
            choices[name] = st.sampled_from([value, ids[name], ids[name], *URL_HOSTILE])
        else:
            choices[name] = st.sampled_from([value, *URL_HOSTILE])
    return st.fixed_dictionaries(choices)


@schema.hook
def flatmap_query(context, query):
    # Each query value is sometimes swapped for a hostile one (NUL, surrogates, huge numbers, cursors of them).
    if not query:
        return st.just(query)
    import base64
    import json

    cursors = [base64.urlsafe_b64encode(json.dumps(v).encode()).decode().rstrip("=") for v in
               (["9999-12-31T23:59:59-12:00", "x"], ["2026-01-01T00:00:00", 2**70], ["2026-01-01", "\x00"])]
    variants = [query]
    for name in query:
        variants += [{**query, name: bad} for bad in [*URL_HOSTILE, *map(str, HOSTILE_NUMBERS), *cursors]]
    return st.sampled_from(variants)


@schema.hook
def flatmap_headers(context, headers):
    # Most requests are the tenant's; one in five keeps whatever Authorization was generated (or none).
    headers = dict(headers or {})
    if not WORLD:
        return st.just(headers)
    valid = {**headers, "authorization": f"Bearer {WORLD['key']}"}
    return st.integers(0, 4).map(lambda pick: headers if pick == 0 else valid)


@schema.hook
def flatmap_body(context, body):
    # The generated body, the same on the real model, or one of its hostile variants.
    if not WORLD:
        return st.just(body)
    plain = [body, {**body, "model_id": WORLD["model_id"]}] if isinstance(body, dict) and "model_id" in body else [body]
    hostile = hostile_variants(body) if isinstance(body, (dict, list)) else []
    if not hostile:
        return st.sampled_from(plain)
    return st.one_of(st.sampled_from(plain), st.sampled_from(hostile))


@pytest.fixture(scope="module", autouse=True)
def _world_for_hooks(world):
    WORLD.update(world)
    yield
    WORLD.clear()
    print(f"\nfuzz: {CASES['total']} cases sent, none answered 5xx")  # shown with pytest -s


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
def test_no_route_answers_a_server_error(case, world):
    CASES["total"] += 1
    case.call_and_validate(app=world["app"], checks=[not_a_server_error])
