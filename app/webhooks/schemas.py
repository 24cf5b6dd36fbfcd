from __future__ import annotations

import datetime as dt

from pydantic import BaseModel, ConfigDict, Field


class WebhookSecretCreated(BaseModel):
    secret: str = Field(description="The signing secret. Shown only in this response: store it now.")
    signature_header: str = "ModelPress-Signature"
    scheme: str = 't=<unix ts>,v1=<hex HMAC-SHA256(secret, f"{t}.{raw body}")>'


class WebhookDeliveryPublic(BaseModel):
    """One attempt to deliver one job event; the attempts of an event share delivery_id."""

    model_config = ConfigDict(from_attributes=True)
    id: int
    delivery_id: str
    event: str
    url: str
    attempt: int
    status_code: int | None
    error: str | None
    duration_ms: float | None
    delivered: bool
    created_at: dt.datetime
    next_attempt_at: dt.datetime | None
