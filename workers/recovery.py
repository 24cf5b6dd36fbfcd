"""Recovery: the database is the source of truth, so jobs the broker or a worker lost are found there.

Run by Celery beat every `reaper_interval_s` (REAP_JOBS_TASK), and once when a worker starts:

- A `running` job whose heartbeat is older than `heartbeat_timeout_s` lost its worker without the message
  coming back (the whole worker killed, its machine gone): it is put back to `queued` and sent again, up to
  `job_max_attempts` attempts in all; then it fails with `worker_lost`.
- A `queued` job whose message is neither waiting in the broker nor held by a worker (Redis restarted or
  flushed, or the API died between its commit and its send) is sent again once it has waited
  `requeue_grace_s` (a message on its way is not taken for a lost one).

Sending a job twice is harmless: a worker claims a job only once (workers.supervise._claim).
"""
from __future__ import annotations

import datetime as dt
import logging

from sqlalchemy import func, select

from app.db import session_scope
from app.dbmodels import Job, utcnow
from app.jobs.state import add_event, set_status
from app.queue import enqueue_job, queued_job_ids
from app.settings import Settings, get_settings

REAP_JOBS_TASK = "modelpress.reap_jobs"
log = logging.getLogger("modelpress.recovery")


def beat_schedule(settings: Settings) -> dict:
    return {
        "reap-jobs": {
            "task": REAP_JOBS_TASK,
            "schedule": float(settings.reaper_interval_s),
            # A sweep that waited longer than one interval is superseded by the next one.
            "options": {"queue": settings.queue_name("cpu"), "expires": settings.reaper_interval_s},
        }
    }


def reap(settings: Settings | None = None, *, now: dt.datetime | None = None) -> dict[str, list[str]]:
    """One sweep. Returns the ids it requeued (lost workers), failed (out of attempts) and re-sent (lost messages)."""
    settings = settings or get_settings()
    now = now or utcnow()
    outcome: dict[str, list[str]] = {"requeued": [], "failed": [], "resent": []}
    requeued: list[tuple[str, str]] = []
    for job_id in _stale_running(now, settings):
        verdict, queue = _requeue_or_fail(job_id, now, settings)
        if verdict:
            outcome[verdict].append(job_id)
        if verdict == "requeued" and queue is not None:  # (a requeued job always has its queue)
            requeued.append((job_id, queue))
    outcome["resent"] = _resend_lost_messages(now, settings)
    if any(outcome.values()):
        log.warning("recovery: %s", {k: len(v) for k, v in outcome.items()})
    for job_id, queue in requeued:  # after their commit: the row is queued before the message exists
        _send(job_id, queue)
    return outcome


def _stale_running(now: dt.datetime, settings: Settings) -> list[str]:
    cutoff = now - dt.timedelta(seconds=settings.heartbeat_timeout_s)
    last_sign = func.coalesce(Job.heartbeat_at, Job.started_at, Job.updated_at)
    with session_scope() as db:
        return list(db.scalars(select(Job.id).where(Job.status == "running", last_sign < cutoff).order_by(Job.id)))


def _requeue_or_fail(job_id: str, now: dt.datetime, settings: Settings) -> tuple[str | None, str | None]:
    """("requeued", its queue), ("failed", None), or (None, None) when the job moved on meanwhile."""
    cutoff = now - dt.timedelta(seconds=settings.heartbeat_timeout_s)
    with session_scope() as db:
        job = db.get(Job, job_id, with_for_update=True)
        last = job.heartbeat_at or job.started_at or job.updated_at if job else None
        if job is None or job.status != "running" or last is None or last >= cutoff:
            return None, None  # it finished, or beat, since we looked
        silent = f"its worker ({job.worker_id or 'unknown'}) stopped sending heartbeats {(now - last).total_seconds():.0f} s ago"
        if job.attempts >= settings.job_max_attempts:
            job.error_code, job.stage = "worker_lost", "failed"
            job.error_message = (f"attempt {job.attempts} of {settings.job_max_attempts} was lost: {silent}; "
                                 "the job is not tried again (MODELPRESS_JOB_MAX_ATTEMPTS)")
            set_status(db, job, "failed", message=job.error_message)
            return "failed", None
        job.stage, job.worker_id, job.heartbeat_at = "queued", None, None
        set_status(db, job, "queued", message=f"requeued after attempt {job.attempts}: {silent}")
        return "requeued", job.queue


def _resend_lost_messages(now: dt.datetime, settings: Settings) -> list[str]:
    cutoff = now - dt.timedelta(seconds=settings.requeue_grace_s)
    with session_scope() as db:
        waiting = db.execute(select(Job.id, Job.queue).where(Job.status == "queued", Job.updated_at < cutoff)
                             .order_by(Job.created_at)).all()
    if not waiting:
        return []
    try:
        # Every queue a waiting job was sent to: a target's own queue (openvino.cpu.f32, ...) as well as cpu and gpu.
        in_broker = queued_job_ids(settings, queues={queue for _, queue in waiting})
    except Exception as exc:  # the broker is down: the next sweep will look again
        log.warning("recovery: cannot look into the broker (%s); lost messages are looked for next time", exc)
        return []
    if in_broker is None:
        return []
    resent = []
    for job_id, queue in waiting:
        if job_id in in_broker:
            continue
        with session_scope() as db:
            job = db.get(Job, job_id, with_for_update=True)
            if job is None or job.status != "queued":
                continue
            job.updated_at = utcnow()  # it waits requeue_grace_s again before it can be taken for lost
            add_event(db, job, kind="state", message="sent to the queue again: its message was no longer in the "
                                                     "broker (restarted or flushed)")
        if _send(job_id, queue):
            resent.append(job_id)
    return resent


def _send(job_id: str, queue: str) -> bool:
    try:
        enqueue_job(job_id, queue)
        return True
    except Exception as exc:  # still queued in the database: the next sweep sends it
        log.warning("recovery: could not send job %s (%s); the next sweep tries again", job_id, exc)
        return False
