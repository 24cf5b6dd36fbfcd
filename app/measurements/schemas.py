from __future__ import annotations

import datetime as dt
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator


class MeasurementPublic(BaseModel):
    """One measured figure: one model x provider x batch size x metric of one job."""

    model_config = ConfigDict(from_attributes=True)
    id: int
    job_id: str
    model_role: str = Field(description="baseline, result, or step-N (an intermediate step's model)")
    model_sha256: str | None
    provider: str
    batch_size: int | None
    metric: str
    value: float
    unit: str
    created_at: dt.datetime
    environment: dict[str, Any] | None = Field(
        description="The fingerprint of the machine and software stack it was measured on (CPU, GPU and "
        "driver, library versions, provider, threads); null for rows stored without one."
    )

    @field_validator("environment", mode="before")
    @classmethod
    def _fingerprint(cls, value: Any) -> Any:
        # From a row, the environment is the related Environment; the API shows its fingerprint.
        return getattr(value, "fingerprint", value)


class JobMeasurements(BaseModel):
    items: list[MeasurementPublic]


class MeasurementPage(BaseModel):
    items: list[MeasurementPublic]
    next_cursor: str | None
