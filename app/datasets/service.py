"""Datasets: upload (validate, store once per content), list, get, download, delete."""
from __future__ import annotations

from pathlib import Path

from sqlalchemy import distinct, func, select
from sqlalchemy.orm import Session

from app import downloads
from app.audit import service as audit
from app.audit.service import Actor
from app.blobs import keep_upload, release_blob
from app.common import get_owned_or_404, newest_first_page
from app.dbmodels import ACTIVE_STATUSES, Dataset, Job, JobDataset, storable
from app.errors import DatasetInUse, DatasetNotFound
from app.formats.dataset_files import format_for, inspect_dataset, read_specs
from app.limits import check_upload_fits
from app.settings import Settings
from app.store import ArtifactStore
from app.uploads import Received


def create_from_upload(
    *, db: Session, store: ArtifactStore, settings: Settings, actor: Actor, received: Received
) -> Dataset:
    """Validate a spooled upload (every check of the workers' loader, in bounded memory), then record it.
    Nothing is kept when anything fails."""
    fmt = format_for(received.filename)
    inspection = inspect_dataset(read_specs(received.path, fmt, max_unpacked_bytes=settings.max_unpacked_bytes))
    name = (received.fields.get("name") or Path(received.filename).name)[:255]
    return keep_upload(
        db=db, store=store, received=received,
        check=lambda: check_upload_fits(db, actor.tenant, settings, received.size_bytes),
        make_row=lambda sha, size: Dataset(tenant_id=actor.tenant, name=name, format=fmt, sha256=sha,
                                           size_bytes=size, inspection=storable(inspection)),
        before_commit=lambda dataset: audit.record(db, actor, "dataset.upload", object_type="dataset",
                                                   object_id=dataset.id, name=name, sha256=dataset.sha256,
                                                   size_bytes=dataset.size_bytes))


def get(*, db: Session, tenant_id: str, dataset_id: str) -> Dataset:
    return get_owned_or_404(db, Dataset, tenant_id=tenant_id, object_id=dataset_id, error=DatasetNotFound)


def get_for_job(*, db: Session, tenant_id: str, dataset_id: str) -> Dataset:
    """The caller's dataset, row-locked until commit so a concurrent delete cannot drop it from under a new job."""
    return get_owned_or_404(db, Dataset, tenant_id=tenant_id, object_id=dataset_id, error=DatasetNotFound, lock=True)


def list_page(*, db: Session, tenant_id: str, limit: int, cursor: str | None) -> tuple[list[Dataset], str | None]:
    query = select(Dataset).where(Dataset.tenant_id == tenant_id)
    return newest_first_page(db, query, Dataset, limit=limit, cursor=cursor)


def delete(*, db: Session, store: ArtifactStore, actor: Actor, dataset_id: str) -> None:
    """Delete a dataset no queued or running job uses (409 otherwise); free its blob when nothing else uses it."""
    dataset = get_for_job(db=db, tenant_id=actor.tenant, dataset_id=dataset_id)
    active = db.scalar(
        select(func.count(distinct(JobDataset.job_id)))
        .select_from(JobDataset)
        .join(Job, Job.id == JobDataset.job_id)
        .where(JobDataset.dataset_id == dataset.id, Job.status.in_(ACTIVE_STATUSES))
    )
    if active:
        raise DatasetInUse(f"dataset {dataset.id} is used by {active} queued or running job(s); cancel them or wait")
    sha = dataset.sha256
    audit.record(db, actor, "dataset.delete", object_type="dataset", object_id=dataset.id, name=dataset.name)
    db.delete(dataset)  # the database drops its job_datasets links of finished jobs (ON DELETE CASCADE)
    db.commit()
    release_blob(db=db, store=store, sha256=sha)


def download_filename(dataset: Dataset) -> str:
    return downloads.download_filename(dataset.name, f".{dataset.format}", "dataset")
