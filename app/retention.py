"""Retention: delete the artifacts of jobs that finished more than `retention_days` ago.

The job row, its events, report and measurements stay; the job gets `expired_at`, and its artifact
downloads answer 410 `artifact_expired`. A blob goes only when nothing else points at it
(app.blobs.release_blob): an artifact shared with a newer job, or identical to an uploaded model,
survives. Celery beat runs `EXPIRE_ARTIFACTS_TASK` every `retention_interval_s` (workers/celery_app.py;
`modelpress run` starts beat inside its worker).
"""
from __future__ import annotations

import datetime as dt
import logging

from sqlalchemy import delete, select

from app.blobs import release_blob
from app.db import session_scope
from app.dbmodels import TERMINAL_STATUSES, Artifact, Job, utcnow
from app.settings import Settings, get_settings
from app.store import ArtifactStore, get_store

EXPIRE_ARTIFACTS_TASK = "modelpress.expire_artifacts"
BATCH = 100
log = logging.getLogger("modelpress.retention")


def beat_schedule(settings: Settings) -> dict:
    """The Celery beat entry (none when retention is off)."""
    if settings.retention_days <= 0:
        return {}
    return {
        "expire-artifacts": {
            "task": EXPIRE_ARTIFACTS_TASK,
            "schedule": float(settings.retention_interval_s),
            # A check that waited longer than one interval is superseded by the next one.
            "options": {"queue": settings.queue_name(settings.default_queue), "expires": settings.retention_interval_s},
        }
    }


def expire_artifacts(*, store: ArtifactStore, days: int, now: dt.datetime | None = None) -> int:
    """Expire every terminal job that finished more than `days` days before `now`. Returns how many.

    Idempotent: an expired job is never looked at again, and a run that dies halfway leaves each job
    either untouched or expired (its artifact rows go in the same transaction as expired_at is set).
    """
    if days <= 0:
        return 0
    cutoff = (now or utcnow()) - dt.timedelta(days=days)
    expired = 0
    while True:
        with session_scope() as db:
            ids = list(db.scalars(
                select(Job.id)
                .where(Job.status.in_(TERMINAL_STATUSES), Job.finished_at < cutoff, Job.expired_at.is_(None))
                .order_by(Job.finished_at).limit(BATCH)
            ))
        if not ids:
            return expired
        for job_id in ids:
            expired += _expire_one(store, job_id, cutoff)


def _expire_one(store: ArtifactStore, job_id: str, cutoff: dt.datetime) -> int:
    with session_scope() as db:
        job = db.get(Job, job_id, with_for_update=True)
        # Checked again under the lock: another retention run may have got here first.
        if job is None or job.expired_at is not None or job.finished_at is None or job.finished_at >= cutoff:
            return 0
        shas = set(db.scalars(select(Artifact.sha256).where(Artifact.job_id == job.id)))
        db.execute(delete(Artifact).where(Artifact.job_id == job.id))
        job.expired_at = utcnow()
    # The rows are gone (committed): each blob nothing else points at goes now, row first, file after.
    with session_scope() as db:
        for sha in sorted(shas):
            release_blob(db=db, store=store, sha256=sha)
    log.info("job %s: artifacts expired (%d blob(s) released unless shared)", job_id, len(shas))
    return 1


def run_retention(settings: Settings | None = None) -> int:
    """What the beat task runs: the configured policy against the configured store."""
    settings = settings or get_settings()
    if settings.retention_days <= 0:
        return 0
    count = expire_artifacts(store=get_store(), days=settings.retention_days)
    if count:
        log.info("retention: expired the artifacts of %d job(s) older than %d day(s)", count, settings.retention_days)
    return count
