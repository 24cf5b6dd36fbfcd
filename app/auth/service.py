"""API keys: random tokens, stored as sha256, each belonging to one tenant."""
from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.dbmodels import ApiKey, Tenant, utcnow
from app.errors import NotFound, Unauthorized

KEY_PREFIX = "mp_"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def get_or_create_tenant(*, db: Session, name: str) -> Tenant:
    tenant = db.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is None:
        tenant = Tenant(name=name)
        db.add(tenant)
        db.flush()
    return tenant


def create_key(*, db: Session, tenant_name: str) -> tuple[ApiKey, str]:
    """Returns the key row and the plaintext key, which is shown once and never stored."""
    tenant = get_or_create_tenant(db=db, name=tenant_name)
    plaintext = KEY_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(tenant_id=tenant.id, key_hash=hash_key(plaintext), prefix=plaintext[:10])
    db.add(key)
    db.flush()
    return key, plaintext


def revoke_key(*, db: Session, key_id_or_plaintext: str) -> ApiKey:
    token = key_id_or_plaintext
    key = db.get(ApiKey, token) or db.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(token)))
    if key is None:
        raise NotFound(f"no API key with id {token!r}", code="api_key_not_found")
    if key.revoked_at is None:
        key.revoked_at = utcnow()
    return key


def authenticate(*, db: Session, authorization: str | None) -> Tenant:
    if not authorization:
        raise Unauthorized("send 'Authorization: Bearer <API key>'; `modelpress keys create --tenant NAME` makes one")
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("the Authorization header must be 'Bearer <API key>'")
    key = db.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(token)))
    if key is None or key.revoked_at is not None:
        raise Unauthorized("the API key is not valid or has been revoked", code="invalid_api_key")
    return key.tenant
