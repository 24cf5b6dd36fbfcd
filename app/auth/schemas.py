from __future__ import annotations

import datetime as dt

from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.auth.service import SCOPES


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    scopes: list[str] = Field(default_factory=lambda: ["read", "write"], min_length=1, max_length=len(SCOPES),
                              description=f"any of {', '.join(SCOPES)}")
    expires_at: dt.datetime | None = Field(default=None, description="when the key stops working (UTC if naive)")
    expires_in_s: int | None = Field(default=None, ge=60, le=10 * 366 * 24 * 3600,
                                     description="or: seconds from now until it stops working")

    @model_validator(mode="after")
    def _one_expiry(self) -> KeyCreate:
        if self.expires_at is not None and self.expires_in_s is not None:
            raise ValueError("give expires_at or expires_in_s, not both")
        if self.expires_at is not None:
            self.expires_at = _future_utc(self.expires_at)
        return self


MAX_KEY_LIFETIME = dt.timedelta(days=10 * 366)


def _future_utc(when: dt.datetime) -> dt.datetime:
    """`when` in UTC (naive is UTC), between now and 10 years from now: a key that expired at birth could never be
    used, and a date past year 9999 in UTC cannot be stored."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    try:
        when = when.astimezone(dt.UTC)
    except OverflowError:
        raise ValueError("expires_at is out of range (at most 10 years from now)") from None
    now = dt.datetime.now(dt.UTC)
    if when <= now:
        raise ValueError(f"expires_at {when.isoformat()} is in the past: a key must expire in the future")
    if when > now + MAX_KEY_LIFETIME:
        raise ValueError("expires_at is out of range (at most 10 years from now)")
    return when


class KeyPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: str
    prefix: str
    scopes: list[str]
    created_at: dt.datetime
    expires_at: dt.datetime | None
    revoked_at: dt.datetime | None


class KeyCreated(KeyPublic):
    key: str = Field(description="the API key itself: shown once, stored only as a hash")


class KeyPage(BaseModel):
    items: list[KeyPublic]
    next_cursor: str | None
