"""The versioned payloads of job events, as receivers get them: the webhook body and each server-sent event's data.

Both carry `schema_version`. A new field in a payload keeps the version (receivers ignore fields they do not know);
a field removed, renamed or given another meaning makes a new one. The schemas are published in /openapi.json: the
webhook under `webhooks` (OpenAPI 3.1) as `job-event`, its body `JobWebhookPayload`; the stream's events as the
`text/event-stream` schema of GET /v1/jobs/{job_id}/events, `JobStreamEvent`, both also under `components`.

The webhook body is the job as GET /v1/jobs/{id} shows it when the delivery is made, plus `schema_version` and
`event` (what the ModelPress-Event header says), so receivers written for the plain job JSON keep working.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import FastAPI, Header
from pydantic import Field

from app.dbmodels import Job, JobEvent
from app.jobs.schemas import JobEventStreamed, JobPublic, WebhookEvent
from app.jobs.state import to_public
from app.webhooks.targets import DELIVERY_HEADER, EVENT_HEADER, SIGNATURE_HEADER

SchemaVersion = Literal["1"]
EVENT_SCHEMA_VERSION: SchemaVersion = "1"
SCHEMA_VERSION_FIELD = Field(
    description="The version of this payload's schema (published in /openapi.json). Fields may be added within "
    "a version; one removed, renamed or given another meaning makes a new version.")
WEBHOOK_NAME = "job-event"
EVENTS_PATH = "/v1/jobs/{job_id}/events"
STREAM_MEDIA_TYPE = "text/event-stream"


class JobWebhookPayload(JobPublic):
    """A webhook's body: the job as GET /v1/jobs/{id} shows it when the delivery is made, with the event that
    triggered the delivery and the payload's schema version."""

    schema_version: SchemaVersion = SCHEMA_VERSION_FIELD
    event: WebhookEvent = Field(description="The event that triggered this delivery (the ModelPress-Event header).")


class JobStreamEvent(JobEventStreamed):
    """The `data` of one server-sent event of GET /v1/jobs/{job_id}/events (its `event:` line is `kind`, its `id:`
    line `id`): the event, the job's status and progress when it was sent, and the payload's schema version."""

    schema_version: SchemaVersion = SCHEMA_VERSION_FIELD


def webhook_payload(job: Job, event: str) -> JobWebhookPayload:
    """The body a delivery of `event` sends for this job now."""
    public = to_public(job)
    # The job's fields as to_public validated them, unchanged (no second validation of the summary's union).
    fields: dict[str, Any] = {name: getattr(public, name) for name in type(public).model_fields}
    return JobWebhookPayload.model_construct(**fields, schema_version=EVENT_SCHEMA_VERSION, event=event)


def stream_event(event: JobEvent, job: Job) -> JobStreamEvent:
    """One server-sent event's data for `event`, with the job's status and progress as they are now."""
    return JobStreamEvent(
        schema_version=EVENT_SCHEMA_VERSION, id=event.id, created_at=event.created_at, kind=event.kind,
        status=event.status, progress=event.progress, stage=event.stage, message=event.message, job_status=job.status,
        job_progress=round(job.progress, 4),
    )


def publish(app: FastAPI) -> None:
    """Put both payload schemas into the app's OpenAPI: the webhook under `webhooks`, the stream's events as the
    `text/event-stream` schema of the events route (and `JobStreamEvent` under components)."""

    @app.webhooks.post(
        WEBHOOK_NAME, status_code=200, operation_id="job_event", summary="A job event, POSTed to the job's webhook_url",
        description="Sent for each event the job's `webhook_events` name (default: succeeded, failed, cancelled; "
        "`progress` at most every 10 s). Verify the signature over the raw body before parsing it. Any 2xx "
        "acknowledges the delivery; anything else (a redirect included) is retried with exponential backoff within "
        "the server's retry window, and every attempt is listed by GET /v1/jobs/{id}/deliveries.",
        responses={200: {"description": "Delivered (any 2xx)"}})
    def job_event(
        payload: JobWebhookPayload,
        signature: Annotated[str, Header(alias=SIGNATURE_HEADER, description=(
            't=<unix ts>,v1=<hex HMAC-SHA256(secret, f"{t}.{raw body}")>, with the tenant\'s secret from '
            "POST /v1/webhook-secret"))],
        event: Annotated[WebhookEvent, Header(alias=EVENT_HEADER, description="The event, as the body's `event`.")],
        delivery: Annotated[str, Header(alias=DELIVERY_HEADER, description=(
            "The delivery's id: retries of one event carry the same one (deduplicate on it)."))],
    ) -> None:
        """Declared for the OpenAPI document only: receivers implement it."""

    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = generate()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        stream = JobStreamEvent.model_json_schema(ref_template="#/components/schemas/{model}", mode="serialization")
        components.update(stream.pop("$defs", {}))
        components[JobStreamEvent.__name__] = stream
        route = schema.get("paths", {}).get(EVENTS_PATH, {}).get("get")
        if route is not None:
            content = route["responses"]["200"].setdefault("content", {})
            content[STREAM_MEDIA_TYPE] = {"schema": {"$ref": f"#/components/schemas/{JobStreamEvent.__name__}"}}
        return schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to extend its OpenAPI
