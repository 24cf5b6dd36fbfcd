"""Reading a large ONNX file without holding it in memory: the protobuf wire format, walked field by field.

protobuf parses a message whole, so validating a 1 GB `.onnx` the plain way costs the API 1-2 GB. Instead,
`externalize` walks the file and writes, beside it, a small copy in which every large initializer's `raw_data`
is an external-data reference into the file itself, at the offset where the bytes already lie: nothing is
copied. The onnx checker, shape inference and the inspection then run on the copy as
on any model with external data. The stored model stays the user's own file, byte for byte.

Both walks here are bounded: at most `max_fields` fields are read, and the copy may hold at most `max_copy_bytes`
(what is not in initializers' raw_data: the graph, and weights kept in float_data or Constant nodes). A file
beyond them is refused rather than parsed whole. `graph_depth` reads how deep subgraphs nest, for files the
parser gave up on.
"""
from __future__ import annotations

import math
import mmap
import uuid
from dataclasses import dataclass
from pathlib import Path

MODEL_GRAPH, GRAPH_INITIALIZER = 7, 5
TENSOR_DIMS, TENSOR_DATA_TYPE, TENSOR_NAME, TENSOR_RAW_DATA = 1, 2, 8, 9
TENSOR_EXTERNAL_DATA, TENSOR_DATA_LOCATION = 13, 14
VARINT, FIXED64, LENGTH, FIXED32 = 0, 1, 2, 5
EXTERNAL = 1
# Bytes per element of the fixed-size ONNX tensor types (TensorProto.DataType); strings have none.
ITEM_BYTES = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 14: 8, 15: 16, 16: 2,
              17: 1, 18: 1, 19: 1, 20: 1}
# Field numbers (onnx.proto) on every path from a ModelProto down to a nested graph, by message kind.
NESTING_FIELDS: dict[str, dict[int, str]] = {
    "model": {7: "graph", 20: "training", 25: "function"},  # graph, training_info, functions
    "training": {1: "graph", 2: "graph"},  # initialization, algorithm
    "function": {7: "node"},
    "graph": {1: "node"},
    "node": {5: "attribute"},
    "attribute": {6: "graph", 11: "graph"},  # g, graphs
}


class WireError(ValueError):
    """The file is not a protobuf this walk can follow, or it is beyond the walk's bounds."""


class ExternalDataInFile(WireError):
    """A single file names external data of its own."""


@dataclass
class Externalized:
    model: Path  # the small copy
    weights: str  # the location its moved tensors name: the source file's own name, beside the copy
    moved: int  # how many tensors point there


