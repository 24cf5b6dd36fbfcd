"""Fixtures of the method tests: the digits CNN and its datasets uploaded, and an HTTP client on the
session's `modelpress run` service."""
from __future__ import annotations

import httpx
import pytest

from tests.helpers import digits_classifier
from tests.methods.factories import npz


@pytest.fixture(scope="module")
def cnn():
    return digits_classifier("cnn")


@pytest.fixture
def digits(client, alice, cnn):
    onnx_bytes, x, y = cnn
    model = client.post("/v1/models", files={"file": ("digits-cnn.onnx", onnx_bytes)}, headers=alice).json()

    def upload(name, **arrays):
        resp = client.post("/v1/datasets", files={"file": (name, npz(**arrays))}, headers=alice)
        assert resp.status_code == 201, resp.text
        return resp.json()["id"]

    return {"model": model["id"], "x": x, "y": y, "onnx": onnx_bytes,
            "train": upload("train.npz", images=x[:200], labels=y[:200]),
            "train_unlabelled": upload("train-unlabelled.npz", images=x[:200]),
            "eval": upload("eval.npz", images=x[200:], labels=y[200:])}


@pytest.fixture(scope="session")
def http(service):
    """An HTTP client with the key of the session's `modelpress run` service (SQLite, filesystem broker, a worker
    process), shared by the end-to-end method tests."""
    with httpx.Client(base_url=service["url"], headers={"Authorization": f"Bearer {service['key']}"},
                      timeout=60) as client:
        yield client
