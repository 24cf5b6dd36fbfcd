"""Typed dependencies shared by the routes."""
from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Header, Request
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.orm import Session

from app.audit.service import Actor
from app.auth.service import bearer_hash, check_expiry, check_scope, load_key, required_scope
from app.db import get_read_sessionmaker, get_sessionmaker
from app.limits import check_rate, rate_limited
from app.readcache import KEYS, KeyView, TenantView, get_cache
from app.settings import Settings, get_settings
from app.store import ArtifactStore, get_store


async def db_session(request: Request) -> AsyncIterator[Session]:
    """A session for the request. Reads (GET, HEAD) run in autocommit: no BEGIN and ROLLBACK round trips, each
    statement on the committed state. Writes commit explicitly before they answer; whatever is left is rolled
    back. Async, so that making it costs no thread hop; only releasing a connection does."""
    read_only = request.method in ("GET", "HEAD")
    session = (get_read_sessionmaker() if read_only else get_sessionmaker())()
    try:
        yield session
    finally:
        if session.get_transaction() is None:
            session.close()  # it never touched the database
        else:
            await run_in_threadpool(_release, session)


def _release(session: Session) -> None:
    session.rollback()
    session.close()


async def app_settings() -> Settings:
    return get_settings()


DbSession = Annotated[Session, Depends(db_session)]
AppSettings = Annotated[Settings, Depends(app_settings)]


async def current_key(request: Request, db: DbSession, settings: AppSettings,
                      authorization: Annotated[str | None, Header()] = None) -> KeyView:
    """The request's key: valid now, with the scope the route needs, within its rate limit. On the parent /v1
    router, so every route gets it; FastAPI runs it once per request.

    A key once read is kept by this process's read cache (app.readcache) until a notification says it changed
    (a revocation among them); its expiry is checked on every request."""
    key_hash = bearer_hash(authorization)
    cache = get_cache()
    key = cache.get(KEYS, key_hash)
    if key is None:
        key = await cache.fetch(KEYS, key_hash, lambda: load_key(db=db, key_hash=key_hash))
    check_expiry(key)
    check_scope(key, required_scope(request.method, request.scope.get("route")))
    if rate_limited(key, settings):
        await run_in_threadpool(check_rate, key, settings)
    return key


CurrentKey = Annotated[KeyView, Depends(current_key)]


async def current_tenant(key: CurrentKey) -> TenantView:
    return key.tenant


async def current_actor(request: Request, key: CurrentKey) -> Actor:
    return Actor(tenant_id=key.tenant_id, key_id=key.id, client_ip=request.client.host if request.client else None)


Caller = Annotated[TenantView, Depends(current_tenant)]
CallerActor = Annotated[Actor, Depends(current_actor)]
Store = Annotated[ArtifactStore, Depends(get_store)]
