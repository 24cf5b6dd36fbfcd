"""Measurements: the figures a job measured, by job or by stored model, each with its environment."""
from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.common import newest_first_page
from app.dbmodels import Measurement
from app.jobs import service as jobs_service
from app.models import service as models_service


def _filtered(query, *, metric: str | None, provider: str | None, batch_size: int | None,
              model_role: str | None = None):
    if metric is not None:
        query = query.where(Measurement.metric == metric)
    if provider is not None:
        query = query.where(Measurement.provider == provider)
    if batch_size is not None:
        query = query.where(Measurement.batch_size == batch_size)
    if model_role is not None:
        query = query.where(Measurement.model_role == model_role)
    return query


def for_job(
    *, db: Session, tenant_id: str, job_id: str, metric: str | None = None, provider: str | None = None,
    batch_size: int | None = None, model_role: str | None = None,
) -> list[Measurement]:
    """Every measurement of one of the caller's jobs, in the order they were stored.

    Another tenant's job is a 404 (job_not_found), like a missing one.
    """
    job = jobs_service.get(db=db, tenant_id=tenant_id, job_id=job_id)
    query = _filtered(select(Measurement).where(Measurement.job_id == job.id),
                      metric=metric, provider=provider, batch_size=batch_size, model_role=model_role)
    return list(db.scalars(query.order_by(Measurement.id)))


def for_model_page(
    *, db: Session, tenant_id: str, model_id: str, limit: int, cursor: str | None, metric: str | None = None,
    provider: str | None = None, batch_size: int | None = None,
) -> tuple[list[Measurement], str | None]:
    """One page, newest first, of the caller's measurements of a stored model, across all the caller's jobs.

    A row belongs to the model when it measured the model's content (its sha256): as a job's baseline, or as
    the result or a step of a job that produced the same bytes. Another tenant's model is a 404
    (model_not_found), and another tenant's rows of the same content are never shown.
    """
    model = models_service.get(db=db, tenant_id=tenant_id, model_id=model_id)
    query = _filtered(
        select(Measurement).where(Measurement.tenant_id == tenant_id, Measurement.model_sha256 == model.sha256),
        metric=metric, provider=provider, batch_size=batch_size,
    )
    return newest_first_page(db, query, Measurement, limit=limit, cursor=cursor, id_type=int)
