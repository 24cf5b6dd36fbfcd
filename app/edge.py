"""Text the database cannot store is refused at the edge, before any route runs.

PostgreSQL's text and JSONB refuse NUL (U+0000), and UTF-8 has no encoding for a lone surrogate (U+D800..U+DFFF)
that a JSON `\\ud800` escape can carry. Such a character in a path, a query parameter, a header or a string
anywhere in a JSON body is a 422 `invalid_character` naming where it was, whatever the route; multipart
uploads check their filename and form fields the same way (app.uploads). Nothing reaches a service function.
"""
from __future__ import annotations

import json
import re
from urllib.parse import unquote_to_bytes

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import Unprocessable
from app.formats.text import UNSTORABLE

# JSON bodies larger than this are not scanned here (the routes that take JSON take small documents; their
# strings are bounded by their schemas).
MAX_SCANNED_BODY = 1 << 20
PROBLEM = "application/problem+json"


def check_text(where: str, text: str) -> None:
    """Unprocessable(invalid_character) when `text` holds a character the database cannot store."""
    found = UNSTORABLE.search(text)
    if found:
        raise InvalidCharacter(where, found.group())


class InvalidCharacter(Unprocessable):
    code = "invalid_character"

    def __init__(self, where: str, char: str) -> None:
        name = "NUL (U+0000)" if char == "\x00" else f"a lone surrogate (U+{ord(char):04X})"
        super().__init__(f"{where} contains {name}, which cannot be stored; remove it", field=where)


def _first_unstorable(value, path: str) -> tuple[str, str] | None:
    if isinstance(value, str):
        found = UNSTORABLE.search(value)
        return (path, found.group()) if found else None
    if isinstance(value, dict):
        for key, item in value.items():
            here = f"{path}.{key}" if path else str(key)
            found = UNSTORABLE.search(key) if isinstance(key, str) else None
            if found:
                return here, found.group()
            hit = _first_unstorable(item, here)
            if hit:
                return hit
    if isinstance(value, list):
        for index, item in enumerate(value):
            hit = _first_unstorable(item, f"{path}[{index}]")
            if hit:
                return hit
    return None


class RefuseUnstorableText:
    """ASGI middleware: 422 invalid_character for NUL or lone surrogates in the path, the query, a header, or a
    JSON body's strings (body read once and replayed to the app)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        problem = self._in_request_line(scope)
        replay: list[Message] | None = None
        if problem is None and scope["method"] in ("POST", "PUT", "PATCH") and self._is_json(scope):
            replay, body = await self._read(receive)
            if body is not None:
                problem = self._in_json(body)
        if problem is not None:
            await self._refuse(scope, send, problem)
            return
        if replay is not None:
            messages = iter(replay)

            async def replayed() -> Message:
                try:
                    return next(messages)
                except StopIteration:
                    return await receive()

            await self.app(scope, replayed, send)
            return
        await self.app(scope, receive, send)

    @staticmethod
    def _in_request_line(scope: Scope) -> InvalidCharacter | None:
        try:
            check_text("path", scope["path"])
            raw_query = scope.get("query_string", b"")
            for pair in raw_query.split(b"&"):
                name, _, value = pair.partition(b"=")
                decoded_name = unquote_to_bytes(name.replace(b"+", b" "))
                decoded = unquote_to_bytes(value.replace(b"+", b" "))
                label = decoded_name.decode("utf-8", "replace").replace("\x00", "") or "query"
                if b"\x00" in decoded_name or b"\x00" in decoded:
                    raise InvalidCharacter(f"query parameter {label!r}", "\x00")
                # CESU-style encoded surrogates (ED A0 80..ED BF BF) are not UTF-8: refuse them as surrogates.
                if re.search(rb"\xed[\xa0-\xbf][\x80-\xbf]", decoded):
                    raise InvalidCharacter(f"query parameter {label!r}", "\ud800")
            for name, value in scope.get("headers", []):
                if b"\x00" in value:
                    raise InvalidCharacter(f"header {name.decode('latin-1')!r}", "\x00")
        except InvalidCharacter as exc:
            return exc
        return None

    @staticmethod
    def _is_json(scope: Scope) -> bool:
        for name, value in scope.get("headers", []):
            if name == b"content-type":
                kind = value.split(b";", 1)[0].strip().lower()
                return kind == b"application/json" or kind.endswith(b"+json")
        return False

    @staticmethod
    async def _read(receive: Receive) -> tuple[list[Message], bytes | None]:
        """The body's messages, and the body itself when it is small enough to scan."""
        messages: list[Message] = []
        size, chunks = 0, []
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                return messages, None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > MAX_SCANNED_BODY:
                return messages, None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return messages, b"".join(chunks)

    @staticmethod
    def _in_json(body: bytes) -> InvalidCharacter | None:
        if b"\\u" not in body and b"\x00" not in body and b"\xed" not in body:
            return None  # the only ways to spell NUL or a surrogate in JSON
        try:
            document = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return None  # not JSON: the route's own validation answers
        hit = _first_unstorable(document, "")
        return InvalidCharacter(hit[0] or "body", hit[1]) if hit else None

    @staticmethod
    async def _refuse(scope: Scope, send: Send, error: InvalidCharacter) -> None:
        body = json.dumps(error.problem(scope.get("path", "")[:256])).encode()
        await send({"type": "http.response.start", "status": error.status,
                    "headers": [(b"content-type", PROBLEM.encode()), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
