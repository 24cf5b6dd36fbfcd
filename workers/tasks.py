"""Celery tasks. A task takes a job id, opens its own session and is idempotent."""
from __future__ import annotations

from app.queue import RUN_JOB_TASK
from app.retention import EXPIRE_ARTIFACTS_TASK, run_retention
from workers.celery_app import celery
from workers.pipeline import run_job as _run_job


@celery.task(name=RUN_JOB_TASK, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def run_job(job_id: str) -> None:
    _run_job(job_id)


@celery.task(name=EXPIRE_ARTIFACTS_TASK, ignore_result=True)
def expire_artifacts() -> int:
    """Retention (scheduled by Celery beat): idempotent, so a duplicate or late run does no harm."""
    return run_retention()
