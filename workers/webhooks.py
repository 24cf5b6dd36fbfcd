"""Webhook delivery: one attempt per task, each recorded; a failed attempt enqueues the next one with
exponential backoff (1, 2, 4 ... s, capped) until the retry window (MODELPRESS_WEBHOOK_RETRY_WINDOW_S) is spent.

The body is the job JSON as GET /v1/jobs/{id} shows it when the attempt is made, with `schema_version` and `event`
(app.events.JobWebhookPayload, published in /openapi.json); ModelPress-Event names the event that triggered the
delivery. Redirects are not followed: a 3xx is a failed attempt.
"""
from __future__ import annotations

import datetime as dt
import logging
import time
from urllib.parse import urlsplit

import httpcore
from sqlalchemy import or_, select

from app.db import session_scope
from app.dbmodels import Job, Tenant, WebhookDelivery
from app.errors import WebhookUrlForbidden, WebhookUrlUnresolvable
from app.events import webhook_payload
from app.settings import get_settings
from app.webhooks.service import DELIVER_WEBHOOK_TASK, enqueue
from app.webhooks.targets import DELIVERY_HEADER, EVENT_HEADER, SIGNATURE_HEADER, EgressPolicy, GuardedBackend, sign
from workers.celery_app import celery

log = logging.getLogger(__name__)

TIMEOUT_S = 10.0
MAX_BACKOFF_S = 300.0


@celery.task(name=DELIVER_WEBHOOK_TASK, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def deliver_webhook(job_id: str, event: str, delivery_id: str, attempt: int = 1,
                    first_attempt_at: float | None = None) -> None:
    deliver(job_id=job_id, event=event, delivery_id=delivery_id, attempt=attempt, first_attempt_at=first_attempt_at)


def backoff_s(attempt: int) -> float:
    return min(2.0 ** (attempt - 1), MAX_BACKOFF_S)


def deliver(*, job_id: str, event: str, delivery_id: str, attempt: int = 1,
            first_attempt_at: float | None = None) -> WebhookDelivery | None:
    """Make one attempt and record it; returns the recorded attempt (None when there was nothing to do)."""
    settings = get_settings()
    first_attempt_at = first_attempt_at or time.time()
    with session_scope() as db:
        job = db.get(Job, job_id)
        if job is None or not job.webhook_url:
            return None
        done = db.scalar(select(WebhookDelivery.id).where(
            WebhookDelivery.delivery_id == delivery_id,
            or_(WebhookDelivery.attempt >= attempt, WebhookDelivery.delivered)).limit(1))
        if done is not None:  # a redelivered message: this attempt was made already
            return None
        url, tenant_id = job.webhook_url, job.tenant_id
        secret = db.scalar(select(Tenant.webhook_secret).where(Tenant.id == tenant_id))
        body = webhook_payload(job, event).model_dump_json().encode()

    status_code, error, final = None, None, False
    started = time.monotonic()
    if secret is None:
        error, final = "the tenant has no webhook signing secret", True
    else:
        try:
            status_code = _post(url, body, secret=secret, event=event, delivery_id=delivery_id,
                                policy=EgressPolicy.from_settings(settings))
        except WebhookUrlForbidden as exc:
            error, final = exc.message, True  # refused, not retried: the address will not become public
        except WebhookUrlUnresolvable as exc:
            error = exc.message
        except httpcore.TimeoutException:
            error = f"no answer within {TIMEOUT_S:g} s"
        except (httpcore.NetworkError, httpcore.ProtocolError, httpcore.UnsupportedProtocol, OSError) as exc:
            error = f"{type(exc).__name__}: {exc}"
    duration_ms = round((time.monotonic() - started) * 1000, 1)
    delivered = status_code is not None and 200 <= status_code < 300
    if status_code is not None and not delivered:
        error = f"HTTP {status_code}" + (" (redirects are not followed)" if 300 <= status_code < 400 else "")

    next_attempt_at, delay = None, backoff_s(attempt)
    if not delivered and not final and time.time() + delay - first_attempt_at <= settings.webhook_retry_window_s:
        next_attempt_at = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=delay)
    with session_scope() as db:
        record = WebhookDelivery(
            delivery_id=delivery_id, job_id=job_id, tenant_id=tenant_id, event=event, url=url, attempt=attempt,
            status_code=status_code, error=error, duration_ms=duration_ms, next_attempt_at=next_attempt_at,
            delivered=delivered,
        )
        db.add(record)
    if next_attempt_at is not None:
        # Enqueued after the attempt is recorded; the message carries ids only.
        enqueue(job_id, event, delivery_id=delivery_id, attempt=attempt + 1, first_attempt_at=first_attempt_at,
                countdown=delay)
    elif not delivered:
        log.warning("webhook %s (%s) of job %s given up after attempt %d: %s", delivery_id, event, job_id,
                    attempt, error)
    return record


def _post(url: str, body: bytes, *, secret: str, event: str, delivery_id: str, policy: EgressPolicy) -> int:
    timestamp = int(time.time())
    parts = urlsplit(url)
    headers = [
        (b"Host", parts.netloc.encode()),  # ASCII: JobCreate accepts internationalised hosts in punycode only
        (b"Content-Type", b"application/json"),
        (b"User-Agent", b"ModelPress-Webhook/1"),
        (SIGNATURE_HEADER.encode(), sign(secret, timestamp, body).encode()),
        (EVENT_HEADER.encode(), event.encode()),
        (DELIVERY_HEADER.encode(), delivery_id.encode()),
    ]
    timeouts = {"connect": TIMEOUT_S, "read": TIMEOUT_S, "write": TIMEOUT_S, "pool": TIMEOUT_S}
    # A pool per attempt: no connection outlives the address check made when it opened.
    with httpcore.ConnectionPool(network_backend=GuardedBackend(policy=policy), retries=0) as pool:
        with pool.stream("POST", url, headers=headers, content=body, extensions={"timeout": timeouts}) as response:
            return response.status  # the receiver's body is not read
