"""Who may see what, tried on every route of the route table (so a new route cannot skip it):

every /v1 route needs a valid key; a key needs the scope the route needs; another tenant's objects are 404
(never 403, never data) and never appear in a listing; revoked and expired keys stop working at once.
"""
from __future__ import annotations

import datetime as dt
import json
import re

import numpy as np
import pytest

from app.dbmodels import Job
from app.main import create_app
from tests.helpers import make_key, npz_bytes, queued_messages, row_count


def _walk(routes, outer="", own=""):
    # FastAPI >= 0.16x keeps an included router as one entry wrapping the original router, whose
    # route paths already hold that router's own prefix but not its parents'.
    for route in routes:
        included = getattr(route, "original_router", None)
        if included is not None:
            yield from _walk(included.routes, outer + own, included.prefix)
        elif hasattr(route, "methods"):
            yield route, outer + route.path


def v1_routes() -> list[tuple[str, str, str]]:
    """(method, path, scope it needs) of every /v1 route."""
    from app.auth.service import required_scope

    routes = []
    for route, path in _walk(create_app().routes):
        if path.startswith("/v1"):
            for method in sorted(route.methods - {"HEAD", "OPTIONS"}):
                routes.append((method, path, required_scope(method, route)))
    return sorted(set(routes))


ROUTES = v1_routes()
PATHS = [(method, path) for method, path, _scope in ROUTES]


def test_route_table_is_what_these_tests_cover():
    # A new /v1 route changes this count: the tests below already try it (they loop over the table); check
    # that they say something true of it (the ids below name every path parameter it has).
    assert len(ROUTES) == 36, PATHS
    admin = {(m, p) for m, p, scope in ROUTES if scope == "admin"}
    assert admin == {("POST", "/v1/keys"), ("GET", "/v1/keys"), ("DELETE", "/v1/keys/{key_id}"),
                     ("GET", "/v1/audit"), ("POST", "/v1/webhook-secret"), ("PUT", "/v1/integrations/mlflow"),
                     ("DELETE", "/v1/integrations/mlflow")}


def concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "x", path)


@pytest.mark.parametrize("method,path", PATHS)
@pytest.mark.parametrize("authorization", [None, "Bearer mp_not-a-real-key", "Basic abc", "Bearer "])
def test_every_v1_route_needs_a_valid_key(client, method, path, authorization):
    headers = {"Authorization": authorization} if authorization is not None else {}
    resp = client.request(method, concrete(path), headers=headers)
    assert resp.status_code == 401, (method, path, resp.status_code)
    assert resp.json()["code"] in ("unauthorized", "invalid_api_key")
    assert resp.headers["www-authenticate"] == "Bearer"


def test_every_v1_route_needs_its_scope(client):
    """A key without the route's scope is a 403 naming it; a key with only that scope gets past the check."""
    keys = {scope: {"Authorization": f"Bearer {make_key('scoped', scopes=[scope])}"}
            for scope in ("read", "write", "admin")}
    for method, path, scope in ROUTES:
        for held, headers in keys.items():
            resp = client.request(method, concrete(path), headers=headers)
            if held == scope:
                # Past the key and scope checks: whatever the route then says of the made-up id, never a
                # 401/403 and never a server error.
                assert resp.status_code not in (401, 403) and resp.status_code < 500, (method, path, held, resp.text)
            else:
                assert resp.status_code == 403, (method, path, held, resp.status_code)
                body = resp.json()
                assert body["code"] == "insufficient_scope" and body["required_scope"] == scope, body


def test_revoked_key_stops_working_at_once(client):
    from app.auth.service import create_key, revoke_key
    from app.db import session_scope

    with session_scope() as db:
        row, plaintext = create_key(db=db, tenant_name="carol")
        key_id = row.id
    headers = {"Authorization": f"Bearer {plaintext}"}
    assert client.get("/v1/models", headers=headers).status_code == 200
    with session_scope() as db:
        revoke_key(db=db, key_id_or_plaintext=key_id)
    resp = client.get("/v1/models", headers=headers)
    assert resp.status_code == 401 and resp.json()["code"] == "invalid_api_key"


def test_keys_through_the_api_create_list_expire_and_revoke(client):
    admin = {"Authorization": f"Bearer {make_key('dave')}"}
    resp = client.post("/v1/keys", json={"scopes": ["read"], "expires_in_s": 3600}, headers=admin)
    assert resp.status_code == 201, resp.text
    assert resp.headers["cache-control"] == "no-store"
    created = resp.json()
    reader = {"Authorization": f"Bearer {created['key']}"}
    assert created["scopes"] == ["read"] and created["expires_at"] is not None
    assert client.get("/v1/models", headers=reader).status_code == 200
    assert client.post("/v1/jobs", json={}, headers=reader).json()["code"] == "insufficient_scope"
    listed = client.get("/v1/keys", headers=admin).json()["items"]
    assert created["id"] in {k["id"] for k in listed}
    assert all("key" not in item for item in listed) and created["key"] not in json.dumps(listed)  # never the secret
    # Revoked through the API: the next request is refused.
    resp = client.delete(f"/v1/keys/{created['id']}", headers=admin)
    assert resp.status_code == 200 and resp.json()["revoked_at"] is not None
    assert client.get("/v1/models", headers=reader).json()["code"] == "invalid_api_key"
    # Bad requests: unknown scope, two expiries, an expiry in the past.
    assert client.post("/v1/keys", json={"scopes": ["root"]}, headers=admin).json()["code"] == "invalid_scopes"
    assert client.post("/v1/keys", json={"scopes": ["read"], "expires_in_s": 60,
                                         "expires_at": "2030-01-01T00:00:00Z"}, headers=admin).status_code == 422
    assert client.post("/v1/keys", json={"scopes": []}, headers=admin).status_code == 422


