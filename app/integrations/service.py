"""A tenant's MLflow settings: saved (the URI checked against the egress rules, the secret encrypted), shown
without the secret, deleted; and read back decrypted for the pull (app.integrations.pull) and the worker that
logs a job's run (workers.mlflow_log)."""
from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.orm import Session

from app.audit import service as audit
from app.audit.service import Actor
from app.dbmodels import MlflowSettings, utcnow
from app.errors import MlflowNotConfigured, NotFound
from app.integrations import secrets
from app.integrations.egress import check_uri
from app.integrations.schemas import MlflowSettingsIn, MlflowSettingsPublic
from app.settings import Settings


@dataclass(frozen=True)
class MlflowConnection:
    """What a client needs to talk to the tenant's server, the secret decrypted (kept in memory only)."""

    tracking_uri: str
    username: str | None = None
    password: str | None = None
    token: str | None = None
    registered_model_prefix: str = ""

    def __repr__(self) -> str:  # never the secret, in a log line or a traceback
        return f"MlflowConnection(tracking_uri={self.tracking_uri!r}, username={self.username!r})"


def not_configured(what: str, **extra) -> MlflowNotConfigured:
    return MlflowNotConfigured(f"{what} needs the tenant's MLflow settings: set them with PUT /v1/integrations/mlflow "
                               "(tracking_uri, and username and password or a token)", **extra)


def put(*, db: Session, settings: Settings, actor: Actor, given: MlflowSettingsIn) -> MlflowSettings:
    """Create or replace the tenant's settings. A credential not given is removed: the settings are whole."""
    check_uri(given.tracking_uri, allow_private=settings.mlflow_allow_private, saving=True)
    secret, kind = (given.password, "password") if given.password is not None else (given.token, "token")
    encrypted = secrets.encrypt(settings, secret) if secret is not None else None
    row = db.get(MlflowSettings, actor.tenant, with_for_update=True)
    replaced = row is not None
    if row is None:
        row = MlflowSettings(tenant_id=actor.tenant)
        db.add(row)
    row.tracking_uri, row.username = given.tracking_uri, given.username
    row.credential_kind = kind if secret is not None else None
    row.credential_encrypted = encrypted
    row.registered_model_prefix = given.registered_model_prefix
    row.updated_at = utcnow()
    audit.record(db, actor, "mlflow_settings.replace" if replaced else "mlflow_settings.create", object_type="tenant",
                 object_id=actor.tenant, tracking_uri=given.tracking_uri, credential=row.credential_kind)
    db.commit()
    return row


def get(*, db: Session, tenant_id: str) -> MlflowSettings:
    row = db.get(MlflowSettings, tenant_id)
    if row is None:
        raise NotFound("the tenant has no MLflow settings: set them with PUT /v1/integrations/mlflow",
                       code="mlflow_not_configured")
    return row


def public(row: MlflowSettings) -> MlflowSettingsPublic:
    return MlflowSettingsPublic.model_validate({
        "tracking_uri": row.tracking_uri, "username": row.username, "credential": row.credential_kind,
        "registered_model_prefix": row.registered_model_prefix, "created_at": row.created_at,
        "updated_at": row.updated_at})


def delete(*, db: Session, actor: Actor) -> None:
    row = get(db=db, tenant_id=actor.tenant)
    audit.record(db, actor, "mlflow_settings.delete", object_type="tenant", object_id=actor.tenant)
    db.delete(row)
    db.commit()


def connection(*, db: Session, settings: Settings, tenant_id: str, what: str) -> MlflowConnection:
    """The tenant's server and its credential, decrypted; MlflowNotConfigured (naming `what` needed it) when unset."""
    row = db.get(MlflowSettings, tenant_id)
    if row is None:
        raise not_configured(what)
    secret = secrets.decrypt(settings, row.credential_encrypted) if row.credential_encrypted else None
    return MlflowConnection(tracking_uri=row.tracking_uri, username=row.username,
                            password=secret if row.credential_kind == "password" else None,
                            token=secret if row.credential_kind == "token" else None,
                            registered_model_prefix=row.registered_model_prefix)


def check_job_logging(*, db: Session, tenant_id: str) -> None:
    """At submit: a job with an `mlflow` option needs the tenant's settings (422 mlflow_not_configured)."""
    if db.get(MlflowSettings, tenant_id) is None:
        raise not_configured("a job with an `mlflow` option", field="mlflow")
