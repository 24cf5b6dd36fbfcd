"""Storage and operations: the S3 artifact store (against a real S3-compatible server, moto's, on
loopback), HTTP Range downloads on both backends, /metrics, and retention."""
from __future__ import annotations

import datetime as dt
import hashlib
import os
import re
import uuid

import pytest
from sqlalchemy import select

from app.db import session_scope
from app.dbmodels import Artifact, Blob, Job, Tenant, utcnow
from app.settings import get_settings
from tests.helpers import REDIS_URL, clear_caches, drop_redis_keys, redis_or_skip, store_files
from tests.stack import free_port

FAST = {"batch_sizes": [1], "warmup": 1, "iterations": 3}


# --- fixtures ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def moto_endpoint():
    """A real S3-compatible HTTP server (moto's server mode) on a free loopback port."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3(moto_endpoint, monkeypatch):
    """Credentials for the loopback server and a fresh bucket; yields (raw boto3 client, bucket)."""
    import boto3

    from app.store import s3_client

    for var in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "modelpress-test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "modelpress-test-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    s3_client.cache_clear()
    raw = boto3.client("s3", endpoint_url=moto_endpoint)
    bucket = f"mp-{uuid.uuid4().hex[:12]}"
    raw.create_bucket(Bucket=bucket)
    yield raw, bucket
    s3_client.cache_clear()


@pytest.fixture
def s3_settings(s3, moto_endpoint, data_dir, monkeypatch):
    """Point the settings at the bucket (prefix mp/test); returns (raw client, bucket)."""
    raw, bucket = s3
    monkeypatch.setenv("MODELPRESS_ARTIFACTS", f"s3://{bucket}/mp/test")
    monkeypatch.setenv("MODELPRESS_S3_ENDPOINT_URL", moto_endpoint)
    monkeypatch.setenv("MODELPRESS_S3_MULTIPART_CHUNKSIZE", str(5 * 1024**2))
    get_settings.cache_clear()
    return raw, bucket


@pytest.fixture(params=["local", "s3"])
def backend(request, data_dir, monkeypatch) -> str:
    """Both artifact store backends: the data folder, and the S3 bucket on loopback."""
    if request.param == "s3":
        request.getfixturevalue("s3_settings")
    return request.param


def objects(raw, bucket: str) -> list[str]:
    return sorted(o["Key"] for o in raw.list_objects_v2(Bucket=bucket).get("Contents", []))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- the S3 store itself ----------------------------------------------------------------------

def test_s3_store_put_read_exists_size_delete_and_verified_local_copy(s3_settings, data_dir, tmp_path):
    from app.store import BlobCorrupt, BlobMissing, S3Store, get_store

    raw, bucket = s3_settings
    store = get_store()
    assert isinstance(store, S3Store)
    data = os.urandom(300_000)
    src = tmp_path / "blob.bin"
    src.write_bytes(data)

    digest, size, created = store.put(src)
    assert (digest, size, created) == (sha(data), len(data), True)
    assert store.put(src, digest) == (digest, len(data), False)  # stored once per content
    assert objects(raw, bucket) == [f"mp/test/blobs/{digest[:2]}/{digest}"]
    assert store.exists(digest) and store.size(digest) == len(data)
    assert b"".join(store.open_range(digest)) == data
    assert b"".join(store.open_range(digest, 1000, 1999)) == data[1000:2000]
    assert b"".join(store.open_range(digest, 299_990)) == data[299_990:]
    # Nothing of the blob itself lives on local disk until a worker asks for a file.
    assert store_files(data_dir) == []
    local = store.local_path(digest)
    assert local.read_bytes() == data and local.is_relative_to(data_dir / "store" / "cache")
    assert store.path(digest) == local  # readers written for the local store get the same file

    store.delete(digest)
    assert not store.exists(digest) and not local.exists()
    assert objects(raw, bucket) == []
    with pytest.raises(BlobMissing):
        store.open_range(digest)
    with pytest.raises(BlobMissing):
        store.local_path(digest)
    with pytest.raises(BlobMissing):
        store.size(digest)

    # Bytes in the bucket that do not hash to their key never reach a worker.
    raw.put_object(Bucket=bucket, Key=store.key(digest), Body=b"tampered")
    with pytest.raises(BlobCorrupt):
        store.local_path(digest)
    assert list((data_dir / "store" / "cache").rglob("*")) == [(data_dir / "store" / "cache" / digest[:2])]


def test_s3_multipart_upload_of_a_large_blob(s3_settings, tmp_path):
    from app.store import get_store

    raw, bucket = s3_settings
    store = get_store()  # 5 MiB parts (S3's minimum): 9 MiB goes up in two parts
    data = os.urandom(9 * 1024**2 + 123)
    src = tmp_path / "big.bin"
    src.write_bytes(data)
    digest, size, created = store.put(src)
    assert created and size == len(data)
    head = raw.head_object(Bucket=bucket, Key=store.key(digest))
    assert head["ETag"].strip('"').endswith("-2"), head["ETag"]  # an S3 multipart object's ETag
    assert head["ContentLength"] == len(data)
    assert head["Metadata"] == {"sha256": digest}
    boundary = 5 * 1024**2
    assert b"".join(store.open_range(digest, boundary - 10, boundary + 10)) == data[boundary - 10:boundary + 11]
    assert sha(store.local_path(digest).read_bytes()) == digest


def test_a_job_runs_and_downloads_on_s3(s3_settings, data_dir, monkeypatch, client, alice, mlp_onnx):
    from workers.supervise import run_job

    raw, bucket = s3_settings
    monkeypatch.setenv("MODELPRESS_MEASURE_ISOLATED", "false")
    get_settings.cache_clear()
    model = client.post("/v1/models", files={"file": ("mlp.onnx", mlp_onnx)}, headers=alice).json()
    assert objects(raw, bucket) == [f"mp/test/blobs/{model['sha256'][:2]}/{model['sha256']}"]
    resp = client.post("/v1/jobs", headers=alice, json={
        "model_id": model["id"], "steps": [{"method": "quantize.int8_dynamic"}], "evaluate": FAST})
    job_id = resp.json()["id"]
    run_job(job_id)  # the worker reads the model from the bucket (a verified cached copy)
    assert client.get(f"/v1/jobs/{job_id}", headers=alice).json()["status"] == "succeeded"

    artifacts = client.get(f"/v1/jobs/{job_id}/artifacts", headers=alice).json()
    assert {a["name"] for a in artifacts} >= {"model.onnx", "report.json"}
    stored = set(objects(raw, bucket))
    for artifact in artifacts:
        assert f"mp/test/blobs/{artifact['sha256'][:2]}/{artifact['sha256']}" in stored
    assert store_files(data_dir) == []  # nothing under the local blobs folder
    assert (data_dir / "store" / "cache" / model["sha256"][:2] / model["sha256"]).read_bytes() == mlp_onnx

    full = client.get(f"/v1/jobs/{job_id}/artifacts/model.onnx", headers=alice)
    assert full.status_code == 200 and full.headers["accept-ranges"] == "bytes"
    assert sha(full.content) == full.headers["x-content-sha256"]
    part = client.get(f"/v1/jobs/{job_id}/artifacts/model.onnx", headers={**alice, "Range": "bytes=-100"})
    assert part.status_code == 206 and part.content == full.content[-100:]
    n = len(full.content)
    assert part.headers["content-range"] == f"bytes {n - 100}-{n - 1}/{n}"


# --- HTTP Range ----------------------------------------------------------------------------------

@pytest.mark.parametrize("header,expected", [
    ("bytes=0-99", (0, 99)), ("bytes=100-", (100, 999)), ("bytes=-50", (950, 999)), ("bytes=-5000", (0, 999)),
    ("bytes=990-5000", (990, 999)), ("bytes=7-7", (7, 7)), ("BYTES = 1 - 2", (1, 2)),
    # Ignored (the whole file): several ranges, bad syntax, another unit.
    ("bytes=0-1,4-5", None), ("bytes=5-2", None), ("items=0-1", None), ("bytes=-", None), ("bytes=a-b", None),
    (None, None),
])
def test_range_header_parsing(header, expected):
    from app.downloads import parse_range

    got = parse_range(header, 1000)
    assert (None if got is None else (got.start, got.end)) == expected


@pytest.mark.parametrize("header,size", [("bytes=1000-", 1000), ("bytes=1000-2000", 1000), ("bytes=-0", 1000),
                                         ("bytes=0-", 0), ("bytes=-1", 0)])
def test_unsatisfiable_ranges(header, size):
    from app.downloads import Unsatisfiable, parse_range

    with pytest.raises(Unsatisfiable):
        parse_range(header, size)


def test_model_download_ranges_on_both_backends(backend, client, alice, mlp_onnx):
    model = client.post("/v1/models", files={"file": ("mlp.onnx", mlp_onnx)}, headers=alice).json()
    url, n = f"/v1/models/{model['id']}/download", len(mlp_onnx)

    full = client.get(url, headers=alice)
    assert full.status_code == 200 and full.content == mlp_onnx
    assert full.headers["accept-ranges"] == "bytes" and int(full.headers["content-length"]) == n
    assert full.headers["x-content-sha256"] == model["sha256"] and full.headers["etag"] == f'"{model["sha256"]}"'
    assert 'filename="mlp.onnx"' in full.headers["content-disposition"]

    for header, start, end in [("bytes=0-99", 0, 99), ("bytes=100-", 100, n - 1), ("bytes=-64", n - 64, n - 1),
                               (f"bytes=10-{n + 500}", 10, n - 1), ("bytes=5-5", 5, 5)]:
        part = client.get(url, headers={**alice, "Range": header})
        assert part.status_code == 206, (header, part.text)
        assert part.content == mlp_onnx[start:end + 1], header
        assert part.headers["content-range"] == f"bytes {start}-{end}/{n}"
        assert int(part.headers["content-length"]) == end - start + 1

    for header in (f"bytes={n}-", f"bytes={n + 10}-{n + 20}", "bytes=-0"):
        bad = client.get(url, headers={**alice, "Range": header})
        assert bad.status_code == 416, header
        assert bad.headers["content-range"] == f"bytes */{n}"
        assert bad.json()["code"] == "range_not_satisfiable"

    # Several ranges, or a range for another version (If-Range): the whole file.
    for headers in ({"Range": "bytes=0-1,5-6"}, {"Range": "bytes=0-9", "If-Range": '"not-this-one"'}):
        whole = client.get(url, headers={**alice, **headers})
        assert whole.status_code == 200 and whole.content == mlp_onnx
    kept = client.get(url, headers={**alice, "Range": "bytes=0-9", "If-Range": f'"{model["sha256"]}"'})
    assert kept.status_code == 206 and kept.content == mlp_onnx[:10]


# --- /metrics ----------------------------------------------------------------------------------

def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """{(sample name, labels): value} of a Prometheus text exposition."""
    found = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = re.match(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)$", line)
        assert match, line
        labels = frozenset(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(2) or ""))
        found[(match.group(1), labels)] = float(match.group(3))
    return found


def value(found: dict, name: str, **labels) -> float | None:
    return found.get((name, frozenset(labels.items())))


def test_metrics_after_uploads_jobs_and_requests(database, client, alice, mlp_onnx):
    model = client.post("/v1/models", files={"file": ("mlp.onnx", mlp_onnx)}, headers=alice).json()
    assert client.post("/v1/models", files={"file": ("junk.onnx", b"not a model")}, headers=alice).status_code == 422
    assert client.get(f"/v1/models/{model['id']}", headers=alice).status_code == 200
    assert client.get("/v1/models/no-such-model", headers=alice).status_code == 404
    spec = {"model_id": model["id"], "steps": [{"method": "quantize.int8_dynamic"}], "evaluate": FAST}
    queued = client.post("/v1/jobs", json=spec, headers=alice).json()["id"]
    two_steps = {**spec, "steps": [{"method": "quantize.int8_dynamic"}, {"method": "quantize.fp16"}]}
    finished = client.post("/v1/jobs", json=two_steps, headers=alice).json()["id"]
    with session_scope() as db:  # as a worker would leave it: ran for 42 s
        job = db.get(Job, finished)
        job.status, job.started_at = "succeeded", utcnow() - dt.timedelta(seconds=50)
        job.finished_at = job.started_at + dt.timedelta(seconds=42)

    resp = client.get("/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    found = samples(resp.text)
    assert value(found, "modelpress_upload_bytes_total", kind="model", outcome="stored") >= len(mlp_onnx)
    assert value(found, "modelpress_upload_bytes_total", kind="model", outcome="rejected") >= len(b"not a model")
    latency = "modelpress_http_request_duration_seconds_count"
    assert value(found, latency, method="POST", route="/v1/models", status="201") == 1
    assert value(found, latency, method="POST", route="/v1/models", status="422") == 1
    assert value(found, latency, method="GET", route="/v1/models/{model_id}", status="200") == 1
    assert value(found, latency, method="GET", route="/v1/models/{model_id}", status="404") == 1
    assert value(found, latency, method="POST", route="/v1/jobs", status="202") == 2
    assert model["id"] not in resp.text and "no-such-model" not in resp.text  # templates, never raw paths

    assert value(found, "modelpress_jobs", status="queued") == 1
    assert value(found, "modelpress_jobs", status="succeeded") == 1
    assert value(found, "modelpress_jobs", status="failed") == 0
    assert value(found, "modelpress_jobs_by_method", status="queued", method="quantize.int8_dynamic") == 1
    assert value(found, "modelpress_jobs_by_method", status="succeeded", method="quantize.int8_dynamic") == 1
    assert value(found, "modelpress_jobs_by_method", status="succeeded", method="quantize.fp16") == 1
    bucket = "modelpress_job_duration_seconds_bucket"
    assert value(found, bucket, status="succeeded", le="30.0") == 0
    assert value(found, bucket, status="succeeded", le="60.0") == 1
    assert value(found, bucket, status="succeeded", le="+Inf") == 1
    assert value(found, "modelpress_job_duration_seconds_gsum", status="succeeded") == pytest.approx(42)
    # Both submissions wait in the embedded broker's queue folder (nothing consumed them).
    assert value(found, "modelpress_queue_depth", queue="cpu") == 2
    assert value(found, "modelpress_queue_depth", queue="gpu") == 0
    assert value(found, "modelpress_broker_up") == 1 and value(found, "modelpress_database_up") == 1
    assert queued  # (the queued job is the one counted under status="queued")

    again = samples(client.get("/metrics").text)
    assert value(again, latency, method="GET", route="/metrics", status="200") == 1


def test_metrics_token_and_switch(data_dir, monkeypatch):
    from fastapi.testclient import TestClient

    from app.main import create_app

    monkeypatch.setenv("MODELPRESS_METRICS_TOKEN", "scrape-secret")
    get_settings.cache_clear()
    with TestClient(create_app()) as client, TestClient(create_app()) as second:  # one registry per app
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
        ok = client.get("/metrics", headers={"Authorization": "Bearer scrape-secret"})
        assert ok.status_code == 200 and "modelpress_jobs" in ok.text
        assert second.get("/metrics", headers={"Authorization": "Bearer scrape-secret"}).status_code == 200
    monkeypatch.setenv("MODELPRESS_METRICS_ENABLED", "false")
    get_settings.cache_clear()
    with TestClient(create_app()) as client:
        assert client.get("/metrics").status_code == 404
        assert client.get("/healthz").status_code == 200


def test_queue_depth_reads_redis_lists_every_priority(data_dir, monkeypatch):
    redis_or_skip()
    import redis

    from app.metrics import queue_depths
    from app.queue import get_celery

    prefix = f"mptest-{uuid.uuid4().hex[:8]}-"
    monkeypatch.setenv("MODELPRESS_BROKER_URL", REDIS_URL)
    monkeypatch.setenv("MODELPRESS_QUEUE_PREFIX", prefix)
    clear_caches()
    settings = get_settings()
    try:
        celery = get_celery()
        for _ in range(3):
            celery.send_task("modelpress.run_job", args=["x"], queue=settings.queue_name("cpu"))
        celery.send_task("modelpress.run_job", args=["y"], queue=settings.queue_name("cpu"), priority=9)
        celery.send_task("modelpress.run_job", args=["z"], queue=settings.queue_name("gpu"))
        assert queue_depths(settings) == {"cpu": 4, "gpu": 1}
    finally:
        client = redis.Redis.from_url(REDIS_URL)
        drop_redis_keys(client, prefix)  # only this test's queues


# --- retention ---------------------------------------------------------------------------------

def fabricate_job(*, tenant_id: str, model_id: str, finished_at: dt.datetime, files: dict[str, bytes]) -> str:
    """A finished job with stored artifacts, as a worker would have left it."""
    from app.store import get_store

    store = get_store()
    with session_scope() as db:
        job = Job(tenant_id=tenant_id, model_id=model_id, queue="cpu", status="succeeded", progress=1.0,
                  spec={"steps": [{"method": "quantize.int8_dynamic", "params": {}}], "evaluate": FAST},
                  created_at=finished_at - dt.timedelta(minutes=5), started_at=finished_at - dt.timedelta(minutes=4),
                  finished_at=finished_at, report={"summary": {}})
        db.add(job)
        db.flush()
        with store.workdir() as work:
            for name, data in files.items():
                path = work / name
                path.write_bytes(data)
                digest, size, _ = store.put(path, keep_source=True)
                if db.get(Blob, digest) is None:
                    db.add(Blob(sha256=digest, size_bytes=size))
                    db.flush()
                db.add(Artifact(job_id=job.id, name=name, kind="model", sha256=digest, size_bytes=size,
                                content_type="application/octet-stream"))
        return job.id


def test_retention_expires_old_artifacts_and_keeps_shared_blobs(backend, client, alice, mlp_onnx, monkeypatch):
    from app.retention import run_retention
    from app.store import get_store

    model = client.post("/v1/models", files={"file": ("mlp.onnx", mlp_onnx)}, headers=alice).json()
    with session_scope() as db:
        tenant_id = db.scalar(select(Tenant.id).where(Tenant.name == "alice"))
    own, shared = os.urandom(5000), os.urandom(3000)
    now = utcnow()
    old = fabricate_job(tenant_id=tenant_id, model_id=model["id"], finished_at=now - dt.timedelta(days=40),
                        files={"model.onnx": own, "report.json": shared, "original.onnx": mlp_onnx})
    new = fabricate_job(tenant_id=tenant_id, model_id=model["id"], finished_at=now - dt.timedelta(days=1),
                        files={"model.onnx": shared})
    url = f"/v1/jobs/{old}/artifacts/model.onnx"
    part = client.get(url, headers={**alice, "Range": "bytes=10-19"})
    assert part.status_code == 206 and part.content == own[10:20]  # the artifact route serves ranges too

    assert run_retention() == 0  # retention_days = 0: keep forever
    monkeypatch.setenv("MODELPRESS_RETENTION_DAYS", "30")
    get_settings.cache_clear()
    from workers.tasks import expire_artifacts  # the task Celery beat sends

    assert expire_artifacts.apply().get() == 1
    assert run_retention() == 0  # idempotent

    store = get_store()
    assert not store.exists(sha(own))  # only the old job pointed at it
    assert store.exists(sha(shared))  # the newer job still points at it
    assert store.exists(model["sha256"])  # an uploaded model's blob is never an expired artifact's alone
    with session_scope() as db:
        assert db.get(Blob, sha(own)) is None and db.get(Blob, sha(shared)) is not None
        assert db.get(Job, old) is not None  # the row stays
    if backend == "local":
        assert sha(own) not in {p.name for p in store_files(get_settings().data_path)}

    job = client.get(f"/v1/jobs/{old}", headers=alice).json()
    assert job["status"] == "succeeded" and job["expired_at"] is not None
    for name in ("model.onnx", "report.json"):
        gone = client.get(f"/v1/jobs/{old}/artifacts/{name}", headers=alice)
        assert gone.status_code == 410 and gone.json()["code"] == "artifact_expired"
    assert client.get(f"/v1/jobs/{old}/report", headers=alice).status_code == 200  # the report stays in the row

    assert client.get(f"/v1/jobs/{new}", headers=alice).json()["expired_at"] is None
    kept = client.get(f"/v1/jobs/{new}/artifacts/model.onnx", headers=alice)
    assert kept.status_code == 200 and kept.content == shared
    assert client.get(f"/v1/models/{model['id']}/download", headers=alice).content == mlp_onnx


def test_retention_is_scheduled_by_celery_beat(data_dir, monkeypatch):
    from app.retention import EXPIRE_ARTIFACTS_TASK, beat_schedule
    from workers.celery_app import celery

    assert EXPIRE_ARTIFACTS_TASK in celery.tasks
    assert beat_schedule(get_settings()) == {}  # off by default
    monkeypatch.setenv("MODELPRESS_RETENTION_DAYS", "7")
    monkeypatch.setenv("MODELPRESS_RETENTION_INTERVAL_S", "600")
    get_settings.cache_clear()
    entry = beat_schedule(get_settings())["expire-artifacts"]
    assert entry["task"] == EXPIRE_ARTIFACTS_TASK and entry["schedule"] == 600
    assert entry["options"]["queue"] == "cpu"
