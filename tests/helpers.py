"""Plain helpers every part of the suite uses (no fixtures: those live in the conftest.py files).

Test modules import from here, never from another test module or a conftest.py. Model builders that the
benchmarks share live in bench/common.py (bench imports nothing of tests/)."""
from __future__ import annotations

import base64
import contextlib
import datetime as dt
import io
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pytest

from bench.common import digits_classifier, mlp_onnx_bytes  # noqa: F401 - re-exported for the tests

ROOT = Path(__file__).resolve().parents[1]
SHARED_MODELS = ROOT.parent / "shared" / "models"
IN_CI = os.environ.get("CI", "").lower() == "true"


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


def make_key(tenant: str, scopes: Iterable[str] | None = None, expires_at: dt.datetime | None = None) -> str:
    """A new key of `tenant` (created if new), as the CLI makes one; returns its plaintext. Without scopes: all."""
    from app.auth.service import ALL_SCOPES, create_key
    from app.db import session_scope

    with session_scope() as db:
        _, plaintext = create_key(db=db, tenant_name=tenant, scopes=ALL_SCOPES if scopes is None else scopes,
                                  expires_at=expires_at)
    return plaintext


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


def digits_cnn_file(folder: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    """The digits CNN written to folder/digits-cnn.onnx, with its 397 held-out images and labels: the target
    tests (OpenVINO, LiteRT) hand exporters a file, as the worker does, and upload the same bytes end to end."""
    onnx_model, x, y = digits_classifier("cnn")
    path = folder / "digits-cnn.onnx"
    path.write_bytes(onnx_model)
    return path, x, y


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


def _admin(sql: str) -> None:
    import psycopg

    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(sql)


_template: list[str] = []  # the session's migrated template database, once made


def _migrated_template(monkeypatch) -> str:
    """A database Alembic migrated to head, made once per session: each `use_database("postgresql")` copies it
    with CREATE DATABASE ... TEMPLATE (a file copy, much faster than running every migration per test)."""
    if not _template:
        import uuid

        from app.migrate import upgrade

        name = f"mp_template_{uuid.uuid4().hex[:10]}"
        _admin(f'CREATE DATABASE "{name}"')
        _template.append(name)
        with monkeypatch.context() as patch:
            patch.setenv("MODELPRESS_DATABASE_URL", f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}")
            clear_caches()
            upgrade()
            clear_caches()  # no connection may stay open on a template
    return _template[0]


def drop_postgres_template() -> None:
    while _template:
        _admin(f'DROP DATABASE IF EXISTS "{_template.pop()}" WITH (FORCE)')


@contextlib.contextmanager
def fresh_postgres_database(template: str | None = None) -> Iterator[str]:
    """A new database on the machine's PostgreSQL (its SQLAlchemy URL), empty or a copy of `template`,
    dropped afterwards."""
    postgres_or_skip()
    import uuid

    name = f"mp_test_{uuid.uuid4().hex[:10]}"
    _admin(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def use_database(kind: str, monkeypatch):
    """Generator for a fixture: the data folder's SQLite ("sqlite"), or a fresh PostgreSQL database at the
    migrations' head (a copy of the session's migrated template), dropped afterwards ("postgresql").
    Yields the kind."""
    if kind == "sqlite":
        yield "sqlite"
        return
    postgres_or_skip()
    with fresh_postgres_database(template=_migrated_template(monkeypatch)) as url:
        monkeypatch.setenv("MODELPRESS_DATABASE_URL", url)
        clear_caches()
        yield "postgresql"
        clear_caches()


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


CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def need(condition: bool, reason: str) -> None:
    if not condition:
        if IN_CI:
            pytest.fail(f"{reason} (CI=true: the browser tests must run)")
        pytest.skip(reason)


def drop_redis_keys(client, prefix: str) -> None:
    """A test's keys in the machine's Redis: its queues and results (`<prefix>*`) and kombu's exchange bindings
    for its queues (`_kombu.binding.<prefix>*`, `_kombu.binding_permanent.<prefix>*`), nothing of anyone else's."""
    for pattern in (f"{prefix}*", f"_kombu.binding.{prefix}*", f"_kombu.binding_permanent.{prefix}*"):
        for key in client.scan_iter(match=pattern):
            client.delete(key)
