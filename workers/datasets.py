"""Datasets as the workers use them: input arrays keyed by the model's input names, plus labels.

A dataset file (`.npz` or `.safetensors`) was validated when it was uploaded
(app/formats/dataset_files.py); here it is loaded again, with the same safe loader, into
memory. The first axis of every array is the sample axis.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class Dataset:
    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None = None
    name: str | None = None

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values()))) if self.inputs else 0

    def take(self, count: int) -> Dataset:
        """The first `count` samples (all of them when there are fewer)."""
        return Dataset(
            inputs={k: v[:count] for k, v in self.inputs.items()},
            labels=None if self.labels is None else self.labels[:count],
            name=self.name,
        )

    def batches(self, batch_size: int) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray | None]]:
        """(feeds, labels) in order; the last batch may be smaller."""
        for start in range(0, len(self), batch_size):
            stop = start + batch_size
            feeds = {k: np.ascontiguousarray(v[start:stop]) for k, v in self.inputs.items()}
            yield feeds, None if self.labels is None else self.labels[start:stop]


def load(path: Path, fmt: str, *, name: str | None = None) -> Dataset:
    """Load a stored dataset blob (`fmt` is "npz" or "safetensors")."""
    from app.formats.dataset_files import LABELS, load_arrays
    from app.settings import get_settings

    arrays = load_arrays(path, fmt, max_unpacked_bytes=get_settings().max_unpacked_bytes)
    labels = arrays.pop(LABELS, None)
    return Dataset(inputs=arrays, labels=labels, name=name)
