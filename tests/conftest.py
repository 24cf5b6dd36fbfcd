"""Shared fixtures: an isolated embedded deployment per test (SQLite + filesystem broker + store)."""
from __future__ import annotations

import base64
import contextlib
import datetime as dt
import functools
import io
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_MODELS = ROOT.parent / "shared" / "models"
IN_CI = os.environ.get("CI", "").lower() == "true"


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    # item.rep_call: fixtures that print their processes' logs when the test itself failed.
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


def clear_caches() -> None:
    from app.db import get_engine, get_read_sessionmaker, get_sessionmaker
    from app.queue import get_celery
    from app.settings import get_settings

    if get_engine.cache_info().currsize:
        get_engine().dispose()
    for cached in (get_settings, get_engine, get_sessionmaker, get_read_sessionmaker, get_celery):
        cached.cache_clear()
    from app.readcache import get_cache

    get_cache().reset(enabled=False)


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Point every setting at a fresh data folder and migrate its database."""
    folder = tmp_path / "data"
    monkeypatch.setenv("MODELPRESS_DATA_DIR", str(folder))
    for var in ("MODELPRESS_DATABASE_URL", "MODELPRESS_BROKER_URL", "MODELPRESS_MODE", "MODELPRESS_QUEUE_PREFIX"):
        monkeypatch.delenv(var, raising=False)
    clear_caches()
    from app.migrate import upgrade

    folder.mkdir()
    upgrade()
    yield folder
    clear_caches()


@pytest.fixture
def client(data_dir: Path):
    from fastapi.testclient import TestClient

    from app.main import create_app

    with TestClient(create_app()) as test_client:
        yield test_client


def make_key(tenant: str, scopes: Iterable[str] | None = None, expires_at: dt.datetime | None = None) -> str:
    """A new key of `tenant` (created if new), as the CLI makes one; returns its plaintext. Without scopes: all."""
    from app.auth.service import ALL_SCOPES, create_key
    from app.db import session_scope

    with session_scope() as db:
        _, plaintext = create_key(db=db, tenant_name=tenant, scopes=ALL_SCOPES if scopes is None else scopes,
                                  expires_at=expires_at)
    return plaintext


@pytest.fixture
def alice(client) -> dict[str, str]:
    return {"Authorization": f"Bearer {make_key('alice')}"}


@pytest.fixture
def bob(client) -> dict[str, str]:
    return {"Authorization": f"Bearer {make_key('bob')}"}


@functools.lru_cache(maxsize=8)
def mlp_onnx_bytes(in_features: int = 64, hidden: int = 256, classes: int = 10, seed: int = 0) -> bytes:
    """A small MLP classifier with a dynamic batch axis, exported by torch as a user would."""
    import torch

    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(in_features, hidden), torch.nn.ReLU(),
        torch.nn.Linear(hidden, hidden), torch.nn.ReLU(),
        torch.nn.Linear(hidden, classes),
    ).eval()
    buf = io.BytesIO()
    torch.onnx.export(
        model, (torch.randn(2, in_features),), buf, dynamo=False, opset_version=17,
        input_names=["features"], output_names=["logits"], dynamic_axes={"features": {0: "batch"}, "logits": {0: "batch"}},
    )
    return buf.getvalue()


@pytest.fixture(scope="session")
def mlp_onnx() -> bytes:
    return mlp_onnx_bytes()


def onnx_bytes(nodes, inputs, outputs, initializers=(), domains=()) -> bytes:
    """A model of these nodes (opset 17, plus version 1 of each of `domains`), serialized."""
    from onnx import helper

    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    opsets = [helper.make_opsetid("", 17)] + [helper.make_opsetid(d, 1) for d in domains]
    return helper.make_model(graph, opset_imports=opsets).SerializeToString()


def memory_hog_onnx(side: int = 20000) -> bytes:
    """y = x @ W + sum(ones(side, side)): a valid, small file whose run needs side^2 * 4 bytes (1.6 GB)."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["xw"]),
        helper.make_node("ConstantOfShape", ["shape"], ["big"],
                         value=helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])),
        helper.make_node("ReduceSum", ["big"], ["total"], keepdims=0),
        helper.make_node("Add", ["xw", "total"], ["y"]),
    ]
    inits = [numpy_helper.from_array(np.ones((4, 4), np.float32), "W"),
             numpy_helper.from_array(np.array([side, side], np.int64), "shape")]
    return onnx_bytes(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])], inits)


def shared_model(relative: str) -> Path:
    path = SHARED_MODELS / relative
    if not path.is_file():
        pytest.skip(f"{path} is absent (the real pretrained models live in ../shared/models)")
    return path


def store_files(data_dir: Path) -> list[Path]:
    blobs = data_dir / "store" / "blobs"
    return sorted(p for p in blobs.rglob("*") if p.is_file()) if blobs.exists() else []


def queued_messages(data_dir: Path) -> list[dict]:
    """Messages in the embedded filesystem broker: each carries only the job id."""
    folder = data_dir / "broker" / "queue"
    bodies = []
    for path in sorted(folder.glob("*.msg")):
        message = json.loads(path.read_text())
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body).decode()
        bodies.append({"task": message["headers"]["task"], "args": json.loads(body)[0]})
    return bodies


