"""Python pickles, which the service never loads: recognise one by its first bytes or its file name."""
from __future__ import annotations

from pathlib import Path

# A pickle (protocol 2 to 5) opens with PROTO and its version; no ONNX protobuf, zip or safetensors header does.
PICKLE_PREFIXES = tuple(bytes([0x80, version]) for version in range(2, 6))
# What PyTorch checkpoints and pickles are called (their bytes are caught by starts_with_pickle).
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def starts_with_pickle(path: Path) -> bool:
    """Whether a received file is a Python pickle (which the server never loads)."""
    with path.open("rb") as fh:
        return fh.read(2) in PICKLE_PREFIXES
