"""API keys of the caller's tenant: create (shown once), list, revoke. Admin keys only."""
from __future__ import annotations

import datetime as dt
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse

from app.auth import service
from app.auth.schemas import KeyCreate, KeyCreated, KeyPage, KeyPublic
from app.deps import Caller, CallerActor, DbSession
from app.readcache import KEYS, get_cache

router = APIRouter(prefix="/keys", tags=["keys"])
ADMIN = service.needs_scope("admin")


@router.post("", status_code=201, response_model=KeyCreated, openapi_extra=ADMIN,
             summary="Create an API key for the caller's tenant (the key is shown once)")
def create_key(body: KeyCreate, db: DbSession, caller: Caller, actor: CallerActor):
    expires_at = body.expires_at
    if body.expires_in_s is not None:
        expires_at = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=body.expires_in_s)
    elif expires_at is not None and expires_at.tzinfo is None:
        expires_at = expires_at.replace(tzinfo=dt.UTC)
    key, plaintext = service.create_key(db=db, tenant_id=caller.id, scopes=body.scopes, expires_at=expires_at,
                                        actor=actor)
    db.commit()
    created = KeyCreated.model_validate({**KeyPublic.model_validate(key).model_dump(), "key": plaintext})
    return JSONResponse(created.model_dump(mode="json"), status_code=201, headers={"Cache-Control": "no-store"})


@router.get("", response_model=KeyPage, openapi_extra=ADMIN, summary="The tenant's API keys (never the keys themselves)")
def list_keys(db: DbSession, caller: Caller, limit: Annotated[int, Query(ge=1, le=200)] = 50,
              cursor: str | None = None):
    items, next_cursor = service.list_page(db=db, tenant_id=caller.id, limit=limit, cursor=cursor)
    return KeyPage(items=[KeyPublic.model_validate(k) for k in items], next_cursor=next_cursor)


@router.delete("/{key_id}", response_model=KeyPublic, openapi_extra=ADMIN,
               summary="Revoke one of the tenant's keys: it stops working at once")
def revoke_key(key_id: str, db: DbSession, caller: Caller, actor: CallerActor):
    key = service.revoke_key(db=db, key_id_or_plaintext=key_id, tenant_id=caller.id, actor=actor)
    db.commit()
    get_cache().drop(KEYS, key.key_hash)  # this process at once; the others when the notification comes
    return KeyPublic.model_validate(key)
