"""Replayable jobs (issue 21, part 3) end to end on the production stack: PostgreSQL, Redis, the API and a Celery
worker as processes. Every job records a content-addressed recipe (report.recipe and recipe.json); a replay
(POST /v1/jobs/{id}/replay) of a CPU job on the same machine comes out byte-identical; a replay says what
differed when the recipe it is compared with names other libraries or hardware; a replay that cannot use the same
inputs, or of another tenant's job, creates nothing.

That each method repeats itself byte for byte (calibrated quantization, pruning with fine-tuning, distillation,
clustering, dynamic quantization) is a property of the methods, tested in process by
tests/workers/test_step_determinism.py; here two originals (a step with a calibration dataset, a step that trains
on a train dataset) carry what needs the stack, and the tests that only need "a finished job" share them."""
from __future__ import annotations

import hashlib
import json
import platform
import re
import uuid

import httpx
import numpy as np
import pytest
import sqlalchemy as sa

from tests.helpers import REDIS_URL, digits_classifier, drop_redis_keys, fresh_postgres_database, mlp_onnx_bytes, redis_or_skip
from tests.methods.factories import npz
from tests.stack import cli, production_stack, wait_for_job

FAST = {"batch_sizes": [1], "warmup": 1, "iterations": 4}
TRAIN = {"epochs": 2, "lr": 2e-3, "batch_size": 32, "patience": None}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """The production deployment with two tenants; yields their HTTP clients and the database URL."""
    redis_or_skip()
    import redis

    prefix = f"mptest-{uuid.uuid4().hex[:8]}-"
    try:
        folder = tmp_path_factory.mktemp("replay")
        with fresh_postgres_database() as database_url, production_stack(
                folder, database_url, REDIS_URL, prefix, tenants=("acme", "rival")) as (base, keys):
            clients = {tenant: httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=60)
                       for tenant, key in keys.items()}
            try:
                yield {"database_url": database_url, "url": base, "key": keys["acme"], "tmp": folder, **clients}
            finally:
                for client in clients.values():
                    client.close()
    finally:
        client = redis.Redis.from_url(REDIS_URL)
        drop_redis_keys(client, prefix)  # only this module's queues: the machine's Redis stays


def upload(http: httpx.Client, route: str, name: str, content: bytes) -> dict:
    resp = http.post(route, files={"file": (name, content)})
    assert resp.status_code == 201, resp.text
    return resp.json()


def submit(http: httpx.Client, model_id: str, step: dict, evaluate: dict | None = None) -> str:
    resp = http.post("/v1/jobs", json={"model_id": model_id, "steps": [step], "evaluate": evaluate or FAST})
    assert resp.status_code == 202, resp.text
    return resp.json()["id"]


def succeeded(http: httpx.Client, job_id: str, timeout: float = 300) -> dict:
    job = wait_for_job(http, job_id, timeout=timeout)
    assert job["status"] == "succeeded", job
    return job


def model_sha(http: httpx.Client, job_id: str, name: str = "model.onnx") -> str:
    listed = {a["name"]: a for a in http.get(f"/v1/jobs/{job_id}/artifacts").json()}
    resp = http.get(f"/v1/jobs/{job_id}/artifacts/{name}")
    assert resp.status_code == 200, resp.text
    assert hashlib.sha256(resp.content).hexdigest() == listed[name]["sha256"]
    return listed[name]["sha256"]


def jobs_of(http: httpx.Client) -> list[str]:
    return [job["id"] for job in http.get("/v1/jobs", params={"limit": 200}).json()["items"]]


@pytest.fixture(scope="module")
def digits(stack):
    """The digits CNN and its datasets, uploaded by acme (the bytes kept to check the recipe's sha256s)."""
    onnx_bytes, x, y = digits_classifier("cnn")
    files = {"model": onnx_bytes, "train": npz(images=x[:200], labels=y[:200]),
             "calibration": npz(images=x[:64]), "eval": npz(images=x[200:360], labels=y[200:360])}
    acme = stack["acme"]
    ids = {"model": upload(acme, "/v1/models", "digits-cnn.onnx", files["model"])["id"]}
    ids |= {role: upload(acme, "/v1/datasets", f"{role}.npz", files[role])["id"] for role in files if role != "model"}
    return {"ids": ids, "sha256": {role: hashlib.sha256(content).hexdigest() for role, content in files.items()}}


