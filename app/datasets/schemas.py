from __future__ import annotations

import datetime as dt
from typing import Any

from pydantic import BaseModel, ConfigDict


class DatasetPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: str
    name: str
    format: str
    size_bytes: int
    sha256: str
    created_at: dt.datetime
    inspection: dict[str, Any]


class DatasetPage(BaseModel):
    items: list[DatasetPublic]
    next_cursor: str | None
