"""Database schema. It changes only through an Alembic migration (migrations/versions)."""
from __future__ import annotations

import datetime as dt
import uuid
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from app.formats.text import UNSTORABLE

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

TERMINAL_STATUSES = ("succeeded", "failed", "cancelled")
ACTIVE_STATUSES = ("queued", "running")  # a job in one of these still needs its model and datasets


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def new_id() -> str:
    return str(uuid.uuid4())


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC timestamps on both SQLite (which drops the zone) and Postgres."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime")
        return value.astimezone(dt.UTC) if value is not None else None

    def process_result_value(self, value, dialect):
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        return value


def storable(value: Any) -> Any:
    """`value` with every string (keys too) made storable in PostgreSQL's text and JSONB: NUL and lone surrogates
    (which PostgreSQL refuses) become U+FFFD. Requests with them are refused at the edge (app.edge); this keeps
    what a worker or an upload's inspection writes (node names of a hostile model, say) from failing the write."""
    if isinstance(value, str):
        return UNSTORABLE.sub("\ufffd", value) if UNSTORABLE.search(value) else value
    if isinstance(value, dict):
        return {storable(k): storable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [storable(v) for v in value]
    return value


class Json(TypeDecorator):
    """JSON (JSONB on PostgreSQL) whose strings are made storable on the way in (`storable`)."""

    impl = JSON
    cache_ok = True

    def load_dialect_impl(self, dialect):
        return dialect.type_descriptor(JSONB() if dialect.name == "postgresql" else JSON())

    def process_bind_param(self, value, dialect):
        return storable(value)
BigId = BigInteger().with_variant(Integer(), "sqlite")  # SQLite autoincrements INTEGER only


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map: ClassVar[dict[Any, Any]] = {dt.datetime: UTCDateTime, dict[str, Any]: Json}


class Tenant(Base):
    __tablename__ = "tenants"
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    # Webhook signing secret, stored in plain text: HMAC signing needs the secret itself (a hash would not
    # do), and there is no separate key to encrypt it with. Shown once by POST /v1/webhook-secret.
    webhook_secret: Mapped[str | None] = mapped_column(String(128), default=None)
    # Per-tenant limits; None takes the server's default (app.settings).
    max_concurrent_jobs: Mapped[int | None] = mapped_column(Integer, default=None)
    max_stored_bytes: Mapped[int | None] = mapped_column(BigInteger, default=None)
    requests_per_minute: Mapped[int | None] = mapped_column(Integer, default=None)


class ApiKey(Base):
    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    # Keys are 256-bit random tokens, so a plain sha256 is a safe, fast lookup hash.
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    # What the key may do: read (GET), write (uploads, jobs, deletes), admin (keys, tenant settings).
    scopes: Mapped[list[str]] = mapped_column(Json, default=lambda: ["read", "write"],
                                              server_default=text("'[\"read\", \"write\"]'"))
    expires_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    tenant: Mapped[Tenant] = relationship(lazy="joined")


class Blob(Base):
    """A stored file, addressed by its sha256; models, datasets and artifacts point at blobs."""

    __tablename__ = "blobs"
    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Model(Base):
    __tablename__ = "models"
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(255))
    format: Mapped[str] = mapped_column(String(32))
    sha256: Mapped[str] = mapped_column(ForeignKey("blobs.sha256"), index=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    inspection: Mapped[dict[str, Any]]
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    # A model converted to ONNX by the worker (a Hugging Face folder, a Keras model) points at its upload.
    source_model_id: Mapped[str | None] = mapped_column(ForeignKey("models.id", ondelete="SET NULL"), index=True,
                                                        default=None)


class Dataset(Base):
    """Named arrays (calibration, evaluation, ...) in an .npz or safetensors blob."""

    __tablename__ = "datasets"
    __table_args__ = (Index("ix_datasets_tenant_created", "tenant_id", "created_at", "id"),)
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(255))
    format: Mapped[str] = mapped_column(String(16))  # npz | safetensors
    sha256: Mapped[str] = mapped_column(ForeignKey("blobs.sha256"), index=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    inspection: Mapped[dict[str, Any]]
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("tenant_id", "idempotency_key", name="uq_jobs_tenant_idempotency_key"),
        Index("ix_jobs_tenant_created", "tenant_id", "created_at", "id"),
        Index("ix_jobs_status", "status"),
    )
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    # A finished job outlives its input model; a queued or running one keeps it (delete answers 409).
    model_id: Mapped[str | None] = mapped_column(ForeignKey("models.id", ondelete="SET NULL"), index=True)
    name: Mapped[str | None] = mapped_column(String(255))
    spec: Mapped[dict[str, Any]]
    # "compress" (steps + measurements) or "convert" (an upload in another format exported to ONNX: workers/convert)
    kind: Mapped[str] = mapped_column(String(16), default="compress", server_default="compress")
    queue: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16), default="queued")
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    stage: Mapped[str | None] = mapped_column(String(64))
    message: Mapped[str | None] = mapped_column(Text)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    summary: Mapped[dict[str, Any] | None]
    report: Mapped[dict[str, Any] | None]
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    request_hash: Mapped[str | None] = mapped_column(String(64))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    started_at: Mapped[dt.datetime | None]
    finished_at: Mapped[dt.datetime | None]
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    # Where job events are POSTed, and which ones (None: the terminal states).
    webhook_url: Mapped[str | None] = mapped_column(String(2048), default=None)
    webhook_events: Mapped[list[str] | None] = mapped_column(Json, default=None)
    # Set when retention removed the job's artifacts.
    expired_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    # Last sign of life from the worker running the job; a reaper requeues jobs whose heartbeat is too old.
    heartbeat_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    # The process running the current attempt ("host:pid"), so a redelivered message can tell a dead
    # attempt (its process gone) from a live one (a duplicate message).
    worker_id: Mapped[str | None] = mapped_column(String(255), default=None)