def npz_bytes(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # np.savez pickles object arrays: the bad-input tests rely on that
    return buf.getvalue()


def tmp_leftovers(data_dir: Path) -> list[Path]:
    tmp = data_dir / "store" / "tmp"
    return sorted(tmp.iterdir()) if tmp.exists() else []


def row_count(table) -> int:
    from sqlalchemy import func, select

    from app.db import session_scope

    with session_scope() as db:
        return db.scalar(select(func.count()).select_from(table))


@functools.lru_cache(maxsize=2)
def digits_classifier(kind: str = "mlp") -> tuple[bytes, np.ndarray, np.ndarray]:
    """A classifier trained here on scikit-learn's load_digits (real handwritten digits), exported to ONNX.

    Returns (onnx bytes, held-out inputs, held-out labels). kind "mlp" takes features [N, 64];
    kind "cnn" takes images [N, 1, 8, 8]. Inputs are pixel values / 16, float32.
    """
    import torch
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(x))
    train, test = order[:1400], order[1400:]
    torch.manual_seed(0)
    if kind == "mlp":
        model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
        shape, name = (-1, 64), "features"
    else:
        model = torch.nn.Sequential(
            torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Flatten(), torch.nn.Linear(32 * 4 * 4, 10),
        )
        shape, name = (-1, 1, 8, 8), "images"
    xt, yt = torch.from_numpy(x[train]).reshape(shape), torch.from_numpy(y[train])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _epoch in range(25):
        for batch in torch.randperm(len(xt)).split(64):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(xt[batch]), yt[batch]).backward()
            optimizer.step()
    model.eval()
    buf = io.BytesIO()
    torch.onnx.export(model, (xt[:2],), buf, dynamo=False, opset_version=17, input_names=[name],
                      output_names=["logits"], dynamic_axes={name: {0: "batch"}, "logits": {0: "batch"}})
    return buf.getvalue(), x[test].reshape(shape), y[test]


PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/test"


def _postgres_error() -> Exception | None:
    try:
        import psycopg

        psycopg.connect(PG_ADMIN_URL, connect_timeout=3).close()
    except Exception as exc:
        return exc
    return None


def postgres_reachable() -> bool:
    """Whether the machine's PostgreSQL answers."""
    return _postgres_error() is None


def postgres_or_skip() -> None:
    """The machine's PostgreSQL answers, or the test skips (fails under CI=true, where it must run)."""
    exc = _postgres_error()
    if exc is not None:
        if IN_CI:
            pytest.fail(f"PostgreSQL at 127.0.0.1:5432 unreachable: {exc} (CI=true: integration tests must run)")
        pytest.skip(f"PostgreSQL at 127.0.0.1:5432 unreachable: {exc}")


@contextlib.contextmanager
def fresh_postgres_database() -> Iterator[str]:
    """A new, empty database on the machine's PostgreSQL (its SQLAlchemy URL), dropped afterwards."""
    postgres_or_skip()
    import uuid

    import psycopg

    name = f"mp_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def postgres_database() -> Iterator[str]:
    """For tests that start processes: the URL of a fresh database (they migrate it themselves)."""
    with fresh_postgres_database() as url:
        yield url


def use_database(kind: str, monkeypatch):
    """Generator for a fixture: the data folder's SQLite ("sqlite"), or a fresh PostgreSQL database,
    migrated to head and dropped afterwards ("postgresql"). Yields the kind."""
    if kind == "sqlite":
        yield "sqlite"
        return
    from app.migrate import upgrade

    with fresh_postgres_database() as url:
        monkeypatch.setenv("MODELPRESS_DATABASE_URL", url)
        clear_caches()
        upgrade()
        yield "postgresql"
        clear_caches()


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request, data_dir, monkeypatch):
    """The test runs twice: on the data folder's SQLite and on a fresh PostgreSQL database."""
    yield from use_database(request.param, monkeypatch)


REDIS_URL = "redis://127.0.0.1:6379/0"


def redis_or_skip() -> None:
    """The machine's Redis answers, or the test skips (fails under CI=true, where it must run)."""
    try:
        import redis

        redis.Redis.from_url(REDIS_URL, socket_timeout=3).ping()
    except Exception as exc:
        if IN_CI:
            pytest.fail(f"Redis at 127.0.0.1:6379 unreachable: {exc} (CI=true: integration tests must run)")
        pytest.skip(f"Redis at 127.0.0.1:6379 unreachable: {exc}")


@pytest.fixture
def redis_prefix(monkeypatch) -> Iterator[str]:
    """Point the broker at the machine's Redis under a key prefix of this test's own; its keys go afterwards
    (the machine's Redis is never flushed)."""
    import uuid

    import redis

    redis_or_skip()
    prefix = f"mptest-{uuid.uuid4().hex[:8]}-"
    monkeypatch.setenv("MODELPRESS_BROKER_URL", REDIS_URL)
    monkeypatch.setenv("MODELPRESS_QUEUE_PREFIX", prefix)
    clear_caches()
    yield prefix
    clear_caches()
    client = redis.Redis.from_url(REDIS_URL)
    for key in client.scan_iter(match=f"{prefix}*"):
        client.delete(key)
