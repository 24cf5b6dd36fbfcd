"""Models: upload (validate, store once per content), list, get, delete."""
from __future__ import annotations

from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.common import decode_cursor, encode_cursor, get_owned_or_404
from app.dbmodels import Artifact, Blob, Dataset, Job, Model
from app.errors import ModelInUse, ModelNotFound
from app.models.onnx_files import Limits, validate_upload
from app.settings import Settings
from app.store import LocalStore
from app.uploads import Received

ACTIVE_STATUSES = ("queued", "running")


def limits(settings: Settings) -> Limits:
    return Limits(max_unpacked_bytes=settings.max_unpacked_bytes)


def create_from_upload(
    *, db: Session, store: LocalStore, settings: Settings, tenant_id: str, received: Received, workdir: Path
) -> Model:
    """Validate a spooled upload, then record it. Nothing is kept when anything fails."""
    fmt, inspection = validate_upload(
        received.path, filename=received.filename, workdir=workdir / "check", limits=limits(settings)
    )
    name = (received.fields.get("name") or Path(received.filename).name)[:255]
    sha, size, created_file = store.put(received.path, received.sha256)
    try:
        if db.get(Blob, sha) is None:
            db.add(Blob(sha256=sha, size_bytes=size))
            db.flush()  # the model row references the blob row
        model = Model(tenant_id=tenant_id, name=name, format=fmt, sha256=sha, size_bytes=size, inspection=inspection)
        db.add(model)
        db.commit()
    except BaseException:
        db.rollback()
        if created_file and not blob_referenced(db, sha):
            store.delete(sha)
        raise
    return model


def blob_referenced(db: Session, sha256: str) -> bool:
    """Whether any model, dataset or artifact still points at the blob."""
    return any(
        db.scalar(select(func.count()).select_from(table).where(table.sha256 == sha256))
        for table in (Model, Dataset, Artifact)
    )


def release_blob(*, db: Session, store: LocalStore, sha256: str) -> None:
    """Drop a blob nothing points at any more (row first, file after the commit)."""
    if blob_referenced(db, sha256):
        return
    blob = db.get(Blob, sha256)
    if blob is not None:
        db.delete(blob)
        db.commit()
    store.delete(sha256)


def get(*, db: Session, tenant_id: str, model_id: str) -> Model:
    return get_owned_or_404(db, Model, tenant_id=tenant_id, object_id=model_id, error=ModelNotFound)


def list_page(*, db: Session, tenant_id: str, limit: int, cursor: str | None) -> tuple[list[Model], str | None]:
    query = select(Model).where(Model.tenant_id == tenant_id)
    if cursor:
        created_at, last_id = decode_cursor(cursor)
        query = query.where(
            (Model.created_at < created_at) | ((Model.created_at == created_at) & (Model.id < last_id))
        )
    rows = list(db.scalars(query.order_by(Model.created_at.desc(), Model.id.desc()).limit(limit + 1)))
    next_cursor = encode_cursor(rows[limit - 1].created_at, rows[limit - 1].id) if len(rows) > limit else None
    return rows[:limit], next_cursor


def delete(*, db: Session, store: LocalStore, tenant_id: str, model_id: str) -> None:
    model = get(db=db, tenant_id=tenant_id, model_id=model_id)
    # Lock the model row so a job cannot be queued on it between the check and the delete.
    db.execute(select(Model.id).where(Model.id == model.id).with_for_update())
    active = db.scalar(
        select(func.count()).select_from(Job).where(Job.model_id == model.id, Job.status.in_(ACTIVE_STATUSES))
    )
    if active:
        raise ModelInUse(f"model {model.id} is used by {active} queued or running job(s); cancel them or wait")
    sha = model.sha256
    db.delete(model)
    db.commit()
    release_blob(db=db, store=store, sha256=sha)


def download_filename(model: Model) -> str:
    suffix = ".zip" if model.format == "onnx-zip" else ".onnx"
    stem = Path(model.name).name
    return stem if stem.endswith(suffix) else f"{Path(stem).stem or 'model'}{suffix}"
