"""GET /v1/datasets/{id}/download on an S3 deployment (issue 17): it used to call store.path(), which S3Store
lacks; it now streams the object with ranges like the model download. Against moto's real S3 HTTP server."""
from __future__ import annotations

import hashlib
import uuid

import numpy as np
import pytest

from app.settings import get_settings
from tests.helpers import npz_bytes
from tests.stack import free_port


@pytest.fixture
def s3_deployment(data_dir, monkeypatch):
    """Artifacts in a fresh bucket of a loopback moto server; yields (raw boto3 client, bucket, prefix)."""
    import boto3
    from moto.server import ThreadedMotoServer

    from app.store import s3_client

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    for var in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    for var, value in (("AWS_ACCESS_KEY_ID", "modelpress-test"), ("AWS_SECRET_ACCESS_KEY", "modelpress-test-secret"),
                       ("AWS_DEFAULT_REGION", "us-east-1"), ("NO_PROXY", "127.0.0.1,localhost"),
                       ("MODELPRESS_S3_ENDPOINT_URL", endpoint)):
        monkeypatch.setenv(var, value)
    bucket = f"mp-{uuid.uuid4().hex[:12]}"
    monkeypatch.setenv("MODELPRESS_ARTIFACTS", f"s3://{bucket}/mp/test")
    s3_client.cache_clear()
    get_settings.cache_clear()
    raw = boto3.client("s3", endpoint_url=endpoint)
    raw.create_bucket(Bucket=bucket)
    try:
        yield raw, bucket
    finally:
        s3_client.cache_clear()
        get_settings.cache_clear()
        server.stop()


def keys(raw, bucket: str) -> list[str]:
    return sorted(o["Key"] for o in raw.list_objects_v2(Bucket=bucket).get("Contents", []))


def test_dataset_download_streams_from_s3_with_ranges(s3_deployment, client, alice, bob):
    from app.store import S3Store, get_store

    raw, bucket = s3_deployment
    store = get_store()
    assert isinstance(store, S3Store)
    payload = npz_bytes(features=np.arange(600, dtype=np.float32).reshape(20, 30),
                        labels=np.arange(20, dtype=np.int64) % 10)
    sha = hashlib.sha256(payload).hexdigest()
    created = client.post("/v1/datasets", files={"file": ("calib.npz", payload)}, data={"name": "calib"},
                          headers=alice)
    assert created.status_code == 201, created.text
    dataset_id, n = created.json()["id"], len(payload)
    assert any(key.endswith(sha) for key in keys(raw, bucket))  # the blob lives in the bucket
    url = f"/v1/datasets/{dataset_id}/download"

    whole = client.get(url, headers=alice)
    assert whole.status_code == 200, whole.text
    assert whole.content == payload
    assert whole.headers["x-content-sha256"] == sha and whole.headers["etag"] == f'"{sha}"'
    assert whole.headers["accept-ranges"] == "bytes" and int(whole.headers["content-length"]) == n
    assert 'filename="calib.npz"' in whole.headers["content-disposition"]
    # streamed from the bucket, not copied into the API's download cache first
    assert not store._cached(sha).exists()

    part = client.get(url, headers={**alice, "Range": "bytes=10-99"})
    assert part.status_code == 206 and part.content == payload[10:100]
    assert part.headers["content-range"] == f"bytes 10-99/{n}"
    past = client.get(url, headers={**alice, "Range": f"bytes={n}-"})
    assert past.status_code == 416 and past.json()["code"] == "range_not_satisfiable"

    # another tenant sees nothing; deleting the dataset leaves no object behind
    assert client.get(url, headers=bob).json()["code"] == "dataset_not_found"
    assert client.delete(f"/v1/datasets/{dataset_id}", headers=alice).status_code == 204
    assert client.get(url, headers=alice).status_code == 404
    assert keys(raw, bucket) == []
