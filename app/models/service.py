"""Models: upload (validate, store once per content), list, get, delete."""
from __future__ import annotations

from pathlib import Path

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from app.audit import service as audit
from app.audit.service import Actor
from app.blobs import keep_upload, release_blob
from app.common import get_owned_or_404, newest_first_page
from app.dbmodels import ACTIVE_STATUSES, Job, JobModel, Model
from app.errors import ModelInUse, ModelNotFound
from app.limits import check_upload_fits
from app.models.onnx_files import Limits, validate_upload
from app.settings import Settings
from app.store import LocalStore
from app.uploads import Received


def limits(settings: Settings) -> Limits:
    return Limits(max_unpacked_bytes=settings.max_unpacked_bytes)


def create_from_upload(
    *, db: Session, store: LocalStore, settings: Settings, actor: Actor, received: Received, workdir: Path
) -> Model:
    """Validate a spooled upload, then record it. Nothing is kept when anything fails."""
    fmt, inspection = validate_upload(
        received.path, filename=received.filename, workdir=workdir / "check", limits=limits(settings)
    )
    name = (received.fields.get("name") or Path(received.filename).name)[:255]
    return keep_upload(
        db=db, store=store, received=received,
        check=lambda: check_upload_fits(db, actor.tenant_id, settings, received.size_bytes),
        make_row=lambda sha, size: Model(tenant_id=actor.tenant_id, name=name, format=fmt, sha256=sha,
                                         size_bytes=size, inspection=inspection),
        before_commit=lambda model: audit.record(db, actor, "model.upload", object_type="model", object_id=model.id,
                                                 name=name, sha256=model.sha256, size_bytes=model.size_bytes))


def get(*, db: Session, tenant_id: str, model_id: str) -> Model:
    return get_owned_or_404(db, Model, tenant_id=tenant_id, object_id=model_id, error=ModelNotFound)


def list_page(*, db: Session, tenant_id: str, limit: int, cursor: str | None) -> tuple[list[Model], str | None]:
    query = select(Model).where(Model.tenant_id == tenant_id)
    return newest_first_page(db, query, Model, limit=limit, cursor=cursor)


def delete(*, db: Session, store: LocalStore, actor: Actor, model_id: str) -> None:
    # Locked, so that a job cannot be queued on it between the check and the delete.
    model = get_owned_or_404(db, Model, tenant_id=actor.tenant_id, object_id=model_id, error=ModelNotFound, lock=True)
    # Active jobs on this model, or that use it in another role (a distillation student).
    linked = select(JobModel.job_id).where(JobModel.model_id == model.id)
    active = db.scalar(
        select(func.count()).select_from(Job)
        .where(or_(Job.model_id == model.id, Job.id.in_(linked)), Job.status.in_(ACTIVE_STATUSES))
    )
    if active:
        raise ModelInUse(f"model {model.id} is used by {active} queued or running job(s); cancel them or wait")
    sha = model.sha256
    audit.record(db, actor, "model.delete", object_type="model", object_id=model.id, name=model.name)
    db.delete(model)
    db.commit()
    release_blob(db=db, store=store, sha256=sha)


def download_filename(model: Model) -> str:
    suffix = ".zip" if model.format == "onnx-zip" else ".onnx"
    stem = Path(model.name).name
    return stem if stem.endswith(suffix) else f"{Path(stem).stem or 'model'}{suffix}"
