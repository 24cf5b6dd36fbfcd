"""Typed dependencies shared by the routes."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Header, Request
from sqlalchemy.orm import Session

from app.audit.service import Actor
from app.auth.service import authenticate_key, check_scope, required_scope
from app.db import get_sessionmaker
from app.dbmodels import ApiKey, Tenant
from app.limits import check_rate
from app.settings import Settings, get_settings
from app.store import ArtifactStore, get_store


def db_session() -> Iterator[Session]:
    # Services commit explicitly before they answer; whatever is left is rolled back.
    session = get_sessionmaker()()
    try:
        yield session
    finally:
        session.rollback()
        session.close()


DbSession = Annotated[Session, Depends(db_session)]
AppSettings = Annotated[Settings, Depends(get_settings)]


def current_key(request: Request, db: DbSession, settings: AppSettings,
                authorization: Annotated[str | None, Header()] = None) -> ApiKey:
    """The request's key: valid now (looked up on every request), with the scope the route needs, within its
    rate limit. On the parent /v1 router, so every route gets it; FastAPI runs it once per request."""
    key = authenticate_key(db=db, authorization=authorization)
    check_scope(key, required_scope(request.method, request.scope.get("route")))
    check_rate(key, settings)
    return key


CurrentKey = Annotated[ApiKey, Depends(current_key)]


def current_tenant(key: CurrentKey) -> Tenant:
    return key.tenant


def current_actor(request: Request, key: CurrentKey) -> Actor:
    return Actor(tenant_id=key.tenant_id, key_id=key.id, client_ip=request.client.host if request.client else None)


Caller = Annotated[Tenant, Depends(current_tenant)]
CallerActor = Annotated[Actor, Depends(current_actor)]
Store = Annotated[ArtifactStore, Depends(get_store)]
