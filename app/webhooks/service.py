"""Webhooks: the tenant's signing secret, the job events that trigger a delivery, and the delivery log.

A state change marks the job's webhook as due on the session; the delivery task is enqueued only after that
session commits (the event exists before the message does), and dropped if it rolls back.
"""
from __future__ import annotations

import logging
import secrets
import time
import uuid

from sqlalchemy import event as sa_event
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.audit import service as audit
from app.audit.service import Actor
from app.dbmodels import Job, Tenant, WebhookDelivery
from app.errors import WebhookSecretMissing
from app.settings import Settings, get_settings
from app.webhooks.targets import EgressPolicy, check_url

log = logging.getLogger(__name__)

DELIVER_WEBHOOK_TASK = "modelpress.deliver_webhook"
# Deliveries are short HTTP calls; every deployment runs workers on the cpu queue.
WEBHOOK_QUEUE = "cpu"
EVENTS = ("queued", "running", "succeeded", "failed", "cancelled", "progress")
DEFAULT_EVENTS = ["succeeded", "failed", "cancelled"]
# At most one "progress" webhook per job this often; the worker that runs a job writes all its progress,
# so a per-process clock is enough.
PROGRESS_INTERVAL_S = 10.0
_PENDING = "modelpress_webhooks"
_last_progress: dict[str, float] = {}


def rotate_secret(*, db: Session, tenant_id: str, actor: Actor) -> str:
    """A new signing secret for the tenant (the old one stops working); returned once, never shown again."""
    secret = "whsec_" + secrets.token_urlsafe(32)
    tenant = db.get_one(Tenant, tenant_id, with_for_update=True)
    rotated = tenant.webhook_secret is not None
    tenant.webhook_secret = secret
    audit.record(db, actor, "webhook_secret.rotate" if rotated else "webhook_secret.create", object_type="tenant",
                 object_id=tenant_id)
    db.commit()
    return secret


def has_secret(*, db: Session, tenant_id: str) -> bool:
    return db.scalar(select(Tenant.webhook_secret).where(Tenant.id == tenant_id)) is not None


def check_target(*, db: Session, settings: Settings, tenant_id: str, url: str) -> None:
    """A job may name a webhook only once its tenant can sign, and only for a host the service may reach."""
    if not has_secret(db=db, tenant_id=tenant_id):
        raise WebhookSecretMissing("a job with a webhook_url needs the tenant's signing secret: create it with "
                                   "POST /v1/webhook-secret (it is shown once), then submit again",
                                   field="webhook_url")
    check_url(url, policy=EgressPolicy.from_settings(settings))


def deliveries(*, db: Session, job: Job) -> list[WebhookDelivery]:
    return list(db.scalars(select(WebhookDelivery).where(WebhookDelivery.job_id == job.id)
                           .order_by(WebhookDelivery.created_at, WebhookDelivery.id)))


def wanted(job: Job, event: str) -> bool:
    return bool(job.webhook_url) and event in (job.webhook_events or DEFAULT_EVENTS)


def notify_state(db: Session, job: Job, status: str) -> None:
    """A job entered `status`: deliver it after commit if the job asked for it."""
    if status in ("succeeded", "failed", "cancelled"):
        _last_progress.pop(job.id, None)
    if wanted(job, status):
        _due(db, job, status)


def notify_progress(db: Session, job: Job) -> None:
    if not wanted(job, "progress"):
        return
    now = time.monotonic()
    if now - _last_progress.get(job.id, float("-inf")) < PROGRESS_INTERVAL_S:
        return
    _last_progress[job.id] = now
    _due(db, job, "progress")


def _due(db: Session, job: Job, event: str) -> None:
    db.info.setdefault(_PENDING, []).append((job.id, event))


def enqueue(job_id: str, event: str, *, delivery_id: str | None = None, attempt: int = 1,
            first_attempt_at: float | None = None, countdown: float | None = None) -> None:
    from app.queue import get_celery

    kwargs = {"job_id": job_id, "event": event, "delivery_id": delivery_id or str(uuid.uuid4()), "attempt": attempt,
              "first_attempt_at": first_attempt_at}
    get_celery().send_task(DELIVER_WEBHOOK_TASK, kwargs=kwargs, countdown=countdown,
                           queue=get_settings().queue_name(WEBHOOK_QUEUE))


@sa_event.listens_for(Session, "after_commit")
def _enqueue_after_commit(session: Session) -> None:
    for job_id, event in session.info.pop(_PENDING, []):
        try:
            enqueue(job_id, event)
        except Exception:  # the state change stands; a lost webhook is logged, not turned into a failed request
            log.exception("could not enqueue the %s webhook of job %s", event, job_id)


@sa_event.listens_for(Session, "after_rollback")
def _drop_on_rollback(session: Session) -> None:
    session.info.pop(_PENDING, None)
