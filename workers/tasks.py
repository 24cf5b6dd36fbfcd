"""Celery tasks. A task takes a job id, opens its own session and is idempotent."""
from __future__ import annotations

import logging
import threading

from celery.signals import celeryd_after_setup, worker_ready, worker_shutdown

from app.queue import RUN_JOB_TASK
from app.retention import EXPIRE_ARTIFACTS_TASK, run_retention
from app.store import get_store
from workers import registry
from workers.celery_app import celery
from workers.recovery import REAP_JOBS_TASK, reap
from workers.supervise import run_job as _run_job

log = logging.getLogger("modelpress.worker")


@celery.task(name=RUN_JOB_TASK, bind=True, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def run_job(self, job_id: str) -> None:
    # The worker's node name goes into the job's "running" event: which worker took it, as the registry names it.
    _run_job(job_id, node=self.request.hostname)


@celery.task(name=EXPIRE_ARTIFACTS_TASK, ignore_result=True)
def expire_artifacts() -> int:
    """Retention (scheduled by Celery beat): idempotent, so a duplicate or late run does no harm."""
    return run_retention()


@celery.task(name=REAP_JOBS_TASK, ignore_result=True)
def reap_jobs() -> dict:
    """Recovery sweep (Celery beat): requeue jobs of lost workers, re-send jobs whose message was lost, and remove
    the scratch folders their job processes left (live ones are locked)."""
    get_store().clean_tmp()
    return reap()


@celeryd_after_setup.connect
def _serve_targets(sender, instance, **_kwargs) -> None:
    # Before the pool and the consumer start: the queues of the targets this worker serves join its -Q queues.
    try:
        registry.prepare(str(sender), instance.app)
    except Exception:
        log.exception("choosing this worker's targets failed; it consumes its -Q queues only")


@worker_ready.connect
def _register(sender, **_kwargs) -> None:
    # sender: the worker's consumer. Registered only now, when it takes jobs from every queue it names.
    try:
        registry.register(sender.hostname, sender.app)
    except Exception:
        log.exception("registering this worker failed; GET /v1/targets does not list it")


@worker_shutdown.connect
def _unregister(**_kwargs) -> None:
    registry.unregister()


@worker_ready.connect
def _sweep_at_startup(**_kwargs) -> None:
    # A worker that starts (after a crash, a Redis restart, a deploy) looks for lost jobs at once rather
    # than at beat's next tick; in a thread, so that it starts consuming meanwhile.
    def sweep() -> None:
        try:
            get_store().clean_tmp()  # work folders of jobs whose worker died (live ones are locked)
            reap()
        except Exception:
            log.exception("recovery sweep at start-up failed")

    threading.Thread(target=sweep, name="recovery-at-startup", daemon=True).start()