# The originals: one step that reads a calibration dataset, one that trains on a train dataset (every method's
# determinism: tests/workers/test_step_determinism.py).
METHODS = {
    "quantize.int8_static": lambda ids: {"calibration_dataset_id": ids["calibration"]},
    "prune.channels": lambda ids: {"ratio": 0.5, "train_dataset_id": ids["train"], **TRAIN},
}
# The original the tests replay when any finished job will do (the cheaper one to run again).
QUICK = "quantize.int8_static"


@pytest.fixture(scope="module")
def originals(stack, digits):
    """One finished job per method of METHODS, all queued at once (the worker takes them in turn)."""
    acme, ids = stack["acme"], digits["ids"]
    evaluate = FAST | {"eval_dataset_id": ids["eval"]}
    queued = {method: submit(acme, ids["model"], {"method": method, "params": params(ids)}, evaluate)
              for method, params in METHODS.items()}
    return {method: succeeded(acme, job_id) for method, job_id in queued.items()}


def test_every_job_records_its_recipe_by_content_with_method_and_library_versions(stack, digits, originals):
    import onnxruntime

    acme = stack["acme"]
    versions = {m["id"]: m["version"] for m in acme.get("/v1/methods").json()}
    for method, job in originals.items():
        report = acme.get(f"/v1/jobs/{job['id']}/report").json()
        recipe = report["recipe"]
        provenance = recipe["provenance"]
        assert provenance["model"]["sha256"] == digits["sha256"]["model"]
        roles = {d["role"].split(".")[-1]: d for d in provenance["datasets"]}
        assert roles["eval"]["sha256"] == digits["sha256"]["eval"]
        for param, role in (("calibration_dataset_id", "calibration"), ("train_dataset_id", "train")):
            if param in job["steps"][0]["params"] and job["steps"][0]["params"][param]:
                assert roles[param]["sha256"] == digits["sha256"][role], (method, roles)
        assert provenance["methods"] == [{"method": method, "version": versions[method],
                                          "params": job["steps"][0]["params"]}]
        assert recipe["seeds"]["steps"] == [1]
        assert recipe["libraries"]["onnxruntime"] == onnxruntime.__version__
        assert recipe["libraries"]["python"] == platform.python_version()
        assert {"torch", "onnx", "numpy", "openvino", "nncf"} <= set(recipe["libraries"])
        assert recipe["environment"]["fingerprint"]["cpu"] and len(recipe["environment"]["id"]) == 64
        assert len(recipe["digest"]) == 64
        # The same recipe as an artifact of its own.
        stored = acme.get(f"/v1/jobs/{job['id']}/artifacts/recipe.json")
        assert stored.status_code == 200 and json.loads(stored.content) == recipe
    digests = {originals[m]["id"]: acme.get(f"/v1/jobs/{originals[m]['id']}/report").json()["recipe"]["digest"]
               for m in originals}
    assert len(set(digests.values())) == len(originals)  # other methods or params: another digest


def test_a_replay_on_the_same_machine_is_byte_identical_through_the_api(stack, originals):
    acme = stack["acme"]
    replays = {}
    for method, job in originals.items():
        resp = acme.post(f"/v1/jobs/{job['id']}/replay")
        assert resp.status_code == 202, resp.text
        assert resp.json()["replay_of"] == job["id"] and resp.headers["location"] == f"/v1/jobs/{resp.json()['id']}"
        replays[method] = resp.json()["id"]
    for method, replay_id in replays.items():
        original = originals[method]
        # The replays queue on one worker together: the last waits for those before it (busy CI cores).
        replayed = succeeded(acme, replay_id, timeout=900)
        assert replayed["steps"] == original["steps"] and replayed["model_id"] == original["model_id"]
        assert model_sha(acme, replay_id) == model_sha(acme, original["id"]), method
        report = acme.get(f"/v1/jobs/{replay_id}/report").json()
        section = report["replay"]
        assert section["original_job_id"] == original["id"]
        assert section["byte_identical"] is True, (method, section)
        assert section["artifacts"]["model.onnx"]["identical"] is True
        assert section["same_digest"] is True and section["differed"] == {}, (method, section["differed"])
        assert "why_not_identical" not in section
        # The figures are compared side by side: the same model gives the same size and accuracy.
        assert section["figures"]["compressed_size_bytes"]["change"] == 0
        assert section["figures"]["accuracy.compressed_top1"]["change"] == 0
        assert "speedup[1]" in section["figures"]


