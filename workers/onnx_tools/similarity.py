"""How alike two models' outputs are."""
from __future__ import annotations

import numpy as np


def cosine(x: np.ndarray, y: np.ndarray) -> float:
    """Cosine similarity of two arrays (flattened, in float64); two zero arrays agree, one zero array does not."""
    x, y = np.asarray(x, np.float64).ravel(), np.asarray(y, np.float64).ravel()
    nx, ny = float(np.linalg.norm(x)), float(np.linalg.norm(y))
    if nx == 0.0 or ny == 0.0:
        return 1.0 if nx == ny else 0.0
    return max(-1.0, min(1.0, float(np.dot(x, y)) / (nx * ny)))
