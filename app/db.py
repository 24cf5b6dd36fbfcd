"""Engine and sessions. One engine per process, built from Settings."""
from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

# Every process that writes through these sessions (API, workers, CLI) tells the API processes' read caches
# what changed: the notification hooks live in app.readcache and are registered by importing it.
import app.readcache  # noqa: F401
from app.settings import get_settings


def make_engine(url: str, **kwargs) -> Engine:
    if url.startswith("sqlite"):
        # API threads and the worker process share the file: wait on locks rather than fail.
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, **kwargs)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # pragma: no cover - trivial
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    if "poolclass" not in kwargs:  # (the migrations' NullPool keeps no connections)
        settings = get_settings()
        kwargs.update(pool_size=settings.db_pool_size, max_overflow=settings.db_max_overflow)
    return create_engine(url, pool_pre_ping=True, **kwargs)


@functools.lru_cache
def get_engine() -> Engine:
    settings = get_settings()
    if settings.sqlalchemy_url.startswith("sqlite"):
        settings.data_path.mkdir(parents=True, exist_ok=True)
    return make_engine(settings.sqlalchemy_url)


@functools.lru_cache
def get_sessionmaker() -> sessionmaker[Session]:
    return sessionmaker(bind=get_engine(), expire_on_commit=False)


@functools.lru_cache
def get_read_sessionmaker() -> sessionmaker[Session]:
    """Sessions for requests that only read: autocommit, so no BEGIN/ROLLBACK round trips."""
    return sessionmaker(bind=get_engine().execution_options(isolation_level="AUTOCOMMIT"), expire_on_commit=False)


@contextmanager
def session_scope() -> Iterator[Session]:
    """A session for workers and the CLI: commits on success, rolls back on error."""
    session = get_sessionmaker()()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
