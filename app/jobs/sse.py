"""A job's events as server-sent events: polled from the database, resumable, ending after the terminal state.

Each poll opens a fresh session in a worker thread and closes it before sleeping, so an open stream holds no
database connection or transaction and never blocks the event loop.
"""
from __future__ import annotations

import time
from collections.abc import AsyncIterator

import anyio
from sqlalchemy import select

from app.db import get_sessionmaker
from app.dbmodels import TERMINAL_STATUSES, Job, JobEvent
from app.events import stream_event

MEDIA_TYPE = "text/event-stream"
POLL_S = 0.5
KEEPALIVE_S = 15.0
BATCH = 500  # events read per poll at most; a long backlog comes over a few polls


def wants_stream(accept: str | None) -> bool:
    return MEDIA_TYPE in (accept or "").lower()


def _poll(job_id: str, after: int) -> tuple[Job | None, list[JobEvent]]:
    with get_sessionmaker()() as db:
        # The job first: when it reads terminal, its terminal event (written in the same commit) is visible too.
        job = db.get(Job, job_id)
        if job is None:
            return None, []
        events = list(db.scalars(select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.id > after)
                                 .order_by(JobEvent.id).limit(BATCH)))
        return job, events  # closing the session detaches them, loaded


def format_event(event: JobEvent, job: Job) -> str:
    data = stream_event(event, job).model_dump_json()  # its schema: app.events.JobStreamEvent
    return f"id: {event.id}\nevent: {event.kind}\ndata: {data}\n\n"


async def stream(*, job_id: str, after: int) -> AsyncIterator[str]:
    """Events with id > after, then new ones as they are written; ends after the job's terminal state."""
    last_sent = time.monotonic()
    while True:
        job, events = await anyio.to_thread.run_sync(_poll, job_id, after)
        if job is None:  # deleted while streaming
            return
        for event in events:
            yield format_event(event, job)
            after = event.id
        if events:
            last_sent = time.monotonic()
        if job.status in TERMINAL_STATUSES and len(events) < BATCH:
            return
        if len(events) == BATCH:
            continue
        if time.monotonic() - last_sent >= KEEPALIVE_S:
            yield ": keep-alive\n\n"
            last_sent = time.monotonic()
        await anyio.sleep(POLL_S)
