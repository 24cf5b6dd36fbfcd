"""Measurement routes. They hang under /jobs/{id} and /models/{id}, the resources they belong to."""
from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from app.deps import Caller, DbSession
from app.measurements import service
from app.measurements.schemas import JobMeasurements, MeasurementPage, MeasurementPublic

router = APIRouter(tags=["measurements"])

Metric = Annotated[str | None, Query(max_length=64, description="Only this metric, e.g. p50_ms")]
Provider = Annotated[str | None, Query(max_length=64, description="Only this execution provider")]
BatchSize = Annotated[int | None, Query(ge=1, le=2**31 - 1, description="Only this batch size")]


@router.get("/jobs/{job_id}/measurements", response_model=JobMeasurements,
            summary="Every figure a job measured, with its environment")
def job_measurements(
    job_id: str,
    db: DbSession,
    caller: Caller,
    metric: Metric = None,
    provider: Provider = None,
    batch_size: BatchSize = None,
    model_role: Annotated[str | None, Query(max_length=32, description="baseline, result or step-N")] = None,
):
    rows = service.for_job(db=db, tenant_id=caller.id, job_id=job_id, metric=metric, provider=provider,
                           batch_size=batch_size, model_role=model_role)
    return JobMeasurements(items=[MeasurementPublic.model_validate(r) for r in rows])


@router.get("/models/{model_id}/measurements", response_model=MeasurementPage,
            summary="A stored model's figures across all the caller's jobs, newest first")
def model_measurements(
    model_id: str,
    db: DbSession,
    caller: Caller,
    metric: Metric = None,
    provider: Provider = None,
    batch_size: BatchSize = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 200,
    cursor: str | None = None,
):
    rows, next_cursor = service.for_model_page(
        db=db, tenant_id=caller.id, model_id=model_id, limit=limit, cursor=cursor, metric=metric,
        provider=provider, batch_size=batch_size,
    )
    return MeasurementPage(items=[MeasurementPublic.model_validate(r) for r in rows], next_cursor=next_cursor)
