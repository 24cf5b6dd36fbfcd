from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse

from app.deps import AppSettings, Caller, CallerActor, DbSession, Store
from app.downloads import blob_response
from app.integrations.routes import read_pull_request
from app.limits import upload_quota
from app.models import service
from app.models.schemas import ModelPage, ModelPublic
from app.uploads import receive_file

router = APIRouter(prefix="/models", tags=["models"])


@router.post("", status_code=201, response_model=ModelPublic,
             summary="Upload a model: .onnx, a .zip holding one, or a .zip of a Hugging Face folder (converted); or "
             'pull one from the tenant\'s MLflow registry with a JSON body {"mlflow_uri": "models:/name/1"}')
async def upload_model(request: Request, db: DbSession, caller: Caller, actor: CallerActor, store: Store,
                       settings: AppSettings):
    quota = upload_quota(db, caller, settings)
    db.rollback()  # no transaction stays open while the body streams in
    if request.headers.get("content-type", "").startswith("application/json"):
        pull = await read_pull_request(request)
        with store.workdir() as workdir:
            model = await run_in_threadpool(service.create_from_mlflow, db=db, store=store, settings=settings,
                                            actor=actor, pull=pull, workdir=workdir, quota=quota)
        return service.public(db=db, model=model)
    with store.workdir() as workdir:
        received = await receive_file(request, dest=workdir / "upload", max_bytes=settings.max_upload_bytes,
                                      quota=quota)
        model = await run_in_threadpool(
            service.create_from_upload,
            db=db, store=store, settings=settings, actor=actor, received=received, workdir=workdir,
        )
    return service.public(db=db, model=model)


@router.get("", response_model=ModelPage)
def list_models(
    db: DbSession, caller: Caller, limit: Annotated[int, Query(ge=1, le=200)] = 50, cursor: str | None = None
):
    items, next_cursor = service.list_page(db=db, tenant_id=caller.id, limit=limit, cursor=cursor)
    return ModelPage(items=[service.public(db=db, model=m) for m in items], next_cursor=next_cursor)


@router.get("/{model_id}", response_model=ModelPublic)
def get_model(model_id: str, db: DbSession, caller: Caller):
    return service.public(db=db, model=service.get(db=db, tenant_id=caller.id, model_id=model_id))


@router.get("/{model_id}/download", response_class=FileResponse)
def download_model(model_id: str, request: Request, db: DbSession, caller: Caller, store: Store):
    model = service.get(db=db, tenant_id=caller.id, model_id=model_id)
    return blob_response(
        request, store=store, sha256=model.sha256, size=model.size_bytes,
        media_type="application/octet-stream" if model.format == "onnx" else "application/zip",
        filename=service.download_filename(model),
    )


@router.delete("/{model_id}", status_code=204)
def delete_model(model_id: str, db: DbSession, actor: CallerActor, store: Store):
    service.delete(db=db, store=store, actor=actor, model_id=model_id)
    return Response(status_code=204)