class Wire:
    """A read-only view of a file as protobuf fields."""

    def __init__(self, data: mmap.mmap, max_fields: int) -> None:
        self.data, self.budget = data, max_fields

    def varint(self, pos: int, end: int) -> tuple[int, int]:
        data, value, shift = self.data, 0, 0
        while True:
            if pos >= end or shift > 63:
                raise WireError("a truncated or overlong varint")
            byte = data[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                return value, pos
            shift += 7

    def fields(self, start: int, end: int):
        """(field number, wire type, value start, value end, varint value) of each field in [start, end)."""
        pos = start
        while pos < end:
            self.budget -= 1
            if self.budget < 0:
                raise WireError("more protobuf fields than can be checked in bounded time")
            tag, pos = self.varint(pos, end)
            number, wire = tag >> 3, tag & 7
            value = None
            if number == 0:
                raise WireError("field number 0")
            if wire == VARINT:
                value, after = self.varint(pos, end)
            elif wire == FIXED64:
                after = pos + 8
            elif wire == FIXED32:
                after = pos + 4
            elif wire == LENGTH:
                length, pos = self.varint(pos, end)
                after = pos + length
            else:
                raise WireError(f"wire type {wire} (groups are not used by ONNX)")
            if after > end:
                raise WireError("a field runs past the end of its message")
            yield number, wire, pos, after, value
            pos = after


def externalize(source: Path, *, keep_external: bool, max_copy_bytes: int, max_fields: int = 10_000_000,
                min_bytes: int = 1024) -> Externalized:
    """Write beside `source` a small copy of it (under a name that cannot clash with an archive's members) whose
    top-level initializers of at least `min_bytes` of raw_data point into `source` itself.

    A tensor that already names external data is kept as it is with `keep_external` (an archive's model), else
    ExternalDataInFile. ValueError (not WireError) when a tensor's data does not fit its shape."""
    weights = source.name
    with source.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
        walk = _Copy(Wire(data, max_fields), weights, keep_external, max_copy_bytes, min_bytes)
        out = bytearray()
        for number, wire, start, end, _value in walk.wire.fields(0, len(data)):
            if number == MODEL_GRAPH and wire == LENGTH:
                graph = walk.graph(start, end)  # (counted as it was built)
                out += _key(MODEL_GRAPH, LENGTH) + _varint(len(graph)) + graph
            else:
                out += walk.raw(start, end, number, wire)
    model = source.with_name(f".modelpress-check-{uuid.uuid4().hex[:12]}.onnx")
    model.write_bytes(out)
    return Externalized(model=model, weights=weights, moved=walk.moved)


class _Copy:
    def __init__(self, wire: Wire, weights: str, keep_external: bool, max_copy_bytes: int, min_bytes: int) -> None:
        self.wire, self.weights, self.keep_external = wire, weights, keep_external
        self.max_copy_bytes, self.min_bytes = max_copy_bytes, min_bytes
        self.size = self.moved = 0

    def count(self, size: int) -> None:
        """Counted against the copy's bound before anything of that size is read into memory."""
        self.size += size
        if self.size > self.max_copy_bytes:
            raise WireError(f"more than {self.max_copy_bytes >> 20} MiB of the model lies outside initializers' "
                            "raw_data (weights in float_data or Constant nodes)")

    def raw(self, start: int, end: int, number: int, wire: int) -> bytes:
        """A field re-encoded as it was (its key, its length where it has one, its bytes), counted."""
        self.count(end - start)
        payload = bytes(self.wire.data[start:end])
        return _key(number, wire) + (_varint(len(payload)) if wire == LENGTH else b"") + payload

    def graph(self, start: int, end: int) -> bytes:
        out = bytearray()
        for number, wire, field_start, field_end, _value in self.wire.fields(start, end):
            if number == GRAPH_INITIALIZER and wire == LENGTH:
                tensor = self.tensor(field_start, field_end)  # (counted as it was built)
                out += _key(GRAPH_INITIALIZER, LENGTH) + _varint(len(tensor)) + tensor
            else:
                out += self.raw(field_start, field_end, number, wire)
        return bytes(out)

    def tensor(self, start: int, end: int) -> bytes:
        fields = list(self.wire.fields(start, end))
        if any(number in (TENSOR_EXTERNAL_DATA, TENSOR_DATA_LOCATION) for number, *_rest in fields):
            if not self.keep_external:
                raise ExternalDataInFile("the file names external data of its own")
            self.count(end - start)
            return bytes(self.wire.data[start:end])
        raw = [(s, e) for number, wire, s, e, _v in fields if number == TENSOR_RAW_DATA and wire == LENGTH]
        if not raw or raw[-1][1] - raw[-1][0] < self.min_bytes:
            self.count(end - start)
            return bytes(self.wire.data[start:end])  # small: as it is
        data_start, data_end = raw[-1]  # protobuf keeps the last value of a repeated scalar field
        dims: list[int] = []
        data_type, name = 0, ""
        out = bytearray()
        for number, wire, s, e, value in fields:
            if number == TENSOR_RAW_DATA:
                continue
            if number == TENSOR_DIMS:
                dims += _varints(bytes(self.wire.data[s:e])) if wire == LENGTH else [value]
            elif number == TENSOR_DATA_TYPE and wire == VARINT:
                data_type = value
            elif number == TENSOR_NAME and wire == LENGTH:
                name = bytes(self.wire.data[s:e]).decode("utf-8", "replace")
            out += self.raw(s, e, number, wire)
        length = data_end - data_start
        if data_type in ITEM_BYTES and length != math.prod(dims) * ITEM_BYTES[data_type]:
            raise ValueError(f"initializer {name[:80]!r} holds {length} bytes of data, but its shape {dims} needs "
                             f"{math.prod(dims) * ITEM_BYTES[data_type]}")
        for key, text in (("location", self.weights), ("offset", str(data_start)), ("length", str(length))):
            entry = _string(1, key) + _string(2, text)
            out += _key(TENSOR_EXTERNAL_DATA, LENGTH) + _varint(len(entry)) + entry
        out += _key(TENSOR_DATA_LOCATION, VARINT) + _varint(EXTERNAL)
        self.moved += 1
        return bytes(out)


def graph_depth(path: Path, *, stop_above: int, max_fields: int) -> int:
    """How deep subgraphs nest in a serialized ModelProto, read depth first. Stops once past `stop_above`, after
    `max_fields` fields, or where the bytes stop being protobuf, and returns the depth found so far."""
    with path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
        wire = Wire(data, max_fields)
        deepest = 0
        # A stack of (message kind, its fields, graph depth); the top one is read on.
        stack = [("model", wire.fields(0, len(data)), -1)]
        try:
            while stack:
                kind, fields, depth = stack[-1]
                field = next(fields, None)
                if field is None:
                    stack.pop()
                    continue
                number, wire_type, start, end, _value = field
                child_kind = NESTING_FIELDS[kind].get(number) if wire_type == LENGTH else None
                if child_kind is None:
                    continue
                child_depth = depth + 1 if child_kind in ("graph", "function") else depth
                deepest = max(deepest, child_depth)
                if deepest > stop_above:
                    break
                stack.append((child_kind, wire.fields(start, end), child_depth))
        except WireError:
            pass
        return deepest


def _key(number: int, wire: int) -> bytes:
    return _varint(number << 3 | wire)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _varints(data: bytes) -> list[int]:
    values, value, shift = [], 0, 0
    for byte in data:
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            values.append(value)
            value = shift = 0
    return values


def _string(number: int, text: str) -> bytes:
    data = text.encode()
    return _key(number, LENGTH) + _varint(len(data)) + data
