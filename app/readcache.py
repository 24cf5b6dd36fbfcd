"""What every poll would otherwise read from PostgreSQL again: the caller's key and the job's public JSON.

Dashboards and CI pipelines poll `GET /v1/jobs/{id}` many times a second; reading the key and the job row
for each poll costs two round trips and the ORM's work on every one. Each API process keeps both here, and
PostgreSQL tells it when to drop them: every committed change to a job, a key or a tenant sends a
notification (LISTEN/NOTIFY, sent by the transaction that made the change, on commit), which a listener
thread of each API process receives within milliseconds.

What keeps this correct:
- The cache serves only while its listener is connected and listening; on any trouble it is switched off and
  emptied, and every request reads the database, until the listener is back (and has emptied it again).
- A read that raced an invalidation is not stored: each entry is stored only if no notification for its id
  (or no reconnection) came between the read's start and its end (per-id generations).
- The process that revokes a key drops it itself at once; the others within a notification's delivery.
- Entries live at most `TTL_S` in any case, and key expiry is checked on every request.
Only PostgreSQL deployments cache (SQLite has no notifications); the embedded default reads every time.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import functools
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import event
from sqlalchemy.orm import Session

log = logging.getLogger("modelpress.readcache")

JOBS, KEYS, TENANTS = "modelpress_jobs", "modelpress_keys", "modelpress_tenants"
TTL_S = 60.0
MAX_ENTRIES = 100_000


@dataclass(frozen=True)
class TenantView:
    """What a request needs of its tenant (the row's columns, read once)."""

    id: str
    name: str
    max_concurrent_jobs: int | None
    max_stored_bytes: int | None
    requests_per_minute: int | None


@dataclass(frozen=True)
class KeyView:
    """An authenticated API key, as the routes see it: a snapshot, never an ORM row."""

    id: str
    tenant_id: str
    scopes: tuple[str, ...]
    expires_at: dt.datetime | None
    tenant: TenantView

    @classmethod
    def of(cls, key) -> KeyView:
        t = key.tenant
        return cls(id=key.id, tenant_id=key.tenant_id, scopes=tuple(key.scopes or ()),
                   expires_at=key.expires_at,
                   tenant=TenantView(id=t.id, name=t.name, max_concurrent_jobs=t.max_concurrent_jobs,
                                     max_stored_bytes=t.max_stored_bytes, requests_per_minute=t.requests_per_minute))


@dataclass(frozen=True)
class JobView:
    tenant_id: str
    body: bytes
    etag: str


class ReadCache:
    def __init__(self) -> None:
        self._inflight: dict[tuple, asyncio.Future] = {}
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple[str, str], tuple[float, Any]] = OrderedDict()
        self._generations: dict[tuple[str, str], int] = {}
        self._epoch = 0
        self.enabled = False

    # --- reads ------------------------------------------------------------------------------------------

    def get(self, kind: str, ident: str) -> Any | None:
        if not self.enabled:
            return None
        with self._lock:
            entry = self._entries.get((kind, ident))
            if entry is None:
                return None
            stored_at, value = entry
            if time.monotonic() - stored_at > TTL_S:
                del self._entries[(kind, ident)]
                return None
            return value

    def ticket(self, kind: str, ident: str) -> tuple[int, int]:
        """Taken before a database read; `put` stores the result only if the ticket still holds."""
        with self._lock:
            return self._epoch, self._generations.get((kind, ident), 0)

    def put(self, kind: str, ident: str, value: Any, ticket: tuple[int, int]) -> None:
        if not self.enabled:
            return
        with self._lock:
            if ticket != (self._epoch, self._generations.get((kind, ident), 0)):
                return  # a notification (or a reconnection) came while it was being read
            self._entries[(kind, ident)] = (time.monotonic(), value)
            self._entries.move_to_end((kind, ident))
            while len(self._entries) > MAX_ENTRIES:
                self._entries.popitem(last=False)

    async def fetch(self, kind: str, ident: str, load: Callable[[], Any], *, scope: str = "") -> Any:
        """The cached value, or `load()` run in a worker thread and stored. Concurrent misses of one entry
        (every poller, right after the job moved) share one load instead of each reading the database;
        `scope` keeps callers that must not share a result apart (a tenant's polls from another's)."""
        from starlette.concurrency import run_in_threadpool

        flight = (kind, ident, scope)
        running = self._inflight.get(flight)
        if running is not None:
            return await asyncio.shield(running)
        future = asyncio.get_running_loop().create_future()
        future.add_done_callback(lambda done: done.cancelled() or done.exception())  # no "never retrieved"
        self._inflight[flight] = future
        try:
            ticket = self.ticket(kind, ident)
            value = await run_in_threadpool(load)
            self.put(kind, ident, value, ticket)
            future.set_result(value)
            return value
        except BaseException as exc:
            future.set_exception(exc)
            raise
        finally:
            del self._inflight[flight]

    # --- invalidation -----------------------------------------------------------------------------------

    def drop(self, kind: str, ident: str) -> None:
        with self._lock:
            self._entries.pop((kind, ident), None)
            self._generations[(kind, ident)] = self._generations.get((kind, ident), 0) + 1
            if len(self._generations) > MAX_ENTRIES:
                # Forgetting generations is safe only with a new epoch: every ticket taken before fails.
                self._generations.clear()
                self._entries.clear()
                self._epoch += 1

    def drop_tenant(self, tenant_id: str) -> None:
        with self._lock:
            keys = [k for k, (_at, v) in self._entries.items() if k[0] == KEYS and v.tenant_id == tenant_id]
        for kind, ident in keys:
            self.drop(kind, ident)

    def reset(self, *, enabled: bool) -> None:
        with self._lock:
            self._entries.clear()
            self._generations.clear()
            self._epoch += 1
            self.enabled = enabled


