"""Small helpers shared by the resources."""
from __future__ import annotations

import base64
import datetime as dt
import json
from typing import Protocol, TypeVar

from sqlalchemy.orm import Session

from app.errors import ModelPressError, NotFound


class Owned(Protocol):
    """A row that belongs to one tenant."""

    @property
    def tenant_id(self) -> str | None: ...


OwnedT = TypeVar("OwnedT", bound=Owned)


def get_owned_or_404(db: Session, model: type[OwnedT], *, tenant_id: str, object_id: str, error: type[NotFound],
                     lock: bool = False) -> OwnedT:
    """Another tenant's object is a 404 like a missing one: its existence is not revealed.

    lock=True row-locks it until commit, so that a concurrent delete cannot drop it from under the
    row that is about to reference it (a job on a model or a dataset) or change it twice (cancel).
    """
    obj = db.get(model, object_id)
    if obj is None or obj.tenant_id != tenant_id:
        raise error(f"no {model.__name__.lower()} with id {echo_id(object_id)}")
    if lock:
        db.refresh(obj, with_for_update=True)
    return obj


def at_field(exc: ModelPressError, field: str, *, prefix: bool = False) -> ModelPressError:
    """Name the request field an error is about, keeping what the error already carries."""
    exc.extra = {**exc.extra, "field": field}
    if prefix:
        exc.message = f"{field}: {exc.message}"
    return exc


def newest_first_page(db: Session, query, entity, *, limit: int, cursor: str | None,
                      id_type: type = str) -> tuple[list, str | None]:
    """One page of `query` (rows of `entity`, which has created_at and id), newest first, and the next cursor.

    id_type is the Python type of `entity.id` (int for the measurements' integer ids).
    """
    if cursor:
        created_at, last_id = decode_cursor(cursor, id_type=id_type)
        query = query.where(
            (entity.created_at < created_at) | ((entity.created_at == created_at) & (entity.id < last_id))
        )
    rows = list(db.scalars(query.order_by(entity.created_at.desc(), entity.id.desc()).limit(limit + 1)))
    next_cursor = encode_cursor(rows[limit - 1].created_at, rows[limit - 1].id) if len(rows) > limit else None
    return rows[:limit], next_cursor


def encode_cursor(created_at: dt.datetime, object_id: str | int) -> str:
    raw = json.dumps([created_at.isoformat(), object_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


MAX_BIGINT = 2**63 - 1
MAX_ID_ECHO = 64  # characters of a client-given id repeated in an error message


def decode_cursor(cursor: str, *, id_type: type = str) -> tuple[dt.datetime, str | int]:
    """A cursor's (created_at, id), each bounded to what the database stores; invalid_cursor otherwise."""
    from app.errors import Unprocessable

    try:
        if len(cursor) > 512:
            raise ValueError("too long")
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created, object_id = json.loads(raw)
        when = dt.datetime.fromisoformat(created)
        when = (when if when.tzinfo else when.replace(tzinfo=dt.UTC)).astimezone(dt.UTC)
        if not 1970 <= when.year <= 9000:
            raise ValueError("date out of range")
        if id_type is int:
            if isinstance(object_id, bool) or not isinstance(object_id, int) or not 0 <= object_id <= MAX_BIGINT:
                raise ValueError("id out of range")
        elif not isinstance(object_id, str) or len(object_id) > MAX_ID_ECHO:
            raise ValueError("bad id")
        return when, id_type(object_id)
    except Exception as exc:  # any malformed cursor is the client's error
        raise Unprocessable("the cursor is not one this API returned", code="invalid_cursor") from exc


def echo_id(object_id: str) -> str:
    """A client-given id as an error message repeats it: cut to MAX_ID_ECHO characters."""
    text = repr(object_id)
    return text if len(text) <= MAX_ID_ECHO + 2 else repr(object_id[:MAX_ID_ECHO]) + f"... ({len(object_id)} characters)"


def check_http_url(value: str, *, credentials: str):
    """An absolute http(s) URL a tenant gives the service to call (a webhook, a tracking server), checked as a
    pydantic validator checks: ValueError with the rule it broke. `credentials`: why user:password@ is refused
    there. Returns its urlsplit parts."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 (raises on a bad port)
    except ValueError as exc:
        raise ValueError(f"not a valid URL: {exc}") from None
    if not value.isascii():
        raise ValueError("must be ASCII: write an internationalised host in punycode (xn--...)")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an absolute http:// or https:// URL")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"must not carry credentials{credentials}")
    return parts
