"""Reading a large single-file ONNX model without holding it in memory.

protobuf parses a message whole, so validating a 1 GB `.onnx` the plain way costs the API 1-2 GB. Instead,
`externalize` walks the protobuf wire format of the file and writes a copy in which every large initializer's
`raw_data` is moved to an external-data file, a chunk at a time: the copy's graph is as small as the model's
structure, and the onnx checker, shape inference and the inspection run on it as they run on any model with
external data. The stored model stays the user's own file, byte for byte.

Only the fields this needs are read (ModelProto.graph, GraphProto.initializer, TensorProto.raw_data and
its neighbours); everything else is copied as it is. A file this walk cannot follow is left to the plain path,
whose parser then says what is wrong with it.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import BinaryIO

MODEL_GRAPH, GRAPH_INITIALIZER = 7, 5
TENSOR_DIMS, TENSOR_DATA_TYPE, TENSOR_RAW_DATA, TENSOR_EXTERNAL_DATA, TENSOR_DATA_LOCATION = 1, 2, 9, 13, 14
VARINT, FIXED64, LENGTH, FIXED32 = 0, 1, 2, 5
EXTERNAL = 1
COPY_CHUNK = 1 << 20
# Bytes per element of the fixed-size ONNX tensor types (TensorProto.DataType); strings have none.
ITEM_BYTES = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 14: 8, 15: 16, 16: 2,
              17: 1, 18: 1, 19: 1, 20: 1}
WEIGHTS_FILE = "weights.bin"


class WireError(ValueError):
    """The file is not a protobuf this walk can follow."""


def externalize(source: Path, dest_dir: Path, *, min_bytes: int = 1024) -> Path:
    """Write `dest_dir/model.onnx`: `source` with every initializer's raw_data of at least `min_bytes` moved
    to `dest_dir/weights.bin`. Returns the new model's path; raises WireError when the walk fails, and
    ValueError (with a message for the user) when a tensor's data does not fit its shape."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    size = source.stat().st_size
    with source.open("rb") as src, open(dest_dir / WEIGHTS_FILE, "wb") as weights:
        out = bytearray()
        for number, wire, start, end in _fields(src, 0, size):
            if number == MODEL_GRAPH and wire == LENGTH:
                graph = _graph(src, start, end, weights, min_bytes)
                out += _key(MODEL_GRAPH, LENGTH) + _varint(len(graph)) + graph
            else:
                out += _raw(src, start, end, number, wire)
    model = dest_dir / "model.onnx"
    model.write_bytes(bytes(out))
    return model


def _graph(src: BinaryIO, start: int, end: int, weights: BinaryIO, min_bytes: int) -> bytes:
    out = bytearray()
    for number, wire, field_start, field_end in _fields(src, start, end):
        if number == GRAPH_INITIALIZER and wire == LENGTH:
            tensor = _tensor(src, field_start, field_end, weights, min_bytes)
            out += _key(GRAPH_INITIALIZER, LENGTH) + _varint(len(tensor)) + tensor
        else:
            out += _raw(src, field_start, field_end, number, wire)
    return bytes(out)


def _tensor(src: BinaryIO, start: int, end: int, weights: BinaryIO, min_bytes: int) -> bytes:
    fields = list(_fields(src, start, end))
    raw = [(s, e) for number, wire, s, e in fields if number == TENSOR_RAW_DATA and wire == LENGTH]
    external = any(number in (TENSOR_EXTERNAL_DATA, TENSOR_DATA_LOCATION) for number, _w, _s, _e in fields)
    if external:
        raise WireError("the file names external data of its own")  # the plain path refuses it, with the reason
    if not raw or raw[-1][1] - raw[-1][0] < min_bytes:
        return _read(src, start, end)  # small: as it is
    data_start, data_end = raw[-1]  # protobuf keeps the last value of a repeated scalar field
    dims, data_type = [], 0
    out = bytearray()
    for number, wire, s, e in fields:
        if number == TENSOR_RAW_DATA:
            continue
        if number == TENSOR_DIMS:
            dims += _varints(_read(src, s, e)) if wire == LENGTH else [_varint_at(src, s)]
        elif number == TENSOR_DATA_TYPE and wire == VARINT:
            data_type = _varint_at(src, s)
        out += _raw(src, s, e, number, wire)
    length = data_end - data_start
    if data_type in ITEM_BYTES and length != math.prod(dims) * ITEM_BYTES[data_type]:
        raise ValueError(f"an initializer holds {length} bytes of data, but its shape {dims} needs "
                         f"{math.prod(dims) * ITEM_BYTES[data_type]}")
    offset = weights.tell()
    src.seek(data_start)
    left = length
    while left:
        chunk = src.read(min(COPY_CHUNK, left))
        if not chunk:
            raise WireError("the file ends inside a tensor's data")
        weights.write(chunk)
        left -= len(chunk)
    for key, value in (("location", WEIGHTS_FILE), ("offset", str(offset)), ("length", str(length))):
        entry = _string(1, key) + _string(2, value)
        out += _key(TENSOR_EXTERNAL_DATA, LENGTH) + _varint(len(entry)) + entry
    out += _key(TENSOR_DATA_LOCATION, VARINT) + _varint(EXTERNAL)
    return bytes(out)


# --- the wire format --------------------------------------------------------------------------------------

def _fields(src: BinaryIO, start: int, end: int):
    """(field number, wire type, value start, value end) of each field in src[start:end]; a varint's or a fixed
    value's span is its encoding, a length-delimited field's span its payload."""
    position = start
    while position < end:
        src.seek(position)
        tag, position = _read_varint(src, position, end)
        number, wire = tag >> 3, tag & 7
        if number == 0:
            raise WireError("field number 0")
        if wire == VARINT:
            _value, after = _read_varint(src, position, end)
        elif wire == FIXED64:
            after = position + 8
        elif wire == FIXED32:
            after = position + 4
        elif wire == LENGTH:
            length, position = _read_varint(src, position, end)
            after = position + length
        else:
            raise WireError(f"wire type {wire} (groups are not used by ONNX)")
        if after > end:
            raise WireError("a field runs past the end of its message")
        yield number, wire, position, after
        position = after


def _read_varint(src: BinaryIO, position: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if position >= end or shift > 63:
            raise WireError("a truncated or overlong varint")
        byte = src.read(1)
        if not byte:
            raise WireError("the file ends inside a varint")
        position += 1
        value |= (byte[0] & 0x7F) << shift
        shift += 7
        if not byte[0] & 0x80:
            return value, position


def _varint_at(src: BinaryIO, position: int) -> int:
    src.seek(position)
    return _read_varint(src, position, position + 10)[0]


def _varints(data: bytes) -> list[int]:
    values, value, shift = [], 0, 0
    for byte in data:
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            values.append(value)
            value = shift = 0
    return values


def _read(src: BinaryIO, start: int, end: int) -> bytes:
    src.seek(start)
    data = src.read(end - start)
    if len(data) != end - start:
        raise WireError("the file ends early")
    return data


def _raw(src: BinaryIO, start: int, end: int, number: int, wire: int) -> bytes:
    """A field re-encoded as it was (its key, its length where it has one, its bytes)."""
    payload = _read(src, start, end)
    return _key(number, wire) + (_varint(len(payload)) if wire == LENGTH else b"") + payload


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


def _string(number: int, text: str) -> bytes:
    data = text.encode()
    return _key(number, LENGTH) + _varint(len(data)) + data

