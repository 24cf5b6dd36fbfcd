"""Rounding for reports: enough digits to compare, no float noise."""
from __future__ import annotations

import math


def significant(value: float | None, digits: int = 6) -> float | None:
    """`value` to `digits` significant digits (monotonic, so sorted figures stay sorted); None if not finite."""
    if value is None or not math.isfinite(value):
        return None
    return float(f"{value:.{digits}g}")
