from __future__ import annotations

from fastapi import APIRouter

from app.deps import AppSettings, Caller, DbSession
from app.targets import service
from app.targets.schemas import TargetsPublic

router = APIRouter(prefix="/targets", tags=["targets"])


@router.get("", response_model=TargetsPublic,
            summary="What the deployment's live workers serve: runtime, device, precision, versions, hardware")
def list_targets(db: DbSession, caller: Caller, settings: AppSettings) -> TargetsPublic:
    return service.listing(db=db, settings=settings)
