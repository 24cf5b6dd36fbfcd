"""Fixtures every part needs: an isolated embedded deployment per test (SQLite + filesystem broker + store),
keys, databases, Redis prefixes, and the one `modelpress run` service shared by the whole session.
Plain helpers live in tests/helpers.py; each part's own fixtures in its folder's conftest.py."""
from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import (
    CHROMIUM,
    CHROMIUM_ARGS,
    REDIS_URL,
    clear_caches,
    drop_postgres_template,
    drop_redis_keys,
    fresh_postgres_database,
    make_key,
    mlp_onnx_bytes,
    need,
    redis_or_skip,
    use_database,
)
from tests.stack import BIN, base_env, free_port, logs, processes, wait_ready


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    # item.rep_call: fixtures that print their processes' logs when the test itself failed.
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


ENV_KEPT_OUT = ("MODELPRESS_DATABASE_URL", "MODELPRESS_BROKER_URL", "MODELPRESS_MODE", "MODELPRESS_QUEUE_PREFIX")


@pytest.fixture(scope="session")
def migrated_sqlite(tmp_path_factory) -> Path:
    """A data folder whose SQLite database Alembic migrated to head, once per session: each test's `data_dir`
    starts from a copy of its files (copying is much faster than running every migration per test)."""
    from app.migrate import upgrade

    folder = tmp_path_factory.mktemp("migrated")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MODELPRESS_DATA_DIR", str(folder))
        for var in ENV_KEPT_OUT:
            patch.delenv(var, raising=False)
        clear_caches()
        upgrade()
        clear_caches()
    return folder


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, migrated_sqlite: Path) -> Iterator[Path]:
    """Point every setting at a fresh data folder holding a migrated database of its own."""
    folder = tmp_path / "data"
    monkeypatch.setenv("MODELPRESS_DATA_DIR", str(folder))
    for var in ENV_KEPT_OUT:
        monkeypatch.delenv(var, raising=False)
    clear_caches()
    shutil.copytree(migrated_sqlite, folder)
    yield folder
    clear_caches()


@pytest.fixture
def client(data_dir: Path):
    from fastapi.testclient import TestClient

    from app.main import create_app

    with TestClient(create_app()) as test_client:
        yield test_client


@pytest.fixture
def alice(client) -> dict[str, str]:
    return {"Authorization": f"Bearer {make_key('alice')}"}


@pytest.fixture
def bob(client) -> dict[str, str]:
    return {"Authorization": f"Bearer {make_key('bob')}"}


@pytest.fixture(scope="session")
def mlp_onnx() -> bytes:
    return mlp_onnx_bytes()


@pytest.fixture
def postgres_database() -> Iterator[str]:
    """For tests that start processes: the URL of a fresh database (they migrate it themselves)."""
    with fresh_postgres_database() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request, data_dir, monkeypatch):
    """The test runs twice: on the data folder's SQLite and on a fresh PostgreSQL database."""
    yield from use_database(request.param, monkeypatch)


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
    drop_redis_keys(client, prefix)


@pytest.fixture(scope="session")
def browser():
    need(CHROMIUM.is_file(), f"{CHROMIUM} is missing: `apt-get install chromium` (scripts/services.sh does it as root)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:  # pragma: no cover - declared in pyproject's dev extra
        need(False, f"the playwright package is missing: {exc}")
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def queue_prefix():
    prefix = f"mptest-{uuid.uuid4().hex[:8]}-"
    yield prefix
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    # Only this test's own queues: the machine's Redis is never flushed.
    drop_redis_keys(client, prefix)


@pytest.fixture(scope="session")
def service(tmp_path_factory):
    """`modelpress run` on a free port: API, one Celery worker, SQLite, files under a fresh folder; one for the
    whole session, shared by the tests that do not need a deployment of their own (their logs print on a
    failure to start)."""
    tmp = tmp_path_factory.mktemp("service")
    data_dir, port = tmp / "data", free_port()
    env = base_env(data_dir)
    with processes([str(BIN / "modelpress"), "run", "--port", str(port)], env=env, log_dir=tmp) as procs:
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(url, procs)
        except BaseException:
            print(logs(tmp))
            raise
        yield {"url": url, "key": (data_dir / "api-key").read_text().strip(), "tmp": tmp}


def pytest_sessionfinish(session, exitstatus):
    drop_postgres_template()
