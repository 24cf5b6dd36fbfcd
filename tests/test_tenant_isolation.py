"""Every /v1 route needs a key, and another tenant's objects are 404, never 403 or data."""
from __future__ import annotations

import re

import pytest

from app.main import create_app


def _walk(routes, outer="", own=""):
    # FastAPI >= 0.16x keeps an included router as one entry wrapping the original router, whose
    # route paths already hold that router's own prefix but not its parents'.
    for route in routes:
        included = getattr(route, "original_router", None)
        if included is not None:
            yield from _walk(included.routes, outer + own, included.prefix)
        elif hasattr(route, "methods"):
            yield route.methods, outer + route.path


def v1_routes() -> list[tuple[str, str]]:
    routes = []
    for methods, path in _walk(create_app().routes):
        if path.startswith("/v1"):
            for method in sorted(methods - {"HEAD", "OPTIONS"}):
                routes.append((method, path))
    return sorted(set(routes))


ROUTES = v1_routes()


def test_route_table_is_what_this_test_covers():
    # A new /v1 route changes this count: check it needs a key (below) and shows only the caller's objects.
    assert len(ROUTES) == 24, ROUTES


@pytest.mark.parametrize("method,path", ROUTES)
@pytest.mark.parametrize("authorization", [None, "Bearer mp_not-a-real-key", "Basic abc", "Bearer "])
def test_every_v1_route_needs_a_valid_key(client, method, path, authorization):
    concrete = re.sub(r"\{[^}]+\}", "x", path)
    headers = {"Authorization": authorization} if authorization is not None else {}
    resp = client.request(method, concrete, headers=headers)
    assert resp.status_code == 401, (method, path, resp.status_code)
    assert resp.json()["code"] in ("unauthorized", "invalid_api_key")
    assert resp.headers["www-authenticate"] == "Bearer"


def test_revoked_key_is_refused(client):
    from app.auth.service import create_key, revoke_key
    from app.db import session_scope

    with session_scope() as db:
        key, plaintext = create_key(db=db, tenant_name="carol")
        key_id = key.id
    headers = {"Authorization": f"Bearer {plaintext}"}
    assert client.get("/v1/models", headers=headers).status_code == 200
    with session_scope() as db:
        revoke_key(db=db, key_id_or_plaintext=key_id)
    resp = client.get("/v1/models", headers=headers)
    assert resp.status_code == 401 and resp.json()["code"] == "invalid_api_key"


def test_another_tenants_objects_are_404_on_every_route(client, alice, bob, mlp_onnx):
    import io

    import numpy as np

    from workers.pipeline import run_job

    model = client.post("/v1/models", files={"file": ("m.onnx", mlp_onnx)}, headers=alice).json()
    npz = io.BytesIO()
    np.savez(npz, features=np.zeros((4, 64), np.float32))
    dataset = client.post("/v1/datasets", files={"file": ("d.npz", npz.getvalue())}, headers=alice).json()
    job = client.post("/v1/jobs", json={"model_id": model["id"], "steps": [{"method": "quantize.int8_dynamic"}],
                                        "evaluate": {"warmup": 1, "iterations": 3}}, headers=alice).json()
    run_job(job["id"])  # finished, so the report and artifacts exist for alice
    assert client.get(f"/v1/jobs/{job['id']}", headers=alice).json()["status"] == "succeeded"

    ids = {"model_id": model["id"], "job_id": job["id"], "dataset_id": dataset["id"], "name": "model.onnx"}
    alices = (model["id"], job["id"], dataset["id"])
    foreign = 0
    for method, path in ROUTES:
        if "{" not in path and method == "GET":
            # Listings: bob sees none of alice's objects.
            body = client.get(path, headers=bob).json()
            items = body["items"] if isinstance(body, dict) else body
            assert all(item.get("id") not in alices for item in items), path
            continue
        if "{" not in path:
            continue
        concrete = path.format(**ids)
        resp = client.request(method, concrete, headers=bob)
        assert resp.status_code == 404, (method, concrete, resp.status_code, resp.text)
        assert resp.json()["code"].endswith("not_found")
        foreign += 1
    assert foreign == 15
    # A job on alice's model, submitted with bob's key, is a 404 as well, and queues nothing.
    resp = client.post("/v1/jobs", json={"model_id": model["id"], "steps": [{"method": "quantize.int8_dynamic"}]},
                       headers=bob)
    assert resp.status_code == 404 and resp.json()["code"] == "model_not_found"
    assert client.get("/v1/jobs", headers=bob).json()["items"] == []
    # bob's attempts changed nothing of alice's.
    assert client.get(f"/v1/models/{model['id']}", headers=alice).status_code == 200
    assert client.get(f"/v1/datasets/{dataset['id']}", headers=alice).status_code == 200
    assert client.get(f"/v1/jobs/{job['id']}", headers=alice).json()["status"] == "succeeded"
