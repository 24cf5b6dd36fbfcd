"""MLflow both ways, against a real `mlflow server` the tests start on loopback (SQLite backend, local artifact
root served through its artifact proxy, the basic-auth app so that credentials are really checked), and the
production deployment as processes: PostgreSQL, Redis, the API and a Celery worker.

- A job with an `mlflow` option logs its run (params, metrics, the report) and registers its compressed model
  (ONNX flavour) with tags that lead back to the job and the source model; read back with MlflowClient.
- POST /v1/models pulls an ONNX model by its models:/ or runs:/ URI (sha256 equal); a sklearn model, a missing one,
  an unreachable or unauthorized server are refused with their codes and nothing is kept.
- The tenant's credential is never served back and is stored encrypted (the row read from PostgreSQL).
"""
from __future__ import annotations

import hashlib
import os
import time
import uuid
from contextlib import ExitStack

import httpx
import numpy as np
import pytest

from tests.helpers import REDIS_URL, drop_redis_keys, fresh_postgres_database, mlp_onnx_bytes, redis_or_skip
from tests.stack import BIN, base_env, free_port, logs, modelpress, processes, wait_for_job, wait_ready

pytestmark = pytest.mark.integration

ADMIN, ADMIN_PASSWORD = "admin", "mp-test-Admin-password-1234"
TENANTS = ("acme", "globex", "initech", "hooli")
FAST_EVALUATE = {"batch_sizes": [1], "warmup": 1, "iterations": 5}


# --- fixtures ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mlflow_process(tmp_path_factory):
    """`mlflow server` with the basic-auth app on a free loopback port, started (not yet waited for: the stack starts
    meanwhile); its admin user is created at start."""
    folder = tmp_path_factory.mktemp("mlflow")
    config = folder / "basic_auth.ini"
    config.write_text("[mlflow]\ndefault_permission = READ\n"
                      f"database_uri = sqlite:///{folder / 'auth.db'}\n"
                      f"admin_username = {ADMIN}\nadmin_password = {ADMIN_PASSWORD}\n"
                      "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                      "auth_cache_ttl_seconds = 300\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "MODELPRESS_"))}
    env |= {"MLFLOW_AUTH_CONFIG_PATH": str(config), "MLFLOW_FLASK_SERVER_SECRET_KEY": uuid.uuid4().hex}
    port = free_port()
    argv = [str(BIN / "mlflow"), "server", "--app-name", "basic-auth",
            "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
            "--artifacts-destination", str(folder / "artifacts"), "--serve-artifacts",
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with processes(argv, env=env, log_dir=folder) as procs:
        yield {"url": f"http://127.0.0.1:{port}", "folder": folder, "proc": procs[0]}


@pytest.fixture(scope="module")
def mlflow_server(mlflow_process):
    """The server, once /health answers."""
    url, deadline = mlflow_process["url"], time.monotonic() + 90
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return mlflow_process
        except httpx.HTTPError:
            pass
        if mlflow_process["proc"].poll() is not None or time.monotonic() > deadline:
            print(logs(mlflow_process["folder"]))
            raise RuntimeError("mlflow server did not start")
        time.sleep(0.3)


@pytest.fixture(scope="module")
def mlflow_client(mlflow_server):
    """The test's own MLflow client (admin credentials), as a data scientist's notebook would hold it."""
    import mlflow

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN)
        patch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN_PASSWORD)
        patch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        mlflow.set_tracking_uri(mlflow_server["url"])
        yield mlflow.MlflowClient(mlflow_server["url"])


