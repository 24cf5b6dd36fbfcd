"""What a method is to the API: a stable id, a version, a description and a params model.

The implementation (one function in workers/<family>/) registers against the id (workers.methods.implements);
nothing here imports onnxruntime, torch or numpy, so the API validates and lists methods without them.
"""
from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict


class MethodParams(BaseModel):
    """Base of every method's params; unknown fields are refused, not ignored."""

    model_config = ConfigDict(extra="forbid")


def checked_op_types(value: list[str] | None, supported: tuple[str, ...], scheme: str) -> list[str] | None:
    """Params validator body: every op type must be one `scheme` quantizes; repeats dropped, order kept."""
    if value is None:
        return None
    unknown = [op for op in value if op not in supported]
    if unknown:
        raise ValueError(
            f"not supported by {scheme}: {', '.join(map(repr, unknown))}; "
            f"supported op types are {', '.join(supported)}"
        )
    return list(dict.fromkeys(value))


@dataclass(frozen=True)
class MethodSpec:
    id: str
    version: int
    description: str
    params_model: type[MethodParams]
    # Dataset roles a step's params may name, as param field names (e.g. "calibration_dataset_id").
    # The API checks each named dataset against the model before queueing; the worker loads it.
    dataset_params: tuple[str, ...] = ()
    # Params that name another uploaded model of the tenant (e.g. "student_model_id"): the API checks the
    # caller owns it and links it to the job; the worker unpacks it into StepContext.models.
    model_params: tuple[str, ...] = ()
