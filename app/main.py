"""The FastAPI application: /v1 (authenticated), /healthz and /readyz (open)."""
from __future__ import annotations

import contextlib
import logging

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy import text
from sqlalchemy.exc import DataError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from app.audit.routes import router as audit_router
from app.auth.routes import router as keys_router
from app.datasets.routes import router as datasets_router
from app.db import get_sessionmaker
from app.deps import current_key
from app.edge import RefuseUnstorableText
from app.errors import ModelPressError
from app.events import publish as publish_event_schemas
from app.gates.routes import router as gates_router
from app.integrations.routes import router as integrations_router
from app.jobs.routes import router as jobs_router
from app.measurements.routes import router as measurements_router
from app.methods_api.routes import recipes_router
from app.methods_api.routes import router as methods_router
from app.metrics import install as install_metrics
from app.models.routes import router as models_router
from app.queue import broker_reachable, get_celery
from app.readcache import get_cache, start_listener
from app.settings import get_settings
from app.store import get_store
from app.targets.routes import router as targets_router
from app.ui import mount_ui
from app.webhooks.routes import router as webhooks_router

log = logging.getLogger("modelpress.api")
PROBLEM = "application/problem+json"


def _problem(status: int, code: str, title: str, detail: str, instance: str, **extra) -> JSONResponse:
    body = {"type": f"https://modelpress.dev/problems/{code}", "title": title, "status": status, "code": code,
            "detail": detail, "message": detail, "instance": instance, **extra}
    return JSONResponse(body, status_code=status, media_type=PROBLEM)


def _instance(request: Request) -> str:
    """The problem's `instance`: the request path, cut so that a 100 KB id is not echoed back whole."""
    path = request.url.path
    return path if len(path) <= 256 else path[:256] + "..."


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI):
    # Configuring Celery creates the embedded broker's folders, so /readyz is true from the first request.
    get_celery()
    # What an earlier API process left when it died mid-upload (folders of live processes are locked).
    removed = get_store().clean_tmp()
    if removed:
        log.warning("removed %d leftover upload/work folder(s) of stopped processes from tmp/", len(removed))
    # Keys and job views are cached per process, invalidated by PostgreSQL's notifications (app.readcache).
    listener = start_listener(get_settings().sqlalchemy_url)
    yield
    if listener is not None:
        listener.stopping.set()
        get_cache().reset(enabled=False)


def create_app() -> FastAPI:
    app = FastAPI(
        lifespan=_lifespan,
        title="ModelPress",
        version="0.1.0",
        description="Neural-network compression as an API: upload an ONNX model, compress it, measure it, download it.",
    )

    @app.exception_handler(ModelPressError)
    async def _domain_error(request: Request, exc: ModelPressError):
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else {}
        if "retry_after_s" in exc.extra:  # 429s (rate limit, quotas) say when to come back
            headers["Retry-After"] = str(exc.extra["retry_after_s"])
        return JSONResponse(exc.problem(_instance(request)), status_code=exc.status, media_type=PROBLEM, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        errors = [
            {"field": ".".join(str(p) for p in err["loc"] if p != "body") or "body", "message": err["msg"]}
            for err in exc.errors()
        ]
        detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors[:5])
        return _problem(422, "invalid_request", "Invalid request", detail, _instance(request), errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _problem(exc.status_code, code, str(exc.detail), str(exc.detail), _instance(request))

    @app.exception_handler(ClientDisconnect)
    async def _client_gone(request: Request, exc: ClientDisconnect):
        # The client hung up mid-request (an upload cut off, say): its business, not a server error. 499 is
        # nginx's "client closed request"; nobody reads it, but /metrics counts it as such.
        log.info("client disconnected during %s %s", request.method, _instance(request))
        return _problem(499, "client_disconnected", "Client closed request", "the client closed the connection "
                        "before the request was read", _instance(request))

    @app.exception_handler(DataError)
    async def _data_error(request: Request, exc: DataError):
        # A value the database refuses (out of its range, unstorable text) that validation did not catch first.
        log.warning("database refused a value on %s %s: %s", request.method, request.url.path,
                    str(exc.orig).splitlines()[0] if exc.orig else exc)
        return _problem(422, "invalid_value", "Invalid value", "a value in the request is outside what the server "
                        "can store (too large, too far in time, or an unstorable character)", _instance(request))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, _instance(request))
        return _problem(500, "internal_error", "Internal error", "an unexpected error occurred; it has been logged",
                        _instance(request))

    # Authentication, the scope check and the rate limit sit on the parent router, so a new /v1 route
    # cannot forget them.
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(current_key)])
    v1.include_router(models_router)
    v1.include_router(datasets_router)
    v1.include_router(jobs_router)
    v1.include_router(gates_router)
    v1.include_router(measurements_router)
    v1.include_router(methods_router)
    v1.include_router(recipes_router)
    v1.include_router(targets_router)
    v1.include_router(webhooks_router)
    v1.include_router(integrations_router)
    v1.include_router(keys_router)
    v1.include_router(audit_router)
    app.include_router(v1)
    mount_ui(app)  # the dashboard under /ui (static, no key needed to load it)
    # NUL and lone surrogates refused before any route (PostgreSQL cannot store them); inside the metrics
    # middleware, so the refusals are counted.
    app.add_middleware(RefuseUnstorableText)
    install_metrics(app)  # GET /metrics (Prometheus, outside /v1) and the HTTP latency middleware
    publish_event_schemas(app)  # the webhook body's and the SSE data's schemas, in /openapi.json

    @app.get("/healthz", tags=["health"])
    def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"])
    def readyz():
        checks = {}
        try:
            with get_sessionmaker()() as session:
                session.execute(text("SELECT 1"))
            checks["database"] = {"ok": True}
        except Exception as exc:
            checks["database"] = {"ok": False, "detail": str(exc)}
        ok, detail = broker_reachable()
        checks["broker"] = {"ok": ok, "detail": detail}
        ready = all(c["ok"] for c in checks.values())
        return JSONResponse({"status": "ready" if ready else "not_ready", "checks": checks},
                            status_code=200 if ready else 503)

    return app


app = create_app()
