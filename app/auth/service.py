"""API keys: random tokens, stored as sha256, each belonging to one tenant, with scopes and an optional expiry.

A request's key is read from the database, or from the API process's read cache (app.readcache), which a
revocation empties at once in the revoking process and within a notification's delivery in the others; expiry
is checked on every request.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import secrets
from collections.abc import Iterable

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.audit import service as audit
from app.audit.service import Actor
from app.common import echo_id, newest_first_page
from app.dbmodels import ApiKey, Tenant, utcnow
from app.errors import ApiKeyNotFound, InsufficientScope, Unauthorized, Unprocessable
from app.readcache import KeyView

# The operator at the command line (`modelpress keys ...`): no key, no address.
OPERATOR = Actor(tenant_id=None)

KEY_PREFIX = "mp_"
# read: GET/HEAD; write: uploads, jobs, cancels, deletes; admin: keys, audit log, tenant settings.
SCOPES = ("read", "write", "admin")
# The operator's bootstrap key (CLI, embedded `modelpress run`) may do everything.
ALL_SCOPES = list(SCOPES)
METHOD_SCOPES = {"GET": "read", "HEAD": "read", "OPTIONS": "read",
                 "POST": "write", "PUT": "write", "PATCH": "write", "DELETE": "write"}
# A route overrides the method's scope with `openapi_extra=needs_scope("admin")` (shown in the OpenAPI).
SCOPE_EXTRA = "x-required-scope"


def needs_scope(scope: str) -> dict:
    assert scope in SCOPES, scope
    return {SCOPE_EXTRA: scope}


def required_scope(method: str, route: object | None) -> str:
    """The scope a request needs: the route's own (admin routes), else the method's (unknown methods: write)."""
    override = (getattr(route, "openapi_extra", None) or {}).get(SCOPE_EXTRA)
    return override or METHOD_SCOPES.get(method.upper(), "write")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def normalize_scopes(scopes: Iterable[str]) -> list[str]:
    """Known scopes, each once, in canonical order; an empty or unknown one is a 422."""
    given = [s.strip().lower() for s in scopes if s and s.strip()]
    unknown = sorted(set(given) - set(SCOPES))
    if unknown:
        raise Unprocessable(f"unknown scope(s) {', '.join(unknown)}; scopes are {', '.join(SCOPES)}",
                            code="invalid_scopes", field="scopes")
    if not given:
        raise Unprocessable(f"a key needs at least one scope of {', '.join(SCOPES)}", code="invalid_scopes",
                            field="scopes")
    return [s for s in SCOPES if s in given]


def get_or_create_tenant(*, db: Session, name: str) -> Tenant:
    tenant = db.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is None:
        tenant = Tenant(name=name)
        db.add(tenant)
        db.flush()
    return tenant


def create_key(*, db: Session, tenant_name: str | None = None, tenant_id: str | None = None,
               scopes: Iterable[str] = ALL_SCOPES, expires_at: dt.datetime | None = None,
               actor: Actor = OPERATOR) -> tuple[ApiKey, str]:
    """Returns the key row and the plaintext key, which is shown once and never stored.

    The tenant is named (created if new: the CLI) or given by id (the API: the caller's own tenant).
    """
    if tenant_id is None:
        tenant_id = get_or_create_tenant(db=db, name=tenant_name or "").id
    plaintext = KEY_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(tenant_id=tenant_id, key_hash=hash_key(plaintext), prefix=plaintext[:10],
                 scopes=normalize_scopes(scopes), expires_at=expires_at)
    db.add(key)
    db.flush()
    audit.record(db, actor, "key.create", object_type="api_key", object_id=key.id, tenant_id=tenant_id,
                 scopes=key.scopes, expires_at=expires_at.isoformat() if expires_at else None)
    return key, plaintext


def revoke_key(*, db: Session, key_id_or_plaintext: str, tenant_id: str | None = None,
               actor: Actor = OPERATOR) -> ApiKey:
    """Revoke a key (idempotent). With tenant_id, another tenant's key is a 404 like a missing one."""
    token = key_id_or_plaintext
    key = db.get(ApiKey, token) or db.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(token)))
    if key is None or (tenant_id is not None and key.tenant_id != tenant_id):
        raise ApiKeyNotFound(f"no API key with id {echo_id(token)}")
    if key.revoked_at is None:
        key.revoked_at = utcnow()
        audit.record(db, actor, "key.revoke", object_type="api_key", object_id=key.id, tenant_id=key.tenant_id)
    return key


def list_page(*, db: Session, tenant_id: str, limit: int, cursor: str | None) -> tuple[list[ApiKey], str | None]:
    return newest_first_page(db, select(ApiKey).where(ApiKey.tenant_id == tenant_id), ApiKey, limit=limit,
                             cursor=cursor)


def bearer_hash(authorization: str | None) -> str:
    """The lookup hash of the key in a `Bearer` header (no database involved)."""
    if not authorization:
        raise Unauthorized("send 'Authorization: Bearer <API key>'; `modelpress keys create --tenant NAME` makes one")
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("the Authorization header must be 'Bearer <API key>'")
    return hash_key(token)


def load_key(*, db: Session, key_hash: str) -> KeyView:
    """The known, unrevoked key with this hash, read from the database now, as a snapshot."""
    key = db.scalar(select(ApiKey).where(ApiKey.key_hash == key_hash))
    if key is None or key.revoked_at is not None:
        raise Unauthorized("the API key is not valid or has been revoked", code="invalid_api_key")
    return KeyView.of(key)


def check_expiry(key: KeyView) -> None:
    """Checked on every request, cached key or not."""
    if key.expires_at is not None and key.expires_at <= utcnow():
        raise Unauthorized(f"the API key expired at {key.expires_at.isoformat()}; ask an admin for a new one",
                           code="api_key_expired", expired_at=key.expires_at.isoformat())


def authenticate_key(*, db: Session, authorization: str | None) -> KeyView:
    """The valid (known, unrevoked, unexpired) key of a `Bearer` header, read from the database now."""
    key = load_key(db=db, key_hash=bearer_hash(authorization))
    check_expiry(key)
    return key


def check_scope(key: KeyView, scope: str) -> None:
    if scope not in key.scopes:
        raise InsufficientScope(
            f"this API key lacks the '{scope}' scope this request needs (it has: {', '.join(key.scopes) or 'none'})",
            required_scope=scope, key_scopes=list(key.scopes))
