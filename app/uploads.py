"""Streaming request bodies to disk: raw octet-stream or multipart, hashed on the way.

Memory use does not grow with the upload: chunks go straight to a file in the
store's tmp folder, and the size cap is enforced as bytes arrive.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from app.edge import check_text
from app.errors import ModelPressError, PayloadTooLarge, Unprocessable, UnsupportedMediaType

MAX_FORM_FIELD_BYTES = 64 * 1024


@dataclass
class _MultipartState:
    """What the multipart parser's callbacks carry from one call to the next."""

    header_field: bytes = b""
    header_value: bytes = b""
    headers: dict[str, bytes] = field(default_factory=dict)
    name: str | None = None  # the current part's form name
    buf: bytearray | None = None  # a form field's bytes (the file part streams to disk instead)
    file_seen: bool = False
    file_name: str = ""
    file_size: int = 0
# What a multipart body may hold besides its file (boundaries, part headers, a few form fields).
MULTIPART_SLACK_BYTES = 4 * MAX_FORM_FIELD_BYTES


@dataclass
class Received:
    path: Path
    filename: str
    sha256: str
    size_bytes: int
    fields: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Quota:
    """What the tenant may still store, and the error (given the upload's size so far) past it."""

    left_bytes: int
    error: Callable[[int], Exception]


def _size_check(max_bytes: int, quota: Quota | None) -> Callable[[int], None]:
    def check(size: int) -> None:
        # The cap first: a file too large for the server is a 413, not a 429 that retrying would not mend.
        if size > max_bytes:
            raise PayloadTooLarge(f"upload exceeds the {max_bytes} byte limit", limit_bytes=max_bytes)
        if quota is not None and size > quota.left_bytes:
            raise quota.error(size)
    return check


async def receive_file(request: Request, *, dest: Path, max_bytes: int, quota: Quota | None = None) -> Received:
    """Stream the request's file to dest. Accepts multipart (field `file`) or a raw body with X-Filename.

    The size cap and the tenant's storage quota are checked against Content-Length first (nothing is read
    when it is too large), then as bytes arrive.
    """
    check = _size_check(max_bytes, quota)
    content_type = request.headers.get("content-type", "")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit():
        # A multipart body is its file plus framing and small fields: only what must be file counts here, so a
        # file that fits is never refused for its framing (the stream is checked byte by byte anyway).
        slack = MULTIPART_SLACK_BYTES if content_type.startswith("multipart/form-data") else 0
        check(max(int(declared) - slack, 0))
    if content_type.startswith("multipart/form-data"):
        return await _receive_multipart(request, dest=dest, check=check)
    if content_type.startswith("application/octet-stream"):
        filename = request.headers.get("x-filename", "").strip()
        if not filename:
            raise Unprocessable("a raw upload needs an X-Filename header (e.g. model.onnx)", code="missing_filename")
        digest, size = hashlib.sha256(), 0
        with open(dest, "wb") as fh:
            async for chunk in request.stream():
                size += len(chunk)
                check(size)
                digest.update(chunk)
                fh.write(chunk)
        return Received(dest, filename, digest.hexdigest(), size)
    raise UnsupportedMediaType(
        "upload as multipart/form-data (field 'file') or as application/octet-stream with an X-Filename header"
    )


async def _receive_multipart(request: Request, *, dest: Path, check: Callable[[int], None]) -> Received:
    _, params = parse_options_header(request.headers["content-type"])
    boundary = params.get(b"boundary")
    if not boundary:
        raise Unprocessable("multipart body without a boundary", code="invalid_multipart")

    state = _MultipartState()
    fields: dict[str, str] = {}
    digest = hashlib.sha256()
    out = open(dest, "wb")

    def on_part_begin() -> None:
        state.headers, state.name, state.buf = {}, None, None

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state.header_field += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state.header_value += data[start:end]

    def on_header_end() -> None:
        state.headers[state.header_field.decode("latin-1").lower()] = state.header_value
        state.header_field = b""
        state.header_value = b""

    def on_headers_finished() -> None:
        _, disp = parse_options_header(state.headers.get("content-disposition", b""))
        name = disp.get(b"name", b"").decode("utf-8", "replace")
        filename = disp.get(b"filename")
        state.name = name
        if name == "file":
            if state.file_seen:
                raise Unprocessable("send one file per upload", code="invalid_multipart")
            state.file_seen = True
            state.file_name = (filename or b"").decode("utf-8", "replace")
        else:
            state.buf = bytearray()

    def on_part_data(data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if state.name == "file":
            state.file_size += len(chunk)
            check(state.file_size)
            digest.update(chunk)
            out.write(chunk)
        elif state.buf is not None:
            state.buf += chunk
            if len(state.buf) > MAX_FORM_FIELD_BYTES:
                raise Unprocessable(f"form field {state.name!r} is too long", code="invalid_multipart")

    def on_part_end() -> None:
        if state.name and state.name != "file":
            fields[state.name] = bytes(state.buf or b"").decode("utf-8", "replace")

    parser = MultipartParser(
        boundary,
        callbacks={
            "on_part_begin": on_part_begin,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_headers_finished": on_headers_finished,
        },
    )
    try:
        async for chunk in request.stream():
            parser.write(chunk)
        parser.finalize()
    except (ModelPressError, ClientDisconnect):  # ours (the size cap, the quota, a malformed part), or a hang-up
        raise
    except Exception as exc:  # the parser's own errors: a malformed body
        raise Unprocessable(f"malformed multipart body: {exc}", code="invalid_multipart") from exc
    finally:
        out.close()
    if not state.file_seen:
        raise Unprocessable("the multipart body has no 'file' field", code="missing_file")
    filename = fields.get("filename") or state.file_name
    if not filename:
        raise Unprocessable("the 'file' part has no filename (e.g. model.onnx)", code="missing_filename")
    check_text("the file's filename", filename)
    for name, value in fields.items():
        check_text(f"form field {name!r}", name + value)
    return Received(dest, filename, digest.hexdigest(), state.file_size, fields)
