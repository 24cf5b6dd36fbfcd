from __future__ import annotations

import hashlib
import logging
from typing import Annotated, Literal

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import ValidationError

from app.deps import AppSettings, Caller, CallerActor, DbSession, Store
from app.downloads import blob_response
from app.jobs import replay, service, sse
from app.jobs.schemas import ArtifactPublic, JobCreate, JobEventPublic, JobPage, JobPublic
from app.jobs.state import to_public
from app.readcache import JOBS, JobView, get_cache
from app.reports import AnyReport, load_report

router = APIRouter(prefix="/jobs", tags=["jobs"])
log = logging.getLogger(__name__)

# Event ids are BIGINTs; a larger cursor is a 422, not a database error.
MAX_EVENT_ID = 2**63 - 1
Status = Literal["queued", "running", "succeeded", "failed", "cancelled"]


def job_view(job) -> JobView:
    body = to_public(job).model_dump_json().encode()
    return JobView(tenant_id=job.tenant_id, body=body, etag='"' + hashlib.sha256(body).hexdigest()[:32] + '"')


def _job_response(job, request: Request, status_code: int = 200, headers: dict | None = None) -> Response:
    return _view_response(job_view(job), request, status_code, headers)


def _view_response(view: JobView, request: Request, status_code: int = 200, headers: dict | None = None) -> Response:
    headers = {"ETag": view.etag, "Cache-Control": "no-cache", **(headers or {})}
    if status_code == 200 and view.etag in {t.strip() for t in request.headers.get("if-none-match", "").split(",")}:
        return Response(status_code=304, headers=headers)
    return Response(content=view.body, status_code=status_code, media_type="application/json", headers=headers)


@router.post("", status_code=202, response_model=JobPublic, summary="Submit a compression job")
def create_job(
    spec: JobCreate,
    request: Request,
    db: DbSession,
    actor: CallerActor,
    settings: AppSettings,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
):
    job, _created = service.create(db=db, settings=settings, actor=actor, spec=spec, idempotency_key=idempotency_key)
    return _job_response(job, request, status_code=202, headers={"Location": f"/v1/jobs/{job.id}"})


@router.get("", response_model=JobPage)
def list_jobs(
    db: DbSession,
    caller: Caller,
    status: Status | None = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: str | None = None,
):
    items, next_cursor = service.list_page(db=db, tenant_id=caller.id, status=status, limit=limit, cursor=cursor)
    return JobPage(items=[to_public(j) for j in items], next_cursor=next_cursor)


@router.get("/{job_id}", response_model=JobPublic, responses={304: {"description": "Not modified (ETag)"}})
async def get_job(job_id: str, request: Request, db: DbSession, caller: Caller):
    # The polling route: served from this process's read cache while no notification says the job changed.
    cache = get_cache()
    view = cache.get(JOBS, job_id)
    if view is None or view.tenant_id != caller.id:
        view = await cache.fetch(JOBS, job_id, scope=caller.id,
                                 load=lambda: job_view(service.get(db=db, tenant_id=caller.id, job_id=job_id)))
    return _view_response(view, request)


@router.post("/{job_id}/cancel", status_code=202, response_model=JobPublic)
def cancel_job(job_id: str, request: Request, db: DbSession, actor: CallerActor):
    return _job_response(service.cancel(db=db, actor=actor, job_id=job_id), request, status_code=202)


@router.post("/{job_id}/replay", status_code=202, response_model=JobPublic,
             summary="Run a finished job again with its recorded recipe",
             description="A new job on the same model and datasets (by id; their sha256 is in the original's "
                         "`report.recipe`) with the same steps, goal, target and evaluation, linked to the original "
                         "(`replay_of`). Its report's `replay` section says what differed (library versions, "
                         "environment, method versions), how far the figures moved and whether each model artifact "
                         "is byte-identical. 409 job_not_replayable for a job that did not succeed or a conversion; "
                         "409 replay_model_deleted (replay_dataset_deleted) when an input was deleted since: "
                         "nothing is created.")
def replay_job(
    job_id: str,
    request: Request,
    db: DbSession,
    actor: CallerActor,
    settings: AppSettings,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
):
    job, _created = replay.replay(db=db, settings=settings, actor=actor, job_id=job_id, idempotency_key=idempotency_key)
    return _job_response(job, request, status_code=202, headers={"Location": f"/v1/jobs/{job.id}"})


@router.get("/{job_id}/events", response_model=list[JobEventPublic],
            responses={200: {"content": {sse.MEDIA_TYPE: {}},
                             "description": "JSON list, or server-sent events with `Accept: text/event-stream`"}})
def job_events(
    job_id: str,
    request: Request,
    db: DbSession,
    caller: Caller,
    after: Annotated[int, Query(ge=0, le=MAX_EVENT_ID)] = 0,
    last_event_id: Annotated[int | None, Header(ge=0, le=MAX_EVENT_ID)] = None,
):
    after = max(after, last_event_id or 0)
    if sse.wants_stream(request.headers.get("accept")):
        job = service.get(db=db, tenant_id=caller.id, job_id=job_id)  # 404 before any byte is streamed
        # The request's session would stay open for the whole stream: release its connection now.
        db.close()
        return StreamingResponse(sse.stream(job_id=job.id, after=after), media_type=sse.MEDIA_TYPE,
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return [JobEventPublic.model_validate(e) for e in service.events(db=db, tenant_id=caller.id, job_id=job_id, after=after)]


@router.get("/{job_id}/report", response_model=AnyReport,
            description="The job's report. `report_version` 2; a report without it was written as version 1 "
                        "(before versioning) and is served as it was stored.")
def job_report(job_id: str, db: DbSession, caller: Caller):
    stored = service.report(db=db, tenant_id=caller.id, job_id=job_id)
    try:
        # Validated, then serialized with exactly the fields it was stored with.
        return JSONResponse(load_report(stored).model_dump(mode="json"))
    except ValidationError as exc:
        # A report the models do not describe still belongs to its owner: served as stored, the drift logged.
        log.warning("job %s: its stored report does not match the report models: %s", job_id, exc)
        return JSONResponse(stored)


@router.get("/{job_id}/artifacts", response_model=list[ArtifactPublic])
def job_artifacts(job_id: str, db: DbSession, caller: Caller):
    return [ArtifactPublic.model_validate(a) for a in service.artifacts(db=db, tenant_id=caller.id, job_id=job_id)]


@router.get("/{job_id}/artifacts/{name}", response_class=FileResponse)
def job_artifact(job_id: str, name: str, request: Request, db: DbSession, caller: Caller, store: Store):
    artifact = service.artifact(db=db, tenant_id=caller.id, job_id=job_id, name=name)
    return blob_response(request, store=store, sha256=artifact.sha256, size=artifact.size_bytes,
                         media_type=artifact.content_type, filename=artifact.name)