class Listener(threading.Thread):
    """LISTENs on the invalidation channels and keeps `cache` in step; the cache is on only while it listens."""

    def __init__(self, cache: ReadCache, dsn: str) -> None:
        super().__init__(name="readcache-listener", daemon=True)
        self.cache, self.dsn = cache, dsn
        self.stopping = threading.Event()

    def run(self) -> None:
        import psycopg

        while not self.stopping.is_set():
            try:
                with psycopg.connect(self.dsn, autocommit=True, connect_timeout=5) as conn:
                    for channel in (JOBS, KEYS, TENANTS):
                        conn.execute(f"LISTEN {channel}")
                    self.cache.reset(enabled=True)  # empty, then on: nothing older than the LISTEN is kept
                    while not self.stopping.is_set():
                        for note in conn.notifies(timeout=1.0):
                            self._apply(note.channel, note.payload)
                        conn.execute("SELECT 1")  # notice a dead connection within a second
            except Exception as exc:
                if self.stopping.is_set():
                    break
                log.warning("read cache off (its listener lost PostgreSQL: %s); retrying", exc)
            self.cache.reset(enabled=False)
            self.stopping.wait(1.0)

    def _apply(self, channel: str, payload: str) -> None:
        if channel == JOBS:
            self.cache.drop(JOBS, payload)
        elif channel == KEYS:
            self.cache.drop(KEYS, payload)
        elif channel == TENANTS:
            self.cache.drop_tenant(payload)


@functools.lru_cache
def get_cache() -> ReadCache:
    return ReadCache()


def start_listener(database_url: str) -> Listener | None:
    """Start the invalidation listener of this process (PostgreSQL only); None where nothing is cached."""
    if not database_url.startswith("postgresql"):
        return None
    dsn = database_url.replace("postgresql+psycopg://", "postgresql://", 1)
    listener = Listener(get_cache(), dsn)
    listener.start()
    return listener


# --- sending: every committed change to a job, a key or a tenant -------------------------------------------

@event.listens_for(Session, "after_flush")
def _notify_changes(session: Session, _flush_context) -> None:
    """pg_notify for each job, key and tenant this flush wrote; PostgreSQL delivers them when (and only if)
    the transaction commits."""
    from app.dbmodels import ApiKey, Job, Tenant

    bind = session.get_bind()
    if bind.dialect.name != "postgresql":
        return
    notes: dict[str, set[str]] = {JOBS: set(), KEYS: set(), TENANTS: set()}
    for obj in (*session.new, *session.dirty, *session.deleted):
        if isinstance(obj, Job):
            notes[JOBS].add(obj.id)
        elif isinstance(obj, ApiKey):
            notes[KEYS].add(obj.key_hash)
        elif isinstance(obj, Tenant):
            notes[TENANTS].add(obj.id)
    from sqlalchemy import text

    for channel, idents in notes.items():
        if idents:
            session.connection().execute(
                text("SELECT pg_notify(:channel, ident) FROM unnest(CAST(:idents AS text[])) AS ident"),
                {"channel": channel, "idents": sorted(idents)})


@event.listens_for(Session, "before_flush")
def _notify_jobs_of_deleted_models(session: Session, _flush_context, _instances) -> None:
    """Deleting a model sets its finished jobs' model_id to NULL in the database (ON DELETE SET NULL), which the
    ORM never sees: name those jobs now, while they still point at it."""
    from app.dbmodels import Model

    deleted = [obj.id for obj in session.deleted if isinstance(obj, Model)]
    if not deleted or session.get_bind().dialect.name != "postgresql":
        return
    from sqlalchemy import text

    session.connection().execute(
        text("SELECT pg_notify(:channel, id) FROM jobs WHERE model_id = ANY(CAST(:models AS text[]))"),
        {"channel": JOBS, "models": deleted})
