"""The worker registry: every Celery worker writes down in the database what it serves, so the API can list the
deployment's targets (GET /v1/targets) and refuse a job that no running worker can take (app.targets.service).

Wired to Celery's signals in workers.tasks, in the worker's main process:
- `celeryd_after_setup` (before the pool and the consumer start): `prepare` probes the machine in a process of its
  own (workers.targets), chooses the targets (MODELPRESS_WORKER_TARGETS) and adds their queues to those the worker
  consumes (its -Q queues);
- `worker_ready`: `register` upserts the worker's row and starts a thread that refreshes its `last_seen_at` every
  `worker_heartbeat_s`;
- `worker_shutdown` (a clean stop): `unregister` stops that thread and deletes the row. A worker killed outright
  leaves its row, which stops counting once it is `worker_stale_s` old.

The registry's writes go through an engine of their own without a connection pool: the pool's processes are forked
from this one, and a pooled connection must never be shared with them.
"""
from __future__ import annotations

import datetime as dt
import functools
import logging
import os
import socket
import threading
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import delete
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from app.db import make_engine
from app.dbmodels import Worker, utcnow
from app.settings import Settings, get_settings
from workers.targets import probe_isolated, target_key, worker_targets

log = logging.getLogger("modelpress.worker")


@dataclass
class Registration:
    """This worker as its row says: its Celery node name, queues (without the deployment's prefix), targets and
    capabilities."""

    worker_id: str
    queues: list[str]
    targets: list[dict[str, Any]]
    capabilities: dict[str, Any]
    started_at: dt.datetime = field(default_factory=utcnow)
    stop: threading.Event = field(default_factory=threading.Event)

    def row(self) -> Worker:
        return Worker(id=self.worker_id, host=socket.gethostname(), pid=os.getpid(), queues=self.queues,
                      targets=self.targets, capabilities=self.capabilities, started_at=self.started_at,
                      last_seen_at=utcnow())


_current: Registration | None = None


def served_targets() -> list[dict[str, Any]] | None:
    """The targets this worker registered (probed once, in a process of its own, as it started), or None where it
    has not registered (a job run in a test's process): a job's process gets them instead of probing again (2 s of
    imports: OpenVINO, NNCF with torch, LiteRT)."""
    return None if _current is None else [dict(t) for t in _current.targets]


@functools.lru_cache
def _engine(url: str) -> Engine:
    return make_engine(url, poolclass=NullPool)


def _session(settings: Settings) -> Session:
    return Session(_engine(settings.sqlalchemy_url), expire_on_commit=False)


def consumed_queues(app, settings: Settings) -> list[str]:
    """The queues a Celery app's worker consumes, without the deployment's prefix."""
    prefix = settings.queue_prefix
    return [name[len(prefix):] if prefix and name.startswith(prefix) else name
            for name in app.amqp.queues.consume_from]


def prepare(worker_id: str, app, settings: Settings | None = None, *, add_queues: bool = True) -> Registration:
    """Probe, choose the targets and (add_queues) consume their queues. Called before the worker consumes."""
    global _current
    settings = settings or get_settings()
    capabilities = probe_isolated()
    queues = consumed_queues(app, settings)
    targets = worker_targets(capabilities, settings.worker_targets, queues)
    for target in targets:
        if target["queue"] not in queues and add_queues:
            app.amqp.queues.select_add(settings.queue_name(target["queue"]))
            queues.append(target["queue"])
    targets = [t for t in targets if t["queue"] in queues]
    _current = Registration(worker_id=worker_id, queues=queues, targets=targets, capabilities=capabilities)
    log.info("worker %s serves %s (queues %s)", worker_id, ", ".join(target_key(t) for t in targets),
             ", ".join(queues))
    return _current


def register(worker_id: str, app, settings: Settings | None = None) -> Registration:
    """Upsert this worker's row and start its heartbeat thread (when the worker is ready to take jobs)."""
    settings = settings or get_settings()
    registration = _current
    if registration is None or registration.worker_id != worker_id:
        # Started without celeryd_after_setup (an embedded WorkController): its queues are what they are.
        registration = prepare(worker_id, app, settings, add_queues=False)
    try:
        touch(registration, settings, fresh=True)
    except Exception:  # the database is down: the heartbeat writes the row when it is back
        log.exception("could not register worker %s; the heartbeat tries again", worker_id)
    threading.Thread(target=_heartbeat, args=(registration, settings), name="worker-registry", daemon=True).start()
    return registration


def touch(registration: Registration, settings: Settings, *, fresh: bool = False) -> None:
    """Refresh the row's last_seen_at; write the whole row when it is new (`fresh`) or gone (deleted by hand, a
    database restored)."""
    with _session(settings) as db, db.begin():
        row = db.get(Worker, registration.worker_id)
        if row is None or fresh:
            db.merge(registration.row())
        else:
            row.last_seen_at = utcnow()


def _heartbeat(registration: Registration, settings: Settings) -> None:
    while not registration.stop.wait(settings.worker_heartbeat_s):
        try:
            touch(registration, settings)
        except Exception as exc:  # the next beat tries again; the row goes stale meanwhile
            log.warning("worker registry: heartbeat of %s failed: %s", registration.worker_id, exc)


def unregister(settings: Settings | None = None) -> None:
    """A clean shutdown: the worker's row goes at once (its targets leave GET /v1/targets)."""
    global _current
    registration, _current = _current, None
    if registration is None:
        return
    registration.stop.set()
    settings = settings or get_settings()
    try:
        with _session(settings) as db, db.begin():
            db.execute(delete(Worker).where(Worker.id == registration.worker_id))
    except Exception:  # its row goes stale instead
        log.exception("could not remove worker %s from the registry", registration.worker_id)
    else:
        log.info("worker %s left the registry", registration.worker_id)