def test_expired_key_is_refused_with_its_own_code(client):
    past = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
    resp = client.get("/v1/models", headers={"Authorization": f"Bearer {make_key('erin', expires_at=past)}"})
    assert resp.status_code == 401 and resp.json()["code"] == "api_key_expired"
    future = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    headers = {"Authorization": f"Bearer {make_key('erin', expires_at=future)}"}
    assert client.get("/v1/models", headers=headers).status_code == 200


def test_another_tenants_objects_are_404_on_every_route(client, data_dir, mlp_onnx):
    from workers.supervise import run_job

    alice = {"Authorization": f"Bearer {make_key('alice')}"}
    bob = {"Authorization": f"Bearer {make_key('bob')}"}
    model = client.post("/v1/models", files={"file": ("m.onnx", mlp_onnx)}, headers=alice).json()
    npz = npz_bytes(features=np.zeros((4, 64), np.float32))
    dataset = client.post("/v1/datasets", files={"file": ("d.npz", npz)}, headers=alice).json()
    job = client.post("/v1/jobs", json={"model_id": model["id"], "steps": [{"method": "quantize.int8_dynamic"}],
                                        "evaluate": {"warmup": 1, "iterations": 3}}, headers=alice).json()
    run_job(job["id"])  # finished, so the report, artifacts, events and measurements exist for alice
    assert client.get(f"/v1/jobs/{job['id']}", headers=alice).json()["status"] == "succeeded"
    assert client.get(f"/v1/jobs/{job['id']}/measurements", headers=alice).json()["items"]
    alice_key = client.post("/v1/keys", json={"scopes": ["read"]}, headers=alice).json()

    # gate_id: alice's job (a gate is a job of kind gate; any of alice's job ids must be a 404 to bob there too).
    ids = {"model_id": model["id"], "job_id": job["id"], "dataset_id": dataset["id"], "name": "model.onnx",
           "key_id": alice_key["id"], "gate_id": job["id"]}
    alices = list(ids.values())[:3] + [alice_key["id"], alice_key["key"]]
    tried = 0
    for method, path in PATHS:
        if "{" not in path:
            if method == "GET":
                # Listings (models, datasets, jobs, keys, audit, methods, recipes): none of alice's objects.
                resp = client.get(path, headers=bob)
                # The tenant's own MLflow settings: bob has none (alice's are never his).
                assert resp.status_code == 200 or (path, resp.json().get("code")) == (
                    "/v1/integrations/mlflow", "mlflow_not_configured"), (path, resp.text)
                assert not any(object_id in resp.text for object_id in alices), path
            continue
        resp = client.request(method, path.format(**ids), headers=bob)
        assert resp.status_code == 404, (method, path, resp.status_code, resp.text)
        assert resp.json()["code"].endswith("not_found")
        assert alice_key["key"] not in resp.text, path  # (the 404 may echo the id bob sent, nothing more)
        tried += 1
    # Every route with a path parameter was tried with alice's ids; a new one changes this count (as the
    # route count in test_route_table_is_what_these_tests_cover: 36 routes, 19 of them templated).
    assert tried == 19
    # A job naming alice's model, dataset or student model with bob's key is a 404 as well, and queues nothing.
    bob_model = client.post("/v1/models", files={"file": ("b.onnx", mlp_onnx)}, headers=bob).json()
    attempts = [
        {"model_id": model["id"], "steps": [{"method": "quantize.int8_dynamic"}]},
        {"model_id": bob_model["id"], "steps": [{"method": "quantize.int8_dynamic"}],
         "evaluate": {"eval_dataset_id": dataset["id"]}},
        {"model_id": bob_model["id"], "steps": [{"method": "distill.kd", "params": {
            "student": "model", "student_model_id": model["id"], "train_dataset_id": dataset["id"]}}]},
    ]
    for spec in attempts:
        resp = client.post("/v1/jobs", json=spec, headers=bob)
        assert resp.status_code == 404 and resp.json()["code"].endswith("not_found"), resp.text
    assert client.get("/v1/jobs", headers=bob).json()["items"] == []
    assert row_count(Job) == 1  # alice's one job: none of bob's attempts made a row...
    assert queued_messages(data_dir) == [{"task": "modelpress.run_job", "args": [job["id"]]}]  # ...or a message
    # bob's attempts changed nothing of alice's.
    assert client.get(f"/v1/models/{model['id']}", headers=alice).status_code == 200
    assert client.get(f"/v1/datasets/{dataset['id']}", headers=alice).status_code == 200
    assert client.get(f"/v1/jobs/{job['id']}", headers=alice).json()["status"] == "succeeded"
    reader = {"Authorization": f"Bearer {alice_key['key']}"}
    assert client.get("/v1/models", headers=reader).status_code == 200  # bob's DELETE did not revoke it