@pytest.fixture(scope="module")
def stack(tmp_path_factory, mlflow_process):
    """PostgreSQL, Redis, a migrated database, one API and one worker in production mode, with a secret key and
    MLflow allowed on loopback (where the test server listens; it starts meanwhile). Yields the base URL, a key per
    tenant, the database URL and the secret key."""
    from cryptography.fernet import Fernet

    redis_or_skip()
    folder = tmp_path_factory.mktemp("stack")
    prefix = f"mptest-{uuid.uuid4().hex[:8]}-"
    secret_key = Fernet.generate_key().decode()
    with ExitStack() as cleanup:
        database_url = cleanup.enter_context(fresh_postgres_database())
        env = base_env(folder / "data", MODELPRESS_MODE="production", MODELPRESS_DATABASE_URL=database_url,
                       MODELPRESS_BROKER_URL=REDIS_URL, MODELPRESS_QUEUE_PREFIX=prefix,
                       MODELPRESS_SECRET_KEY=secret_key, MODELPRESS_MLFLOW_ALLOW_PRIVATE="true")
        modelpress("migrate", env=env)
        keys = {tenant: modelpress("keys", "create", "--tenant", tenant, env=env).stdout.split("api key: ")[1].split()[0]
                for tenant in TENANTS}
        keys["acme-writer"] = modelpress("keys", "create", "--tenant", "acme", "--scopes", "read,write",
                                         env=env).stdout.split("api key: ")[1].split()[0]
        port = free_port()
        api = [str(BIN / "modelpress"), "api", "--port", str(port), "--log-level", "warning"]
        worker = [str(BIN / "modelpress"), "worker", "--queues", "gpu,cpu", "--concurrency", "3", "--loglevel", "info"]
        procs = cleanup.enter_context(processes(api, worker, env=env, log_dir=folder))
        base = f"http://127.0.0.1:{port}"
        try:
            wait_ready(base, procs)
            yield {"url": base, "keys": keys, "database_url": database_url, "secret_key": secret_key,
                   "store": folder / "data" / "store"}
        except BaseException:
            print(logs(folder))
            raise
        finally:
            import redis

            client = redis.Redis.from_url(REDIS_URL)
            drop_redis_keys(client, prefix)


def http(stack, tenant: str) -> httpx.Client:
    return httpx.Client(base_url=stack["url"], headers={"Authorization": f"Bearer {stack['keys'][tenant]}"},
                        timeout=120)


def set_mlflow(client: httpx.Client, url: str, password: str = ADMIN_PASSWORD, **extra) -> dict:
    resp = client.put("/v1/integrations/mlflow", json={"tracking_uri": url, "username": ADMIN,
                                                        "password": password, **extra})
    assert resp.status_code == 200, resp.text
    return resp.json()


def blobs(stack) -> set[str]:
    return {p.name for p in stack["store"].rglob("*") if p.is_file() and len(p.name) == 64}


def closed_port_url() -> str:
    return f"http://127.0.0.1:{free_port()}"  # bound and released: nothing listens there


# --- settings ------------------------------------------------------------------------------------------------

def test_settings_secret_is_never_shown_and_stored_encrypted(stack, mlflow_server):
    from cryptography.fernet import Fernet

    with http(stack, "hooli") as hooli, http(stack, "acme-writer") as writer:
        assert hooli.get("/v1/integrations/mlflow").json()["code"] == "mlflow_not_configured"
        shown = set_mlflow(hooli, mlflow_server["url"] + "/", registered_model_prefix="hooli-")
        assert shown["tracking_uri"] == mlflow_server["url"] and shown["credential"] == "password"
        again = hooli.get("/v1/integrations/mlflow")
        assert again.status_code == 200 and again.headers["cache-control"] == "no-store"
        for body in (str(shown), again.text):
            assert ADMIN_PASSWORD not in body
        assert again.json() | {"updated_at": None} == shown | {"updated_at": None}
        # Admin keys only; a bad body is refused with its reason; a token replaces the password.
        refused = writer.put("/v1/integrations/mlflow", json={"tracking_uri": mlflow_server["url"]})
        assert refused.status_code == 403 and refused.json()["code"] == "insufficient_scope"
        for bad in ({"tracking_uri": "file:///etc"}, {"tracking_uri": mlflow_server["url"], "username": "u"},
                    {"tracking_uri": mlflow_server["url"], "token": "t", "username": "u", "password": "p"},
                    {"tracking_uri": "http://user:pw@127.0.0.1:1"}):
            resp = hooli.put("/v1/integrations/mlflow", json=bad)
            assert resp.status_code == 422 and resp.json()["code"] == "invalid_request", (bad, resp.text)
        assert hooli.get("/v1/integrations/mlflow").json()["credential"] == "password"

    import psycopg

    with psycopg.connect(stack["database_url"].replace("+psycopg", "")) as conn:
        row = conn.execute("SELECT m.* FROM mlflow_settings m JOIN tenants t ON t.id = m.tenant_id "
                           "WHERE t.name = 'hooli'").fetchone()
    assert row is not None and ADMIN_PASSWORD not in " ".join(str(v) for v in row)
    encrypted = row[4]
    assert Fernet(stack["secret_key"].encode()).decrypt(encrypted.encode()).decode() == ADMIN_PASSWORD

    with http(stack, "hooli") as hooli:
        assert hooli.delete("/v1/integrations/mlflow").status_code == 204
        assert hooli.get("/v1/integrations/mlflow").status_code == 404
        assert hooli.delete("/v1/integrations/mlflow").json()["code"] == "mlflow_not_configured"


