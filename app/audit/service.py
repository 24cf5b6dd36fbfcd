"""The audit log: who did what (key creation and revocation, uploads, job submission and cancellation,
deletions, webhook-secret rotation), written in the same transaction as the action itself, so an action
that rolls back leaves no row and a committed one always has its row."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.common import newest_first_page
from app.dbmodels import AuditEntry


@dataclass(frozen=True)
class Actor:
    """Who acts: a tenant through one of its keys (the API), or the operator (CLI: key_id None)."""

    tenant_id: str | None
    key_id: str | None = None
    client_ip: str | None = None

    @property
    def tenant(self) -> str:
        """The tenant whose resources the action is on; only a key's actor has one (the operator manages keys)."""
        if self.tenant_id is None:
            raise TypeError("the operator acts on no tenant's models, datasets or jobs")
        return self.tenant_id


def record(db: Session, actor: Actor, action: str, *, object_type: str | None = None, object_id: str | None = None,
           tenant_id: str | None = None, **detail: Any) -> AuditEntry:
    """Add an audit row to the session; the caller's commit writes it with the action."""
    entry = AuditEntry(tenant_id=tenant_id or actor.tenant_id, key_id=actor.key_id, action=action,
                       object_type=object_type, object_id=object_id, detail=detail or None,
                       client_ip=actor.client_ip)
    db.add(entry)
    return entry


def list_page(*, db: Session, tenant_id: str, action: str | None, limit: int,
              cursor: str | None) -> tuple[list[AuditEntry], str | None]:
    query = select(AuditEntry).where(AuditEntry.tenant_id == tenant_id)
    if action:
        query = query.where(AuditEntry.action == action)
    return newest_first_page(db, query, AuditEntry, limit=limit, cursor=cursor, id_type=int)
