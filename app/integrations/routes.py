"""The tenant's MLflow settings: PUT and DELETE with admin keys (they hold a credential), GET without the secret."""
from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from app.auth.service import needs_scope
from app.deps import AppSettings, Caller, CallerActor, DbSession
from app.errors import PayloadTooLarge
from app.integrations import service
from app.integrations.schemas import MlflowModelPull, MlflowSettingsIn, MlflowSettingsPublic

router = APIRouter(prefix="/integrations", tags=["integrations"])
NO_STORE = {"Cache-Control": "no-store"}


@router.put("/mlflow", response_model=MlflowSettingsPublic, openapi_extra=needs_scope("admin"),
            summary="Set the tenant's MLflow tracking server and credential (the secret is stored encrypted and "
            "never shown again; admin keys)")
def put_mlflow(given: MlflowSettingsIn, db: DbSession, actor: CallerActor, settings: AppSettings):
    row = service.put(db=db, settings=settings, actor=actor, given=given)
    return JSONResponse(service.public(row).model_dump(mode="json"), headers=NO_STORE)


@router.get("/mlflow", response_model=MlflowSettingsPublic,
            summary="The tenant's MLflow settings: the URI, the user, and which credential is set (never the secret)")
def get_mlflow(db: DbSession, caller: Caller):
    return JSONResponse(service.public(service.get(db=db, tenant_id=caller.id)).model_dump(mode="json"),
                        headers=NO_STORE)


@router.delete("/mlflow", status_code=204, openapi_extra=needs_scope("admin"),
               summary="Remove the tenant's MLflow settings and credential (admin keys)")
def delete_mlflow(db: DbSession, actor: CallerActor):
    service.delete(db=db, actor=actor)
    return Response(status_code=204)


MAX_PULL_BODY_BYTES = 64 * 1024


async def read_pull_request(request: Request) -> MlflowModelPull:
    """POST /v1/models's JSON body (a pull from MLflow), read within a small cap and validated as a route's body is
    (422 invalid_request)."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_PULL_BODY_BYTES:
            raise PayloadTooLarge(f"a JSON body to POST /v1/models holds an mlflow_uri only: at most "
                                  f"{MAX_PULL_BODY_BYTES} bytes")
    try:
        return MlflowModelPull.model_validate_json(bytes(body))
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False)) from None
