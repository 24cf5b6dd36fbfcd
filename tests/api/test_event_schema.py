"""The versioned event payloads (app.events): /openapi.json publishes the webhook body and the server-sent events'
data with their schema_version, and what a receiver really gets validates against what is published.

Real deliveries: a Celery worker posts signed webhooks to a receiver on 127.0.0.1; real streams: the app on uvicorn.
The fixtures and helpers are test_events_webhooks.py's (the same stack), imported from it.
"""
from __future__ import annotations

import json

import httpx
import jsonschema

from app.events import EVENT_SCHEMA_VERSION
from tests.api.test_events_webhooks import (  # noqa: F401 - fixtures used by name
    advance,
    allow_private,
    backend,
    client,
    live_api,
    model_id,
    new_job,
    receiver,
    stream_in_thread,
    verify_signature,
    wait_for,
    webhook_job,
    worker,
)
from tests.stack import logs

ENVELOPE = ("schema_version", "event")


def validator(openapi: dict, name: str) -> jsonschema.Draft202012Validator:
    """A JSON Schema validator for one published component (OpenAPI 3.1 schemas are JSON Schema 2020-12), its
    references resolved inside the document."""
    schema = {"$ref": f"#/components/schemas/{name}", "components": openapi["components"]}
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


def errors(check: jsonschema.Draft202012Validator, payload: dict) -> list[str]:
    return [f"{'.'.join(map(str, e.path)) or '<root>'}: {e.message}" for e in check.iter_errors(payload)]


def test_the_openapi_publishes_the_webhook_and_the_stream_with_their_version(client):  # noqa: F811
    openapi = client.get("/openapi.json").json()
    assert openapi["openapi"].startswith("3.1")
    hook = openapi["webhooks"]["job-event"]["post"]
    assert hook["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/JobWebhookPayload"}
    assert {p["name"] for p in hook["parameters"] if p["in"] == "header"} == {
        "ModelPress-Signature", "ModelPress-Event", "ModelPress-Delivery"}
    events = openapi["paths"]["/v1/jobs/{job_id}/events"]["get"]["responses"]["200"]["content"]
    assert events["text/event-stream"]["schema"] == {"$ref": "#/components/schemas/JobStreamEvent"}
    assert "application/json" in events  # the plain list is still there
    for name in ("JobWebhookPayload", "JobStreamEvent"):
        schema = openapi["components"]["schemas"][name]
        assert schema["properties"]["schema_version"]["const"] == EVENT_SCHEMA_VERSION
        assert "schema_version" in schema["required"]

    # The schema refuses what it should: another version, a payload without its event, an unknown event.
    stream = validator(openapi, "JobStreamEvent")
    good = {"id": 1, "created_at": "2026-01-01T00:00:00Z", "kind": "state", "status": "queued", "progress": 0.0,
            "stage": "queued", "message": None, "job_status": "queued", "job_progress": 0.0, "schema_version": "1"}
    assert errors(stream, good) == []
    assert errors(stream, {**good, "schema_version": "2"}) == ["schema_version: '1' was expected"]
    assert errors(stream, {k: v for k, v in good.items() if k != "job_status"}) == [
        "<root>: 'job_status' is a required property"]
    hook_schema = validator(openapi, "JobWebhookPayload")
    assert any("'event' is a required property" in e for e in errors(hook_schema, {"schema_version": "1"}))


def test_delivered_webhooks_validate_against_the_published_schema(client, alice, model_id, worker,  # noqa: F811
                                                                  receiver):  # noqa: F811
    check = validator(client.get("/openapi.json").json(), "JobWebhookPayload")
    target = receiver()
    secret, job_id = webhook_job(client, alice, model_id, target.url, ["running", "progress", "succeeded"])
    for step in ("running", "progress", "succeeded"):
        advance(job_id, step)
    wait_for(lambda: len(target.requests) >= 3, 60, f"3 webhooks\n{logs(worker)}")
    job_json = client.get(f"/v1/jobs/{job_id}", headers=alice).json()
    for request in target.requests:
        verify_signature(secret, request)
        body = json.loads(request["body"])
        assert errors(check, body) == [], body
        assert body["schema_version"] == EVENT_SCHEMA_VERSION
        assert body["event"] == request["headers"]["modelpress-event"]
        assert body["id"] == job_id
    succeeded = next(json.loads(r["body"]) for r in target.requests if r["headers"]["modelpress-event"] == "succeeded")
    assert {k: v for k, v in succeeded.items() if k not in ENVELOPE} == job_json  # still the job JSON


def test_streamed_events_validate_against_the_published_schema(live_api, alice):  # noqa: F811
    check = validator(httpx.get(f"{live_api}/openapi.json", timeout=10).json(), "JobStreamEvent")
    job_id = new_job("alice")
    thread, frames, meta = stream_in_thread(f"{live_api}/v1/jobs/{job_id}/events", alice)
    wait_for(lambda: frames, 10, "the queued event")
    for step in ("running", "progress", "succeeded"):
        advance(job_id, step)
    thread.join(timeout=15)
    assert meta.get("ended") and meta["status"] == 200
    data = [json.loads(f["data"]) for f in frames if "data" in f]
    assert [d["status"] for d in data] == ["queued", "running", "running", "succeeded"]
    for frame, event in zip([f for f in frames if "data" in f], data):
        assert errors(check, event) == [], event
        assert event["schema_version"] == EVENT_SCHEMA_VERSION
        assert (frame["event"], int(frame["id"])) == (event["kind"], event["id"])

