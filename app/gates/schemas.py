"""A gate as submitted (GateCreate) and as served (GatePublic)."""
from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.jobs.schemas import JobError

Id = Field(max_length=64)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GateBaseline(Strict):
    """What the candidate is compared with: a model, or the model an earlier succeeded job handed over
    (its model.onnx). Exactly one."""

    model_id: str | None = Field(default=None, max_length=64, description="A model of yours (POST /v1/models).")
    job_id: str | None = Field(default=None, max_length=64,
                               description="A succeeded job of yours: its model.onnx is the baseline.")

    @model_validator(mode="after")
    def _exactly_one(self) -> GateBaseline:
        if (self.model_id is None) == (self.job_id is None):
            raise ValueError("give exactly one of model_id and job_id")
        return self


class GatePolicy(Strict):
    """The limits the candidate must keep; at least one (422 empty_policy otherwise)."""

    max_slowdown_pct: float | None = Field(
        default=None, gt=0, le=1000,
        description="Fail when the candidate is slower than the baseline by more than this many percent, beyond "
        "the measurement's interval (H0: slowdown <= limit, rejected at one-sided 95%; see workers/gate.py). "
        "Above 0: two runs of one model are never exactly as fast. 2 or 3 detect a 5% regression.")
    min_cosine: float | None = Field(
        default=None, ge=-1, le=1,
        description="The worst sample's cosine between the candidate's and the baseline's outputs must be at least "
        "this (on the eval dataset when one is named, else on synthetic random inputs).")
    max_accuracy_drop: float | None = Field(
        default=None, ge=0, le=100,
        description="Top-1 accuracy may drop at most this many points (needs an eval dataset with labels).")
    max_size_bytes: int | None = Field(default=None, gt=0, description="The candidate's files at most this.")
    max_size_growth_pct: float | None = Field(
        default=None, ge=-100, le=100_000,
        description="The candidate's files at most this many percent larger than the baseline's (negative: it "
        "must shrink by that much).")

    def limits(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class GateCreate(Strict):
    candidate_model_id: str = Field(max_length=64, description="The model under test (POST /v1/models).")
    baseline: GateBaseline
    policy: GatePolicy | None = Field(default=None, description="Required: the limits (at least one).")
    eval_dataset_id: str | None = Field(
        default=None, max_length=64,
        description="A dataset (POST /v1/datasets) fidelity and accuracy are measured on; without it, fidelity is "
        "measured on synthetic random inputs and the report says so.")
    eval_max_samples: int | None = Field(default=None, ge=1, le=1_000_000)
    batch_size: int = Field(default=1, ge=1, le=1024, description="The batch size latency is measured at.")
    time_budget_s: float = Field(
        default=60, ge=5, le=3600,
        description="The most time the latency rounds may take; they stop earlier once the decision is clear.")
    name: str | None = Field(default=None, max_length=255)


class GatePublic(BaseModel):
    id: str
    name: str | None
    status: str
    progress: float
    stage: str | None
    message: str | None
    candidate_model_id: str | None
    baseline: dict[str, Any]
    policy: dict[str, Any]
    batch_size: int
    time_budget_s: float
    eval_dataset_id: str | None
    # Set when the gate's job succeeded: pass or fail, and why (each failed check, or every check when it passed).
    verdict: Literal["pass", "fail"] | None = None
    reason: str | None = None
    checks: list[dict[str, Any]] = []
    error: JobError | None = None
    created_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