class Worker(Base):
    """A Celery worker as it registered itself when it started (workers.registry): the queues it consumes, the
    targets it serves and the hardware and runtimes it found. It refreshes last_seen_at while it runs and deletes
    its row on a clean shutdown; a row not seen for `worker_stale_s` is a worker gone without saying so (kept, but
    not live: GET /v1/targets and job routing leave it out)."""

    __tablename__ = "workers"
    # Celery's node name (modelpress-123@host), unique among the running workers of a deployment.
    id: Mapped[str] = mapped_column(String(255), primary_key=True)
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    queues: Mapped[list[str]] = mapped_column(Json, default=list)
    # [{runtime, device, precision, queue}] (app.targets.schemas.queue_for names each queue)
    targets: Mapped[list[dict[str, Any]]] = mapped_column(Json, default=list)
    # What workers.targets.probe found: CPU (name, cores, ISA flags), memory, GPUs, runtime versions and devices.
    capabilities: Mapped[dict[str, Any]]
    started_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    last_seen_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class JobDataset(Base):
    """A dataset a job uses, in one role (e.g. "calibration"); delete answers 409 while the job is active."""

    __tablename__ = "job_datasets"
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    role: Mapped[str] = mapped_column(String(64), primary_key=True)
    dataset_id: Mapped[str] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"), index=True)


class JobModel(Base):
    """Another uploaded model a job uses, in one role (e.g. a distillation student); the model cannot be
    deleted while the job is active."""

    __tablename__ = "job_models"
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    role: Mapped[str] = mapped_column(String(64), primary_key=True)
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)


class JobEvent(Base):
    __tablename__ = "job_events"
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    kind: Mapped[str] = mapped_column(String(16))  # state | progress
    status: Mapped[str] = mapped_column(String(16))
    progress: Mapped[float] = mapped_column(Float)
    stage: Mapped[str | None] = mapped_column(String(64))
    message: Mapped[str | None] = mapped_column(Text)


