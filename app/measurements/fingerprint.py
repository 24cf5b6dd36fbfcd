"""The environment fingerprint: what a measurement's numbers depend on, and nothing that changes run to run.

Two measurements with the same fingerprint ran on the same hardware and software stack with the same
provider and thread settings, so their figures can be charted side by side.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

# The keys of workers.measure.environment.describe() that identify the stack. Anything volatile (process
# ids, timestamps, the list of providers this build could load) stays out, so the same stack gives the
# same fingerprint on every run.
FINGERPRINT_KEYS = (
    "cpu",
    "physical_cores",
    "logical_cores",
    "usable_cores",
    "memory_bytes",
    "gpu",
    "gpu_driver",
    "os",
    "python",
    "onnxruntime",
    "torch",
    "versions",
    "provider",
    "threads",
    "pinned_cores",
)


def fingerprint(environment: dict[str, Any]) -> dict[str, Any]:
    """The fingerprint of a measurement report's environment dict; a key it lacks is None."""
    return {key: environment.get(key) for key in FINGERPRINT_KEYS}


def canonical_json(fingerprint: dict[str, Any]) -> str:
    return json.dumps(fingerprint, sort_keys=True, separators=(",", ":"))


def fingerprint_id(fingerprint: dict[str, Any]) -> str:
    """The environments row id: sha256 hex of the fingerprint's canonical JSON."""
    return hashlib.sha256(canonical_json(fingerprint).encode()).hexdigest()
