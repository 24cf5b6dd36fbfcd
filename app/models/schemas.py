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


class ConversionPublic(BaseModel):
    """A non-ONNX upload's conversion to ONNX (a Hugging Face folder): its job and, once done, the ONNX model."""

    status: str  # queued | running | succeeded | failed | cancelled
    job_id: str | None
    converted_model_id: str | None
    error: dict[str, Any] | None


class ModelPublic(UploadPublic):
    # Set on a model the worker converted from an upload (the upload's id).
    source_model_id: str | None = None
    # Set on an upload the worker converts (format hf-zip); jobs on it use the converted model.
    conversion: ConversionPublic | None = None


class ModelPage(BaseModel):
    items: list[ModelPublic]
    next_cursor: str | None