def test_a_replay_compared_with_other_libraries_and_hardware_says_what_differed(stack, originals):
    """The original's stored recipe is edited to name another onnxruntime and another CPU, as if it had run
    elsewhere: the replay names both differences (the artifact is still the same bytes)."""
    acme = stack["acme"]
    original = originals[QUICK]
    engine = sa.create_engine(stack["database_url"])
    try:
        with engine.begin() as db:
            report = db.execute(sa.text("SELECT report FROM jobs WHERE id = :id"), {"id": original["id"]}).scalar_one()
            report["recipe"]["libraries"]["onnxruntime"] = "1.0.0"
            report["recipe"]["environment"]["fingerprint"]["cpu"] = "Another CPU @ 1.0GHz"
            db.execute(sa.text("UPDATE jobs SET report = CAST(:report AS jsonb) WHERE id = :id"),
                       {"report": json.dumps(report), "id": original["id"]})
    finally:
        engine.dispose()
    import onnxruntime

    resp = acme.post(f"/v1/jobs/{original['id']}/replay")
    assert resp.status_code == 202, resp.text
    succeeded(acme, resp.json()["id"])
    section = acme.get(f"/v1/jobs/{resp.json()['id']}/report").json()["replay"]
    assert section["differed"]["libraries"] == {"onnxruntime": {"original": "1.0.0",
                                                                "replay": onnxruntime.__version__}}
    assert section["differed"]["environment"]["cpu"]["original"] == "Another CPU @ 1.0GHz"
    assert section["differed"]["environment"]["cpu"]["replay"] != "Another CPU @ 1.0GHz"
    assert section["same_digest"] is True  # the inputs, methods and seeds are the same
    assert section["byte_identical"] is True
    for figure in ("compressed_size_bytes", "speedup[1]", "fidelity.cosine_similarity", "accuracy.compressed_top1"):
        entry = section["figures"][figure]
        assert {"original", "replay", "change"} <= set(entry), figure


def test_an_unfinished_job_or_one_whose_dataset_or_model_was_deleted_is_not_replayed_and_nothing_is_created(stack):
    """One job of its own (its inputs get deleted): refused while it is queued or running (no result to reproduce
    yet), then once its dataset is gone, then once its model is gone too."""
    acme = stack["acme"]
    model = upload(acme, "/v1/models", "mlp.onnx", mlp_onnx_bytes())
    features = np.random.default_rng(0).random((32, 64), dtype=np.float32)
    calibration = upload(acme, "/v1/datasets", "calibration.npz", npz(features=features))
    job_id = submit(acme, model["id"], {"method": "quantize.int8_static",
                                        "params": {"calibration_dataset_id": calibration["id"]}})
    before = jobs_of(acme)
    resp = acme.post(f"/v1/jobs/{job_id}/replay")
    assert resp.status_code == 409 and resp.json()["code"] == "job_not_replayable", resp.text
    assert jobs_of(acme) == before
    succeeded(acme, job_id)
    assert acme.delete(f"/v1/datasets/{calibration['id']}").status_code == 204
    resp = acme.post(f"/v1/jobs/{job_id}/replay")
    assert resp.status_code == 409, resp.text
    assert resp.json()["code"] == "replay_dataset_deleted"
    assert jobs_of(acme) == before
    assert acme.delete(f"/v1/models/{model['id']}").status_code == 204
    resp = acme.post(f"/v1/jobs/{job_id}/replay")
    assert resp.status_code == 409, resp.text
    problem = resp.json()
    assert problem["code"] == "replay_model_deleted"
    assert model["sha256"] in problem["message"]  # the recipe still names the bytes that are gone
    assert jobs_of(acme) == before


