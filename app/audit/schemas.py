from __future__ import annotations

import datetime as dt
from typing import Any

from pydantic import BaseModel, ConfigDict


class AuditEntryPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: int
    created_at: dt.datetime
    action: str
    key_id: str | None
    object_type: str | None
    object_id: str | None
    detail: dict[str, Any] | None
    client_ip: str | None


class AuditPage(BaseModel):
    items: list[AuditEntryPublic]
    next_cursor: str | None