class WebhookDelivery(Base):
    """One attempt to POST a job event to the job's webhook_url; the attempts of one event share delivery_id."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (Index("ix_webhook_deliveries_job_created", "job_id", "created_at", "id"),)
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    delivery_id: Mapped[str] = mapped_column(String(36), index=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    event: Mapped[str] = mapped_column(String(16))
    url: Mapped[str] = mapped_column(String(2048))
    attempt: Mapped[int] = mapped_column(Integer)
    status_code: Mapped[int | None]
    error: Mapped[str | None] = mapped_column(Text)
    duration_ms: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    # When the next attempt is due; None when this attempt delivered or was the last one.
    next_attempt_at: Mapped[dt.datetime | None]
    delivered: Mapped[bool] = mapped_column(Boolean, default=False)


class Artifact(Base):
    __tablename__ = "artifacts"
    __table_args__ = (UniqueConstraint("job_id", "name", name="uq_artifacts_job_name"),)
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(255))
    kind: Mapped[str] = mapped_column(String(32))  # model | report
    sha256: Mapped[str] = mapped_column(ForeignKey("blobs.sha256"), index=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    content_type: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Environment(Base):
    """A machine and software stack measurements ran on, stored once.

    `id` is the sha256 of the fingerprint's canonical JSON (app.measurements.fingerprint), so every
    worker that measures on the same stack points its rows at the same environment.
    """

    __tablename__ = "environments"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    fingerprint: Mapped[dict[str, Any]]
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Measurement(Base):
    """One row per model x provider x batch size x metric."""

    __tablename__ = "measurements"
    __table_args__ = (Index("ix_measurements_tenant_model", "tenant_id", "model_sha256"),)
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    model_role: Mapped[str] = mapped_column(String(32))  # baseline | result
    model_sha256: Mapped[str | None] = mapped_column(String(64))
    provider: Mapped[str] = mapped_column(String(64))
    batch_size: Mapped[int | None]
    metric: Mapped[str] = mapped_column(String(64))
    value: Mapped[float] = mapped_column(Float)
    unit: Mapped[str] = mapped_column(String(16))
    # None for rows measured before environments were recorded.
    environment_id: Mapped[str | None] = mapped_column(String(64), ForeignKey("environments.id"), index=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    environment: Mapped[Environment | None] = relationship(lazy="joined")


class AuditEntry(Base):
    """Who did what: key creation and revocation, uploads, job submission, deletion."""

    __tablename__ = "audit_log"
    __table_args__ = (Index("ix_audit_log_tenant_created", "tenant_id", "created_at", "id"),)
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str | None] = mapped_column(ForeignKey("tenants.id", ondelete="SET NULL"))
    key_id: Mapped[str | None] = mapped_column(String(36))
    action: Mapped[str] = mapped_column(String(64))
    object_type: Mapped[str | None] = mapped_column(String(32))
    object_id: Mapped[str | None] = mapped_column(String(64))
    detail: Mapped[dict[str, Any] | None] = mapped_column(Json, default=None)
    client_ip: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class MlflowSettings(Base):
    """A tenant's MLflow tracking server (app.integrations): where jobs log their runs and models are pulled from.

    The password or token is stored encrypted (Fernet, app.integrations.secrets) and never served back."""

    __tablename__ = "mlflow_settings"
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True)
    tracking_uri: Mapped[str] = mapped_column(String(2048))
    username: Mapped[str | None] = mapped_column(String(255), default=None)
    # "password" (HTTP basic, with username) or "token" (bearer); None: no credential.
    credential_kind: Mapped[str | None] = mapped_column(String(16), default=None)
    credential_encrypted: Mapped[str | None] = mapped_column(Text, default=None)
    # Prepended to each job's register_as (a team's namespace in a shared registry).
    registered_model_prefix: Mapped[str] = mapped_column(String(255), default="", server_default="")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)
