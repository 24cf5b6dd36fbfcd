from __future__ import annotations

import datetime as dt
from typing import Any

from pydantic import BaseModel, ConfigDict


class UploadPublic(BaseModel):
    """What the API answers for a stored upload (a model or a dataset)."""

    model_config = ConfigDict(from_attributes=True)
    id: str
    name: str
    format: str
    size_bytes: int
    sha256: str
    created_at: dt.datetime
    inspection: dict[str, Any]


class ModelPublic(UploadPublic):
    pass


class ModelPage(BaseModel):
    items: list[ModelPublic]
    next_cursor: str | None
