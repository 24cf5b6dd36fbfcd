"""What a compression method is: a versioned params model plus one function.

A method reads its input model, writes a new model inside `out_dir` and returns
where it put it, with JSON-able details for the job report. It never changes
its input. This module imports nothing heavy: the API process imports it to
validate params.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict


class MethodParams(BaseModel):
    """Base of every method's params; unknown fields are refused, not ignored."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class StepOutput:
    model_path: Path
    details: dict[str, Any]


@dataclass(frozen=True)
class Method:
    id: str
    version: int
    description: str
    params_model: type[MethodParams]
    # run(input_onnx_path, params, out_dir) -> StepOutput; the output model lies inside out_dir.
    run: Callable[[Path, MethodParams, Path], StepOutput]
