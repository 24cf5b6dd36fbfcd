"""Job state changes, shared by the API and the workers: every change is also an event row."""
from __future__ import annotations

from sqlalchemy.orm import Session

from app.dbmodels import TERMINAL_STATUSES, Job, JobEvent, utcnow
from app.jobs.schemas import JobError, JobPublic
from app.webhooks import service as webhooks


def add_event(db: Session, job: Job, *, kind: str, message: str | None = None) -> None:
    db.add(
        JobEvent(
            job_id=job.id, kind=kind, status=job.status, progress=job.progress, stage=job.stage,
            message=message if message is not None else job.message,
        )
    )
    if kind == "progress":
        webhooks.notify_progress(db, job)


def set_status(db: Session, job: Job, status: str, *, message: str | None = None) -> None:
    # A job is created "queued"; any other status re-set (a cancellation request on a running job) is no event.
    entered = status != job.status or status == "queued"
    job.status = status
    if message is not None:
        job.message = message
    now = utcnow()
    if status == "running" and job.started_at is None:
        job.started_at = now
    if status in TERMINAL_STATUSES:
        job.finished_at = now
        if status == "succeeded":
            job.progress = 1.0
    job.updated_at = now
    add_event(db, job, kind="state", message=message)
    if entered:
        webhooks.notify_state(db, job, status)


def to_public(job: Job) -> JobPublic:
    return JobPublic(
        id=job.id, name=job.name, model_id=job.model_id, status=job.status, progress=round(job.progress, 4),
        stage=job.stage, message=job.message, steps=job.spec.get("steps", []), recipe=job.spec.get("recipe"),
        evaluate=job.spec.get("evaluate", {}), kind=job.kind or "compress",
        queue=job.queue, attempts=job.attempts, created_at=job.created_at, started_at=job.started_at,
        finished_at=job.finished_at, expired_at=job.expired_at,
        error=JobError(code=job.error_code, message=job.error_message or "") if job.error_code else None,
        summary=job.summary, webhook_url=job.webhook_url, webhook_events=job.webhook_events,
        target=job.spec.get("target"), goal=job.spec.get("goal"),
        replay_of=(job.spec.get("replay_of") or {}).get("job_id"),
    )
