"""Models: upload (validate, store once per content), list, get, delete."""
from __future__ import annotations

import logging
from pathlib import Path

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from app import downloads
from app.audit import service as audit
from app.audit.service import Actor
from app.blobs import keep_upload, release_blob
from app.common import get_owned_or_404, newest_first_page
from app.dbmodels import ACTIVE_STATUSES, Job, JobModel, Model, storable
from app.errors import ConversionFailed, ConversionPending, ModelInUse, ModelNotFound
from app.formats.huggingface import check_task_field
from app.formats.onnx_files import validate_upload
from app.integrations import pull as mlflow_pull
from app.integrations import service as integrations
from app.integrations.schemas import MlflowModelPull
from app.jobs.state import set_status
from app.limits import check_upload_fits
from app.models.schemas import ConversionPublic, ModelPublic
from app.queue import enqueue_job
from app.settings import Settings
from app.store import ArtifactStore
from app.uploads import Quota, Received

log = logging.getLogger(__name__)
# Formats the workers run as they are; any other stored format is converted to one of these first.
ONNX_FORMATS = ("onnx", "onnx-zip")


def create_from_upload(
    *, db: Session, store: ArtifactStore, settings: Settings, actor: Actor, received: Received, workdir: Path,
    origin: dict | None = None,
) -> Model:
    """Validate a spooled upload, then record it. Nothing is kept when anything fails.

    A model in another framework's format (a Hugging Face folder) gets a conversion job in the same
    transaction, enqueued after commit (workers/convert). `origin`: where a model pulled from elsewhere came from
    ({"mlflow": {...}}), kept in its inspection and its audit entry."""
    task = check_task_field(received.fields.get("task"))
    fmt, inspection = validate_upload(
        received.path, filename=received.filename, workdir=workdir / "check", limits=settings.file_limits(), task=task
    )
    inspection = inspection | (origin or {})
    name = (received.fields.get("name") or Path(received.filename).name)[:255]
    conversion: list[Job] = []

    def before_commit(model: Model) -> None:
        audit.record(db, actor, "model.upload", object_type="model", object_id=model.id,
                     name=name, sha256=model.sha256, size_bytes=model.size_bytes, **(origin or {}))
        if fmt not in ONNX_FORMATS:
            conversion.append(_queue_conversion(db, settings, model, task=inspection.get("task")))

    model = keep_upload(
        db=db, store=store, received=received,
        check=lambda: check_upload_fits(db, actor.tenant, settings, received.size_bytes),
        make_row=lambda sha, size: Model(tenant_id=actor.tenant, name=name, format=fmt, sha256=sha,
                                         size_bytes=size, inspection=storable(inspection)),
        before_commit=before_commit)
    for job in conversion:
        # Enqueue after commit. A lost message is not lost work: the reaper re-sends queued jobs (workers.recovery).
        try:
            enqueue_job(job.id, job.queue)
        except Exception:
            log.exception("could not enqueue conversion job %s; the reaper will re-send it", job.id)
    return model


def create_from_mlflow(
    *, db: Session, store: ArtifactStore, settings: Settings, actor: Actor, pull: MlflowModelPull, workdir: Path,
    quota: Quota | None,
) -> Model:
    """Pull a model from the tenant's MLflow registry (ONNX flavour only) and keep it as an upload is kept: validated,
    stored once per content, nothing left behind on a refusal."""
    connection = integrations.connection(db=db, settings=settings, tenant_id=actor.tenant,
                                         what="pulling a model from MLflow")
    db.rollback()  # no transaction stays open while the model downloads
    budget = mlflow_pull.Budget(settings.max_upload_bytes, quota.left_bytes if quota else None,
                                quota.error if quota else None)
    pulled = mlflow_pull.pull(connection, pull.mlflow_uri, dest=workdir / "mlflow", budget=budget,
                              allow_private=settings.mlflow_allow_private)
    received = Received(pulled.path, pulled.filename, pulled.sha256, pulled.size_bytes,
                        {"name": pull.name or pulled.name})
    return create_from_upload(db=db, store=store, settings=settings, actor=actor, received=received, workdir=workdir,
                              origin={"mlflow": pulled.origin})


def _queue_conversion(db: Session, settings: Settings, model: Model, *, task: str | None) -> Job:
    job = Job(tenant_id=model.tenant_id, model_id=model.id, kind="convert", name=f"convert {model.name}"[:255],
              queue=settings.default_queue, spec={"convert": {"format": model.format, "task": task}},
              status="queued", progress=0.0, stage="queued")
    db.add(job)
    db.flush()
    set_status(db, job, "queued", message="conversion to ONNX waiting for a worker")
    return job


def public(*, db: Session, model: Model) -> ModelPublic:
    state = conversion(db=db, model=model)
    return ModelPublic.model_validate(model).model_copy(
        update={"conversion": ConversionPublic.model_validate(state) if state else None})


def conversion(*, db: Session, model: Model) -> dict | None:
    """The conversion of an upload in another format: its job's state and, once done, the ONNX model's id."""
    if model.format in ONNX_FORMATS:
        return None
    job = db.scalar(select(Job).where(Job.model_id == model.id, Job.kind == "convert")
                    .order_by(Job.created_at.desc(), Job.id.desc()).limit(1))
    converted = db.scalar(select(Model.id).where(Model.source_model_id == model.id)
                          .order_by(Model.created_at.desc()).limit(1))
    if job is None:
        return {"status": "succeeded" if converted else "unknown", "job_id": None, "converted_model_id": converted,
                "error": None}
    return {"status": job.status, "job_id": job.id, "converted_model_id": converted,
            "error": {"code": job.error_code, "message": job.error_message} if job.error_code else None}


def converted_for_use(*, db: Session, model: Model, lock: bool = False) -> Model:
    """The ONNX model to use for `model`: itself, or, for an upload in another format, its conversion.

    409 conversion_pending while the conversion runs; 422 conversion_failed (with the reason) when it failed."""
    state = conversion(db=db, model=model)
    if state is None:
        return model
    if state["converted_model_id"]:
        query = select(Model).where(Model.id == state["converted_model_id"])
        return db.scalars(query.with_for_update() if lock else query).one()
    if state["status"] in ACTIVE_STATUSES:
        raise ConversionPending(f"model {model.id} is being converted to ONNX (job {state['job_id']}, "
                                f"{state['status']}); retry when GET /v1/models/{model.id} shows its conversion "
                                "succeeded", job_id=state["job_id"])
    error = state["error"] or {}
    raise ConversionFailed(f"model {model.id} could not be converted to ONNX: "
                           f"{error.get('message') or 'its conversion ' + state['status']}",
                           job_id=state["job_id"], reason_code=error.get("code"))


def get(*, db: Session, tenant_id: str, model_id: str) -> Model:
    return get_owned_or_404(db, Model, tenant_id=tenant_id, object_id=model_id, error=ModelNotFound)


def list_page(*, db: Session, tenant_id: str, limit: int, cursor: str | None) -> tuple[list[Model], str | None]:
    query = select(Model).where(Model.tenant_id == tenant_id)
    return newest_first_page(db, query, Model, limit=limit, cursor=cursor)


def delete(*, db: Session, store: ArtifactStore, actor: Actor, model_id: str) -> None:
    # Locked, so that a job cannot be queued on it between the check and the delete.
    model = get_owned_or_404(db, Model, tenant_id=actor.tenant, object_id=model_id, error=ModelNotFound, lock=True)
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
    return downloads.download_filename(model.name, ".onnx" if model.format == "onnx" else ".zip", "model")
