"""Blob downloads over HTTP with single byte ranges (RFC 9110 §14), for every store backend.

- `Range: bytes=a-b`, `bytes=a-` and `bytes=-n` answer 206 with `Content-Range: bytes a-b/size`.
- A range that starts at or past the end (or `bytes=-0`, or any range of an empty blob) answers 416
  with `Content-Range: bytes */size` and a problem+json body (`range_not_satisfiable`).
- Several ranges in one header (`bytes=0-1,5-6`) answer 200 with the whole blob: RFC 9110 lets a server
  ignore Range, and multipart/byteranges bodies buy clients little while costing one store read per part.
  A header that is not valid `bytes=` syntax (`bytes=5-2`, `items=0-1`) is ignored the same way.
- `If-Range` with the ETag (`"<sha256>"`, a strong validator: the content never changes) keeps the
  range; any other If-Range value (another ETag, a date) answers the whole blob.
- Full answers carry `Accept-Ranges: bytes`; every answer carries the ETag and `X-Content-SHA256`.

Bytes are streamed from the store (a local file, or S3 GetObject with the same Range), never
held in memory whole.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from fastapi import Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from app.errors import RangeNotSatisfiable
from app.store import ArtifactStore

_RANGE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class ByteRange:
    start: int
    end: int  # inclusive

    @property
    def length(self) -> int:
        return self.end - self.start + 1


class Unsatisfiable(Exception):
    pass


def parse_range(header: str | None, size: int) -> ByteRange | None:
    """The one byte range a Range header asks for; None means "send everything".

    Raises Unsatisfiable when the (valid, single) range selects no byte of a blob of `size` bytes.
    """
    if not header or "," in header:
        return None
    match = _RANGE.match(header)
    if match is None:
        return None
    first, last = match.group(1), match.group(2)
    if first == "" and last == "":
        return None
    if first == "":  # suffix: the last n bytes
        n = int(last)
        if n == 0 or size == 0:
            raise Unsatisfiable()
        return ByteRange(max(size - n, 0), size - 1)
    start = int(first)
    end = int(last) if last else size - 1
    if last and end < start:
        return None  # invalid syntax: ignored, as RFC 9110 asks
    if start >= size:
        raise Unsatisfiable()
    return ByteRange(start, min(end, size - 1))


def download_filename(name: str, suffix: str, fallback: str) -> str:
    """The name a download is saved under: the upload's own file name when it ends in `suffix`, else its stem (or
    `fallback` when it has none) with `suffix`; never a folder part."""
    stem = Path(name).name
    return stem if stem.endswith(suffix) else f"{Path(stem).stem or fallback}{suffix}"


def content_disposition(filename: str) -> str:
    quoted = quote(filename)
    if quoted == filename:
        return f'attachment; filename="{filename}"'
    return f"attachment; filename*=utf-8''{quoted}"


def blob_response(
    request: Request, *, store: ArtifactStore, sha256: str, size: int, media_type: str, filename: str,
) -> Response:
    """The blob as a download: whole (200) or the one range the request asks for (206), or 416."""
    etag = f'"{sha256}"'
    headers = {
        "Accept-Ranges": "bytes",
        "ETag": etag,
        "X-Content-SHA256": sha256,
        "Content-Disposition": content_disposition(filename),
    }
    header = request.headers.get("range")
    if_range = request.headers.get("if-range")
    if header and if_range is not None and if_range.strip() != etag:
        header = None  # the client holds another version: send the whole of this one
    try:
        wanted = parse_range(header, size)
    except Unsatisfiable:
        error = RangeNotSatisfiable(f"the range {header!r} selects no byte of this {size}-byte file",
                                    size_bytes=size)
        return JSONResponse(error.problem(request.url.path), status_code=416, media_type="application/problem+json",
                            headers={"Content-Range": f"bytes */{size}", "ETag": etag})
    if wanted is None:
        body = store.open_range(sha256)
        return StreamingResponse(body, media_type=media_type, headers={**headers, "Content-Length": str(size)})
    body = store.open_range(sha256, wanted.start, wanted.end)
    return StreamingResponse(body, status_code=206, media_type=media_type, headers={
        **headers, "Content-Length": str(wanted.length),
        "Content-Range": f"bytes {wanted.start}-{wanted.end}/{size}",
    })
