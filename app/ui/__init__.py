"""The dashboard: one page under /ui whose every asset (HTML, CSS, JS modules) the app serves itself.

No CDN and no external font: the Content-Security-Policy below lets the page load only from this
origin, so a forgotten external link fails loudly in the browser instead of quietly phoning out.
"""
from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).parent / "static"

# blob: serves downloads fetched with the Authorization header; everything else comes from this origin.
CSP = ("default-src 'self'; img-src 'self' blob: data:; connect-src 'self'; style-src 'self'; "
       "script-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")


def _index() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html",
                        headers={"Cache-Control": "no-cache", "Content-Security-Policy": CSP,
                                 "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"})


def mount_ui(app: FastAPI) -> None:
    """GET /ui (and /ui/) answers the single page; /ui/static/... its assets. No key needed to load them:
    the page asks for one and sends it on every API call."""
    app.add_api_route("/ui", _index, methods=["GET"], include_in_schema=False)
    app.add_api_route("/ui/", _index, methods=["GET"], include_in_schema=False)
    app.mount("/ui/static", StaticFiles(directory=STATIC_DIR), name="ui-static")
