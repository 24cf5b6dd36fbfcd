from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from app.auth.service import needs_scope
from app.deps import Caller, CallerActor, DbSession
from app.jobs import service as jobs_service
from app.webhooks import service
from app.webhooks.schemas import WebhookDeliveryPublic, WebhookSecretCreated

router = APIRouter(tags=["webhooks"])


@router.post("/webhook-secret", status_code=201, response_model=WebhookSecretCreated,
             openapi_extra=needs_scope("admin"),
             summary="Create or rotate the tenant's webhook signing secret (shown once; admin keys)")
def create_webhook_secret(db: DbSession, caller: Caller, actor: CallerActor):
    secret = service.rotate_secret(db=db, tenant_id=caller.id, actor=actor)
    body = WebhookSecretCreated(secret=secret).model_dump()
    return JSONResponse(body, status_code=201, headers={"Cache-Control": "no-store"})


@router.get("/jobs/{job_id}/deliveries", response_model=list[WebhookDeliveryPublic])
def job_deliveries(job_id: str, db: DbSession, caller: Caller):
    job = jobs_service.get(db=db, tenant_id=caller.id, job_id=job_id)
    return [WebhookDeliveryPublic.model_validate(d) for d in service.deliveries(db=db, job=job)]
