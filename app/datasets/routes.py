from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse

from app.datasets import service, texts
from app.datasets.schemas import DatasetPage, DatasetPublic
from app.deps import AppSettings, Caller, CallerActor, DbSession, Store
from app.downloads import blob_response
from app.limits import upload_quota
from app.uploads import receive_file

router = APIRouter(prefix="/datasets", tags=["datasets"])


@router.post("", status_code=201, response_model=DatasetPublic,
             summary="Upload a dataset (.npz or .safetensors: arrays named after the model's inputs, plus labels; "
                     "or .json texts with a model_id, tokenized with that Hugging Face model's tokenizer)")
async def upload_dataset(request: Request, db: DbSession, caller: Caller, actor: CallerActor, store: Store,
                         settings: AppSettings):
    quota = upload_quota(db, caller, settings)
    db.rollback()  # no transaction stays open while the body streams in
    with store.workdir() as workdir:
        received = await receive_file(request, dest=workdir / "upload", max_bytes=settings.max_upload_bytes,
                                      quota=quota)
        if received.filename.lower().endswith(".json"):  # texts, tokenized with a HF model's tokenizer
            dataset = await run_in_threadpool(
                texts.create_from_texts, db=db, store=store, settings=settings, actor=actor, received=received,
                workdir=workdir)
        else:
            dataset = await run_in_threadpool(
                service.create_from_upload, db=db, store=store, settings=settings, actor=actor, received=received
            )
    return DatasetPublic.model_validate(dataset)


@router.get("", response_model=DatasetPage)
def list_datasets(
    db: DbSession, caller: Caller, limit: Annotated[int, Query(ge=1, le=200)] = 50, cursor: str | None = None
):
    items, next_cursor = service.list_page(db=db, tenant_id=caller.id, limit=limit, cursor=cursor)
    return DatasetPage(items=[DatasetPublic.model_validate(d) for d in items], next_cursor=next_cursor)


@router.get("/{dataset_id}", response_model=DatasetPublic)
def get_dataset(dataset_id: str, db: DbSession, caller: Caller):
    return DatasetPublic.model_validate(service.get(db=db, tenant_id=caller.id, dataset_id=dataset_id))


@router.get("/{dataset_id}/download", response_class=FileResponse)
def download_dataset(dataset_id: str, request: Request, db: DbSession, caller: Caller, store: Store):
    dataset = service.get(db=db, tenant_id=caller.id, dataset_id=dataset_id)
    return blob_response(
        request, store=store, sha256=dataset.sha256, size=dataset.size_bytes, media_type="application/octet-stream",
        filename=service.download_filename(dataset),
    )


@router.delete("/{dataset_id}", status_code=204)
def delete_dataset(dataset_id: str, db: DbSession, actor: CallerActor, store: Store):
    service.delete(db=db, store=store, actor=actor, dataset_id=dataset_id)
    return Response(status_code=204)
