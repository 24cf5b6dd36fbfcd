"""The bridge's domain errors; a job step that needs PyTorch modules fails with these codes."""
from __future__ import annotations

from app.errors import StepFailed


class UnsupportedOp(StepFailed):
    """The model holds an op (or an attribute combination) that cannot become a PyTorch module."""

    code = "unsupported_op"


class ConversionMismatch(StepFailed):
    """The converted model computes something else than the original on the same inputs."""

    code = "conversion_mismatch"
