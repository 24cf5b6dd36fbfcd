from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from app.audit import service
from app.audit.schemas import AuditEntryPublic, AuditPage
from app.auth.service import needs_scope
from app.deps import Caller, DbSession

router = APIRouter(prefix="/audit", tags=["audit"])


@router.get("", response_model=AuditPage, openapi_extra=needs_scope("admin"),
            summary="The tenant's audit log, newest first (admin keys)")
def list_audit(
    db: DbSession,
    caller: Caller,
    action: Annotated[str | None, Query(max_length=64, description="Only this action, e.g. job.submit")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    cursor: str | None = None,
):
    items, next_cursor = service.list_page(db=db, tenant_id=caller.id, action=action, limit=limit, cursor=cursor)
    return AuditPage(items=[AuditEntryPublic.model_validate(e) for e in items], next_cursor=next_cursor)
