"""On-disk size and parameter counts, read from the ONNX file without loading its external weights
(workers.onnx_tools.graph.model_size counts them)."""
from __future__ import annotations

from pathlib import Path

from app.errors import MeasurementFailed


def load_structure(path: Path, *, role_name: str):
    import onnx

    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise MeasurementFailed(f"{role_name} is not a readable ONNX file: {exc}") from exc