def test_another_tenants_job_is_not_found(stack, originals):
    rival = stack["rival"]
    job_id = originals[QUICK]["id"]
    resp = rival.post(f"/v1/jobs/{job_id}/replay")
    assert resp.status_code == 404 and resp.json()["code"] == "job_not_found"
    assert jobs_of(rival) == []
    resp = rival.post(f"/v1/jobs/{uuid.uuid4()}/replay")
    assert resp.status_code == 404 and resp.json()["code"] == "job_not_found"


def test_the_client_and_the_cli_replay_a_job_and_show_the_comparison(stack, originals):
    from app.client import Client

    original = originals[QUICK]
    with Client(stack["url"], stack["key"]) as mp:
        job = mp.replay(original["id"])
        assert job["replay_of"] == original["id"] and job["status"] in ("queued", "running")
        done = mp.wait(job["id"], timeout_s=300)
        assert done["status"] == "succeeded" and mp.report(job["id"])["replay"]["byte_identical"] is True
    shown = cli(stack, "replay", original["id"], "--wait")
    assert shown.returncode == 0, shown.stderr
    assert re.search(rf"replay of\s*│\s*{original['id']}", shown.stdout), shown.stdout
    assert re.search(r"byte-identical\s*│\s*yes", shown.stdout), shown.stdout
    assert re.search(r"model\.onnx\s*│\s*identical", shown.stdout), shown.stdout
    refused = cli(stack, "replay", str(uuid.uuid4()))
    assert refused.returncode == 1 and "job_not_found" in refused.stderr


def test_a_comparison_names_the_artifacts_that_differ_and_why():
    """workers.replay.compare on its own: an artifact of other bytes under the same recipe is called
    non-deterministic; under another torch, the library is named as the likely cause; figures move by their change."""
    from workers.replay import compare

    recipe = {"digest": "d" * 64, "libraries": {"torch": "2.5.0", "onnx": "1.17.0"},
              "environment": {"fingerprint": {"cpu": "A"}}, "steps": [{"method": "prune.channels", "version": 1}]}
    original = {"job_id": "j1", "recipe": recipe, "summary": {"compressed_size_bytes": 1000, "speedup": {"1": 2.0}},
                "artifacts": [{"name": "model.onnx", "kind": "model", "sha256": "a" * 64}]}
    mine = [{"name": "model.onnx", "kind": "model", "sha256": "b" * 64},
            {"name": "report.json", "kind": "report", "sha256": "c" * 64}]
    same = compare(original, recipe, {"compressed_size_bytes": 1100, "speedup": {"1": 1.5}}, mine)
    assert same["byte_identical"] is False and same["differed"] == {} and same["same_digest"] is True
    assert list(same["artifacts"]) == ["model.onnx"]  # the report is a record, never compared
    assert "model.onnx differ" in same["why_not_identical"] and "not deterministic" in same["why_not_identical"]
    assert same["figures"]["compressed_size_bytes"] == {"original": 1000, "replay": 1100, "change": 100,
                                                        "change_pct": 10.0}
    assert same["figures"]["speedup[1]"]["change_pct"] == -25.0
    upgraded = compare(original, recipe | {"libraries": {"torch": "2.6.0", "onnx": "1.17.0"}}, {}, mine)
    assert upgraded["differed"] == {"libraries": {"torch": {"original": "2.5.0", "replay": "2.6.0"}}}
    assert "libraries (torch)" in upgraded["why_not_identical"]
    unrecorded = compare(original | {"recipe": None}, recipe, {}, [{"name": "model.onnx", "kind": "model",
                                                                    "sha256": "a" * 64}])
    assert unrecorded["byte_identical"] is True and "no recipe" in unrecorded["note"]