def test_private_tracking_server_refused_by_default(client, alice):
    """Without MODELPRESS_MLFLOW_ALLOW_PRIVATE, a tracking URI on loopback or a private address is refused (SSRF)."""
    for url in ("http://127.0.0.1:5000", "http://10.0.0.8", "http://[::1]:80", "http://169.254.169.254"):
        resp = client.put("/v1/integrations/mlflow", json={"tracking_uri": url}, headers=alice)
        assert resp.status_code == 422 and resp.json()["code"] == "mlflow_uri_forbidden", resp.text
        assert "MODELPRESS_MLFLOW_ALLOW_PRIVATE" in resp.json()["detail"]
    # A host that does not resolve is the request's fault when the settings are saved (422, never a 5xx).
    resp = client.put("/v1/integrations/mlflow", json={"tracking_uri": "http://no-such-host.invalid"}, headers=alice)
    assert resp.status_code == 422 and resp.json()["code"] == "mlflow_uri_unresolvable", resp.text
    assert client.get("/v1/integrations/mlflow", headers=alice).status_code == 404


# --- a job logs its run --------------------------------------------------------------------------------------

def test_job_logs_run_registers_model_and_reports_failures(stack, mlflow_server, mlflow_client):
    model_bytes = mlp_onnx_bytes()
    jobs = {}
    with ExitStack() as clients:
        acme, globex, initech, hooli = (clients.enter_context(http(stack, t)) for t in TENANTS)
        set_mlflow(acme, mlflow_server["url"], registered_model_prefix="acme-")
        set_mlflow(globex, mlflow_server["url"], password="not-the-password")
        set_mlflow(initech, closed_port_url())
        for name, tenant in (("acme", acme), ("globex", globex), ("initech", initech), ("hooli", hooli)):
            up = tenant.post("/v1/models", files={"file": ("mlp.onnx", model_bytes)})
            assert up.status_code == 201, up.text
            spec = {"model_id": up.json()["id"], "steps": [{"method": "quantize.int8_dynamic", "params": {}}],
                    "evaluate": FAST_EVALUATE, "mlflow": {"experiment": "modelpress-tests", "register_as": "mlp"}}
            created = tenant.post("/v1/jobs", json=spec)
            if name == "hooli":  # no MLflow settings: refused at submit, nothing created
                assert created.status_code == 422 and created.json()["code"] == "mlflow_not_configured", created.text
                assert created.json()["field"] == "mlflow"
                assert tenant.get("/v1/jobs").json()["items"] == []
                continue
            assert created.status_code == 202, created.text
            jobs[name] = (tenant, created.json()["id"], up.json())
        done = {name: wait_for_job(tenant, job_id) for name, (tenant, job_id, _) in jobs.items()}
        reports = {name: jobs[name][0].get(f"/v1/jobs/{done[name]['id']}/report").json() for name in jobs}
        result_sha = {name: next(a["sha256"] for a in jobs[name][0].get(f"/v1/jobs/{done[name]['id']}/artifacts")
                                 .json() if a["name"] == "model.onnx") for name in jobs}

    # Logged and registered: the run's params, metrics and report, the model version's tags.
    job, report, source = done["acme"], reports["acme"], jobs["acme"][2]
    assert job["status"] == "succeeded", job
    logged = report["mlflow"]
    assert logged["status"] == "logged", logged
    assert logged["registered_model"]["name"] == "acme-mlp" and logged["registered_model"]["version"] == "1"
    assert any("registered as acme-mlp version 1" in note for note in job["summary"]["notes"])
    version = mlflow_client.get_model_version("acme-mlp", "1")
    assert version.tags["modelpress.job_id"] == job["id"]
    assert version.tags["modelpress.source_model_id"] == source["id"]
    assert version.tags["modelpress.source_model_sha256"] == source["sha256"]
    assert version.tags["modelpress.model_sha256"] == result_sha["acme"]
    run = mlflow_client.get_run(logged["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == f"modelpress-{job['id']}"
    assert run.data.params["step1.method"] == "quantize.int8_dynamic" and run.data.params["step1.version"]
    assert run.data.params["source_model.sha256"] == source["sha256"]
    summary = job["summary"]
    assert run.data.metrics["size.compressed_bytes"] == summary["compressed_size_bytes"]
    assert run.data.metrics["speedup.batch_1"] == pytest.approx(summary["speedup"]["1"])
    assert run.data.metrics["speedup_low.batch_1"] <= run.data.metrics["speedup_high.batch_1"]
    for percentile in ("p50", "p95", "p99"):
        assert run.data.metrics[f"latency_{percentile}_ms.compressed.batch_1"] > 0
    assert "fidelity.cosine_similarity" in run.data.metrics
    artifacts = [a.path for a in mlflow_client.list_artifacts(run.info.run_id, "modelpress")]
    assert artifacts == ["modelpress/mlflow-report.json"]
    # The registered version is the ONNX flavour of the job's model: pulled back, it is the same bytes.
    with http(stack, "acme") as acme:
        pulled = acme.post("/v1/models", json={"mlflow_uri": "models:/acme-mlp/1"})
        assert pulled.status_code == 201, pulled.text
        assert pulled.json()["sha256"] == result_sha["acme"]
        assert pulled.json()["inspection"]["mlflow"]["registered_model"] == "acme-mlp"

    # Unauthorized and unreachable: the job succeeded (its model is there), the report and message say why not.
    for name, code in (("globex", "mlflow_unauthorized"), ("initech", "mlflow_unreachable")):
        job, outcome = done[name], reports[name]["mlflow"]
        assert job["status"] == "succeeded" and job["error"] is None, job
        assert outcome["status"] == "failed" and outcome["code"] == code, outcome
        assert code in job["message"] and "not logged" in job["message"]
        assert ADMIN_PASSWORD not in outcome["message"] and "not-the-password" not in outcome["message"]
        assert result_sha[name]  # the compressed model stays downloadable
    assert "mlp" not in {m.name for m in mlflow_client.search_registered_models()}


# --- a model pulled from the registry --------------------------------------------------------------------------

def test_pull_onnx_models_and_refusals(stack, mlflow_server, mlflow_client, tmp_path):
    import mlflow
    import mlflow.onnx
    import mlflow.sklearn
    import onnx
    from sklearn.linear_model import LogisticRegression

    proto = onnx.load_from_string(mlp_onnx_bytes(seed=3))
    requirements = ["onnx", "onnxruntime"]
    with mlflow.start_run() as run:
        single = mlflow.onnx.log_model(proto, name="net", registered_model_name="pulled-net",
                                       save_as_external_data=False, pip_requirements=requirements)
        external = mlflow.onnx.log_model(proto, name="net-external", pip_requirements=requirements)
        features, labels = np.random.default_rng(0).normal(size=(20, 4)), np.arange(20) % 2
        mlflow.sklearn.log_model(LogisticRegression().fit(features, labels), name="sk",
                                 registered_model_name="pulled-sklearn", pip_requirements=["scikit-learn"])
    mlflow_client.set_registered_model_alias("pulled-net", "champion", "1")
    # The bytes of the model.onnx MLflow stored, read back with MLflow's own client.
    stored = mlflow.artifacts.download_artifacts("models:/pulled-net/1", dst_path=str(tmp_path / "stored"))
    expected = hashlib.sha256((tmp_path / "stored" / "model.onnx").read_bytes()).hexdigest()
    assert stored and single.model_id

    with http(stack, "hooli") as tenant:
        no_settings = tenant.post("/v1/models", json={"mlflow_uri": "models:/pulled-net/1"})
        set_mlflow(tenant, mlflow_server["url"])
        for uri in ("models:/pulled-net/1", "models:/pulled-net@champion", f"runs:/{run.info.run_id}/net"):
            resp = tenant.post("/v1/models", json={"mlflow_uri": uri})
            assert resp.status_code == 201, (uri, resp.text)
            model = resp.json()
            assert model["sha256"] == expected and model["format"] == "onnx", uri
            assert model["inspection"]["mlflow"]["uri"] == uri
        assert model["name"] == f"net-{run.info.run_id[:8]}.onnx"
        download = tenant.get(f"/v1/models/{model['id']}/download")
        assert hashlib.sha256(download.content).hexdigest() == expected
        # Saved with external data (log_model's default): pulled as the .zip of the model and its data file.
        assert external.model_id
        zipped = tenant.post("/v1/models", json={"mlflow_uri": f"runs:/{run.info.run_id}/net-external",
                                                  "name": "with-data.zip"})
        assert zipped.status_code == 201 and zipped.json()["format"] == "onnx-zip", zipped.text
        kept_models, kept_blobs = tenant.get("/v1/models").json()["items"], blobs(stack)

        refusals = [
            ({"mlflow_uri": "models:/pulled-sklearn/1"}, 422, "mlflow_not_onnx"),
            ({"mlflow_uri": "models:/no-such-model/1"}, 404, "mlflow_model_not_found"),
            ({"mlflow_uri": "models:/pulled-net/7"}, 404, "mlflow_model_not_found"),
            ({"mlflow_uri": "s3://bucket/model.onnx"}, 422, "invalid_mlflow_uri"),
            ({"mlflow_uri": f"runs:/{run.info.run_id}/../../etc"}, 422, "invalid_mlflow_uri"),
            ({"mlflow": "models:/pulled-net/1"}, 422, "invalid_request"),
        ]
        for body, status, code in refusals:
            resp = tenant.post("/v1/models", json=body)
            assert (resp.status_code, resp.json()["code"]) == (status, code), (body, resp.text)
        assert "sklearn" in tenant.post("/v1/models", json={"mlflow_uri": "models:/pulled-sklearn/1"}).json()["flavors"]

        set_mlflow(tenant, mlflow_server["url"], password="wrong-password")
        unauthorized = tenant.post("/v1/models", json={"mlflow_uri": "models:/pulled-net/1"})
        set_mlflow(tenant, closed_port_url())
        unreachable = tenant.post("/v1/models", json={"mlflow_uri": "models:/pulled-net/1"})
        assert (unauthorized.status_code, unauthorized.json()["code"]) == (422, "mlflow_unauthorized"), unauthorized.text
        assert (unreachable.status_code, unreachable.json()["code"]) == (502, "mlflow_unreachable"), unreachable.text
        assert "wrong-password" not in unauthorized.text
        # Nothing kept by any refusal: the same models, the same blobs.
        assert tenant.get("/v1/models").json()["items"] == kept_models
        assert blobs(stack) == kept_blobs
    assert (no_settings.status_code, no_settings.json()["code"]) == (422, "mlflow_not_configured")
