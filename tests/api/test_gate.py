"""Regression gates end to end (POST /v1/gates, `modelpress gate`): PostgreSQL, Redis, the API and a Celery worker
as processes. A model against itself passes a loose policy, a candidate with six times the layers fails a slowdown
limit, the CLI exits 0, 1 and 2, and every bad input gets its code with nothing queued.

No timing assertion beyond that gross case (the gate's power is bench/gate.py's to state)."""
from __future__ import annotations

import subprocess
import uuid

import httpx
import numpy as np
import pytest

from tests.helpers import REDIS_URL, drop_redis_keys, fresh_postgres_database, onnx_bytes, redis_or_skip
from tests.stack import BIN, ROOT, base_env, production_stack, wait_for_job

WIDTH = 512


def chain_model(layers: int, *, input_name: str = "x") -> bytes:
    """x [N, 512] -> `layers` x (MatMul 512x512, Tanh) -> y: its time grows with its layers."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, weights, current = [], [], input_name
    for index in range(layers):
        weight = (rng.standard_normal((WIDTH, WIDTH)) / np.sqrt(WIDTH)).astype(np.float32)
        weights.append(numpy_helper.from_array(weight, f"w{index}"))
        nodes += [helper.make_node("MatMul", [current, f"w{index}"], [f"m{index}"]),
                  helper.make_node("Tanh", [f"m{index}"], [f"t{index}"])]
        current = f"t{index}"
    nodes.append(helper.make_node("Identity", [current], ["y"]))
    return onnx_bytes(nodes, [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["N", WIDTH])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", WIDTH])], weights)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """(base URL, {tenant: key}, an httpx client of acme's, the env `modelpress` runs with)."""
    redis_or_skip()
    prefix = f"mptest-{uuid.uuid4().hex[:8]}-"
    folder = tmp_path_factory.mktemp("gate")
    try:
        with fresh_postgres_database() as url, production_stack(folder, url, REDIS_URL, prefix,
                                                                tenants=("acme", "globex")) as (base, keys):
            env = base_env(folder / "cli", MODELPRESS_URL=base, MODELPRESS_API_KEY=keys["acme"])
            with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {keys['acme']}"}, timeout=60) as http:
                yield base, keys, http, env
    finally:
        import redis

        client = redis.Redis.from_url(REDIS_URL)
        drop_redis_keys(client, prefix)


@pytest.fixture(scope="module")
def models(stack, tmp_path_factory):
    """acme's baseline (2 layers), its slow candidate (12 layers), a model with another input name; their files."""
    _base, _keys, http, _env = stack
    folder = tmp_path_factory.mktemp("models")
    found = {}
    for name, data in (("baseline", chain_model(2)), ("slow", chain_model(12)),
                       ("renamed", chain_model(2, input_name="features"))):
        path = folder / f"{name}.onnx"
        path.write_bytes(data)
        resp = http.post("/v1/models", files={"file": (path.name, data)})
        assert resp.status_code == 201, resp.text
        found[name], found[f"{name}_file"] = resp.json()["id"], path
    return found


def run_gate(http: httpx.Client, body: dict) -> dict:
    resp = http.post("/v1/gates", json=body)
    assert resp.status_code == 202, resp.text
    assert resp.headers["location"] == f"/v1/gates/{resp.json()['id']}"
    job = wait_for_job(http, resp.json()["id"], timeout=300)
    assert job["status"] == "succeeded", job
    assert job["kind"] == "gate"
    return http.get(f"/v1/gates/{job['id']}").json()


def test_model_against_itself_passes_a_loose_policy(stack, models):
    _base, keys, http, _env = stack
    gate = run_gate(http, {"candidate_model_id": models["baseline"], "baseline": {"model_id": models["baseline"]},
                           "policy": {"max_slowdown_pct": 50, "min_cosine": 0.999, "max_size_growth_pct": 0},
                           "batch_size": 16, "time_budget_s": 20})
    assert gate["verdict"] == "pass", gate
    assert {c["name"] for c in gate["checks"]} == {"max_slowdown_pct", "min_cosine", "max_size_growth_pct"}
    assert all(c["passed"] for c in gate["checks"])
    report = http.get(f"/v1/gates/{gate['id']}/report").json()
    slowdown = next(c for c in report["checks"] if c["name"] == "max_slowdown_pct")
    low, high = slowdown["interval"]
    assert low <= slowdown["value"] <= high < 50
    assert "slower than the baseline at batch 16" in slowdown["text"]
    cosine = next(c for c in report["checks"] if c["name"] == "min_cosine")
    assert cosine["value"] == pytest.approx(1.0, abs=1e-6)
    assert "synthetic random inputs" in cosine["text"]  # no eval dataset: said so
    assert report["latency"]["looks"] and report["latency"]["rounds"] >= 24
    assert "latency-rounds.json" in {a["name"] for a in http.get(f"/v1/jobs/{gate['id']}/artifacts").json()}
    # Another tenant sees no such gate.
    with httpx.Client(base_url=http.base_url, headers={"Authorization": f"Bearer {keys['globex']}"}) as intruder:
        assert intruder.get(f"/v1/gates/{gate['id']}").json()["code"] == "gate_not_found"


def test_a_much_slower_candidate_fails(stack, models):
    _base, _keys, http, _env = stack
    gate = run_gate(http, {"candidate_model_id": models["slow"], "baseline": {"model_id": models["baseline"]},
                           "policy": {"max_slowdown_pct": 10}, "batch_size": 16, "time_budget_s": 30})
    assert gate["verdict"] == "fail", gate
    (check,) = gate["checks"]
    assert check["name"] == "max_slowdown_pct" and not check["passed"]
    assert check["value"] > 100  # six times the layers: more than twice as slow
    assert "lower bound is above the limit of +10" in gate["reason"]


def test_baseline_from_a_job_that_handed_over_a_model(stack, models):
    _base, _keys, http, _env = stack
    resp = http.post("/v1/jobs", json={"model_id": models["baseline"], "steps": [{"method": "quantize.int8_dynamic"}],
                                       "evaluate": {"batch_sizes": [16], "warmup": 2, "iterations": 20}})
    assert resp.status_code == 202, resp.text
    assert wait_for_job(http, resp.json()["id"])["status"] == "succeeded"
    gate = run_gate(http, {"candidate_model_id": models["baseline"], "baseline": {"job_id": resp.json()["id"]},
                           "policy": {"min_cosine": 0.9, "max_size_growth_pct": 10}, "batch_size": 16,
                           "time_budget_s": 5})
    # The float model against its int8 version: faithful, but four times its size.
    checks = {c["name"]: c for c in gate["checks"]}
    assert checks["min_cosine"]["passed"]
    assert not checks["max_size_growth_pct"]["passed"] and checks["max_size_growth_pct"]["value"] > 100
    assert gate["verdict"] == "fail" and gate["baseline"] == {"job_id": resp.json()["id"]}


def jobs_count(http: httpx.Client) -> int:
    return len(http.get("/v1/jobs", params={"limit": 200}).json()["items"])


def test_bad_inputs_get_their_codes_and_queue_nothing(stack, models):
    _base, keys, http, _env = stack
    with httpx.Client(base_url=http.base_url, headers={"Authorization": f"Bearer {keys['globex']}"}) as other:
        resp = other.post("/v1/models", files={"file": ("theirs.onnx", chain_model(2))})
        theirs = resp.json()["id"]
        theirs_before = len(other.get("/v1/jobs").json()["items"])
    # A gate hands over no model: it cannot be a baseline.
    finished_gate = run_gate(http, {"candidate_model_id": models["baseline"], "baseline": {"model_id": models["baseline"]},
                                    "policy": {"max_size_bytes": 10**9}, "time_budget_s": 5})["id"]
    before = jobs_count(http)
    candidate = models["baseline"]
    loose = {"max_slowdown_pct": 50}
    cases = [
        ({"baseline": {"model_id": theirs}, "policy": loose}, 404, "model_not_found", "baseline.model_id"),
        ({"baseline": {"model_id": str(uuid.uuid4())}, "policy": loose}, 404, "model_not_found", "baseline.model_id"),
        ({"baseline": {"model_id": candidate}}, 422, "empty_policy", "policy"),
        ({"baseline": {"model_id": candidate}, "policy": {}}, 422, "empty_policy", "policy"),
        ({"baseline": {"job_id": str(uuid.uuid4())}, "policy": loose}, 404, "job_not_found", "baseline.job_id"),
        ({"baseline": {"model_id": models["renamed"]}, "policy": loose}, 422, "inputs_mismatch", "baseline"),
        ({"baseline": {"model_id": candidate}, "policy": {"max_accuracy_drop": 1}}, 422, "needs_labels",
         "policy.max_accuracy_drop"),
        ({"baseline": {"model_id": candidate, "job_id": str(uuid.uuid4())}, "policy": loose}, 422,
         "invalid_request", None),
        ({"baseline": {"model_id": candidate}, "policy": {"max_slowdown_pct": 0}}, 422, "invalid_request", None),
        ({"baseline": {"model_id": candidate}, "policy": loose, "eval_dataset_id": "nope"}, 404, "dataset_not_found",
         "eval_dataset_id"),
        ({"baseline": {"job_id": finished_gate}, "policy": loose}, 422, "no_model_handed_over", "baseline.job_id"),
    ]
    for extra, status, code, field in cases:
        resp = http.post("/v1/gates", json={"candidate_model_id": candidate} | extra)
        assert (resp.status_code, resp.json()["code"]) == (status, code), (extra, resp.text)
        if field:
            assert resp.json()["field"] == field, resp.text
    # Another tenant's candidate is a 404 like a missing one.
    resp = http.post("/v1/gates", json={"candidate_model_id": theirs, "baseline": {"model_id": candidate},
                                        "policy": loose})
    assert (resp.status_code, resp.json()["code"], resp.json()["field"]) == (404, "model_not_found",
                                                                               "candidate_model_id")
    assert jobs_count(http) == before
    with httpx.Client(base_url=http.base_url, headers={"Authorization": f"Bearer {keys['globex']}"}) as other:
        assert len(other.get("/v1/jobs").json()["items"]) == theirs_before


def cli(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "modelpress"), "gate", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_cli_exit_codes(stack, models):
    _base, _keys, http, env = stack
    passed = cli(env, str(models["baseline_file"]), "--baseline", models["baseline"], "--max-slowdown", "50",
                 "--min-cosine", "0.999", "--batch-size", "16", "--time-budget", "20", "--wait")
    assert passed.returncode == 0, passed.stderr
    assert "PASS" in passed.stdout
    failed = cli(env, models["slow"], "--baseline", f"model:{models['baseline']}", "--max-slowdown", "10",
                 "--batch-size", "16", "--time-budget", "30", "--wait")
    assert failed.returncode == 1, failed.stderr
    assert "FAIL" in failed.stdout and "failed: max_slowdown_pct" in failed.stderr
    before = jobs_count(http)
    unknown = cli(env, models["baseline"], "--baseline", f"job:{uuid.uuid4()}", "--max-slowdown", "3", "--wait")
    assert unknown.returncode == 2 and "job_not_found" in unknown.stderr
    no_limit = cli(env, models["baseline"], "--baseline", models["baseline"], "--wait")
    assert no_limit.returncode == 2 and "give at least one limit" in no_limit.stderr
    assert jobs_count(http) == before
