"""Typed dependencies shared by the routes."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Header
from sqlalchemy.orm import Session

from app.auth.service import authenticate
from app.db import get_sessionmaker
from app.dbmodels import Tenant
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


def current_tenant(db: DbSession, authorization: Annotated[str | None, Header()] = None) -> Tenant:
    return authenticate(db=db, authorization=authorization)


Caller = Annotated[Tenant, Depends(current_tenant)]
AppSettings = Annotated[Settings, Depends(get_settings)]
Store = Annotated[ArtifactStore, Depends(get_store)]
