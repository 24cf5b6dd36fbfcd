from __future__ import annotations

from pydantic import BaseModel

from app.models.schemas import UploadPublic


class DatasetPublic(UploadPublic):
    pass


class DatasetPage(BaseModel):
    items: list[DatasetPublic]
    next_cursor: str | None
