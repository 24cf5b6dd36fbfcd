"""How much an uploaded archive or model may hold: the bounds every unpacking and parsing check enforces.

The API builds them from its settings (app.settings.Settings.file_limits); a worker converting a model uses the defaults.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    max_unpacked_bytes: int = 8 << 30
    max_zip_members: int = 1000
    max_compression_ratio: float = 200.0
    # protobuf cannot encode a message of 2 GiB or more; a bigger model keeps its weights as external data.
    max_model_proto_bytes: int = (2 << 30) - 1
    # A model this large is checked through a copy with its weights pointing into the file, not parsed whole;
    # the copy may hold this much (the rest of the model) and the walk read this many protobuf fields.
    stream_above_bytes: int = 64 << 20
    stream_copy_max_bytes: int = 64 << 20
    stream_max_fields: int = 10_000_000
    # If/Loop/Scan bodies nested inside each other. protobuf stops parsing near 32 levels; staying well
    # below keeps the checker, shape inference and ONNX Runtime (all recursive) far from their limits.
    max_graph_depth: int = 16

