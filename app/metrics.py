"""/metrics for Prometheus: jobs, job durations, queue depth, upload bytes, HTTP latency.

Each app gets its own CollectorRegistry (tests build many apps in one process). What the database
and the broker know is read when Prometheus scrapes, so every API process reports the same truth:

- `modelpress_jobs{status}` and `modelpress_jobs_by_method{status,method}`: counts from the jobs
  table. A pipeline job counts once under each distinct method it runs, so the per-method series do
  not sum to the job count; `modelpress_jobs` does.
- `modelpress_job_duration_seconds{status}`: started -> finished of the jobs that finished within
  the last `metrics_duration_window_s` (default 24 h), as a *gauge histogram*. Jobs finish in the
  Celery workers, which Prometheus does not scrape (and the API may run several processes), so
  observing at finish time would scatter the histogram over processes that lose it on restart; the
  database sees every finish. The window bounds the query; a gauge histogram (buckets may go down as
  jobs leave the window) is the honest type for it: `histogram_quantile(0.95,
  modelpress_job_duration_seconds_bucket)` is the p95 over the window, no rate() needed.
- `modelpress_queue_depth{queue}`: messages waiting in each worker queue: LLEN of the Redis lists
  (every priority list kombu uses), or the message files of the filesystem transport.
  `modelpress_broker_up` says whether the broker answered.
- `modelpress_upload_bytes_total{kind,outcome}`: request-body bytes received by POST /v1/models and
  /v1/datasets (`outcome` stored for a 2xx answer, else rejected). Counted in this process.
- `modelpress_http_request_duration_seconds{method,route,status}`: every HTTP request, labelled
  by the route *template* (`/v1/jobs/{job_id}`), never the raw path, so label values stay bounded;
  a path no route matches is `route="unmatched"`.
"""
from __future__ import annotations

import datetime as dt
import hmac
import logging
import time
from collections.abc import Iterable

from fastapi import FastAPI, Request, Response
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeHistogramMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector
from sqlalchemy import func, select, text

from app.queue import QUEUES, redis_list_keys
from app.settings import Settings, get_settings

log = logging.getLogger("modelpress.metrics")

JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
HTTP_METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
JOB_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 43200, 86400)
UPLOAD_ROUTES = {"/v1/models": "model", "/v1/datasets": "dataset"}
MAX_DURATION_ROWS = 100_000  # a bound on one scrape's work, whatever the window holds


class DatabaseCollector(Collector):
    """Jobs by status and method, and the job duration histogram, read from the database at scrape time."""

    def __init__(self, settings: Settings) -> None:
        self.window_s = settings.metrics_duration_window_s

    def collect(self) -> Iterable[Metric]:
        from app.db import get_sessionmaker
        from app.dbmodels import Job

        try:
            with get_sessionmaker()() as db:
                by_status = dict(db.execute(select(Job.status, func.count()).group_by(Job.status)).all())
                by_method = db.execute(text(_BY_METHOD_SQL[db.get_bind().dialect.name])).all()
                since = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=self.window_s)
                finished = db.execute(
                    select(Job.status, Job.started_at, Job.finished_at)
                    .where(Job.finished_at >= since, Job.started_at.is_not(None)).limit(MAX_DURATION_ROWS)
                ).all()
        except Exception as exc:  # a scrape must not fail because the database is away
            log.warning("metrics: database unreadable: %s", exc)
            up = GaugeMetricFamily("modelpress_database_up", "Whether the database answered this scrape.")
            up.add_metric([], 0)
            yield up
            return
        up = GaugeMetricFamily("modelpress_database_up", "Whether the database answered this scrape.")
        up.add_metric([], 1)
        yield up

        jobs = GaugeMetricFamily("modelpress_jobs", "Jobs in the database, by status.", labels=["status"])
        for status in sorted(set(JOB_STATUSES) | set(by_status)):
            jobs.add_metric([status], by_status.get(status, 0))
        yield jobs

        per_method = GaugeMetricFamily(
            "modelpress_jobs_by_method",
            "Jobs by status and method; a pipeline counts once under each distinct method it runs.",
            labels=["status", "method"])
        for status, method, count in by_method:
            if method:
                per_method.add_metric([status, str(method)], count)
        yield per_method

        durations: dict[str, list[float]] = {}
        for status, started, ended in finished:
            if started is None or ended is None:
                continue  # the query selects only jobs with both
            durations.setdefault(status, []).append(max((_aware(ended) - _aware(started)).total_seconds(), 0.0))
        histogram = GaugeHistogramMetricFamily(
            "modelpress_job_duration_seconds",
            f"Run time (started to finished) of the jobs that finished in the last {self.window_s} s, by status.",
            labels=["status"])
        for status in sorted(set(JOB_STATUSES[2:]) | set(durations)):
            values = durations.get(status, [])
            buckets = [(_le(bound), sum(1 for v in values if v <= bound)) for bound in JOB_BUCKETS]
            buckets.append(("+Inf", len(values)))
            histogram.add_metric([status], buckets, gsum_value=sum(values))
        yield histogram


# Distinct methods per job, counted in SQL (the step list lives in the job's JSON spec).
_BY_METHOD_SQL = {
    "postgresql": (
        "SELECT j.status, s.value ->> 'method' AS method, count(DISTINCT j.id) FROM jobs j "
        "CROSS JOIN LATERAL jsonb_array_elements(CASE WHEN jsonb_typeof(j.spec -> 'steps') = 'array' "
        "THEN j.spec -> 'steps' ELSE '[]'::jsonb END) AS s(value) GROUP BY 1, 2"
    ),
    "sqlite": (
        "SELECT j.status, json_extract(s.value, '$.method') AS method, count(DISTINCT j.id) FROM jobs j, "
        "json_each(j.spec, '$.steps') AS s GROUP BY 1, 2"
    ),
}


def _aware(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def _le(bound: float) -> str:
    return f"{float(bound)}"


class QueueCollector(Collector):
    """Messages waiting in each worker queue, asked of the broker at scrape time."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def collect(self) -> Iterable[Metric]:
        depth = GaugeMetricFamily("modelpress_queue_depth", "Messages waiting in each worker queue.", labels=["queue"])
        up = GaugeMetricFamily("modelpress_broker_up", "Whether the broker answered this scrape.")
        try:
            sizes = queue_depths(self.settings)
        except Exception as exc:
            log.warning("metrics: broker unreadable: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        for queue, size in sizes.items():
            depth.add_metric([queue], size)
        yield up
        yield depth


def queue_depths(settings: Settings) -> dict[str, int]:
    """{logical queue name: waiting messages} for the queues the workers consume."""
    names = {queue: settings.queue_name(queue) for queue in QUEUES}
    if settings.celery_broker_url.startswith("filesystem"):
        # kombu's filesystem transport keeps one file per message: <time>_<uuid>.<queue>.msg
        folder = settings.broker_folder / "queue"
        counts = dict.fromkeys(names, 0)
        wanted = {f"{name}.msg": queue for queue, name in names.items()}
        if folder.is_dir():
            for entry in folder.iterdir():
                queue = wanted.get(entry.name.partition(".")[2])
                if queue is not None:
                    counts[queue] += 1
        return counts
    from app.queue import get_celery

    with get_celery().connection_for_read() as conn:
        conn.ensure_connection(max_retries=1, timeout=2)
        channel = conn.default_channel
        client = getattr(channel, "client", None)
        if conn.transport.driver_type == "redis" and client is not None:
            # Celery's Redis transport keeps a list per queue and priority step: LLEN of each.
            with client.pipeline() as pipe:
                keys = {queue: redis_list_keys(channel, name) for queue, name in names.items()}
                for queue_keys in keys.values():
                    for key in queue_keys:
                        pipe.llen(key)
                sizes = iter(pipe.execute())
            return {queue: sum(next(sizes) for _ in queue_keys) for queue, queue_keys in keys.items()}
        counts = {}
        for queue, name in names.items():
            try:
                counts[queue] = channel.queue_declare(queue=name, passive=True).message_count
            except Exception:  # a queue nobody declared yet holds nothing
                counts[queue] = 0
                channel = conn.channel()
        return counts


class Metrics:
    """The app's registry and the metrics observed in this process."""

    def __init__(self, settings: Settings) -> None:
        self.registry = CollectorRegistry()
        self.http_latency = Histogram(
            "modelpress_http_request_duration_seconds", "HTTP request latency, by method, route template and status.",
            ["method", "route", "status"], buckets=HTTP_BUCKETS, registry=self.registry)
        self.upload_bytes = Counter(
            "modelpress_upload_bytes", "Request-body bytes received by the model and dataset upload routes.",
            ["kind", "outcome"], registry=self.registry)
        self.registry.register(DatabaseCollector(settings))
        self.registry.register(QueueCollector(settings))


class MetricsMiddleware:
    """Pure ASGI middleware: times every HTTP request and counts upload bytes (streaming-safe)."""

    def __init__(self, app, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        state = {"status": 500, "body": 0}

        async def counting_receive():
            message = await receive()
            if message["type"] == "http.request":
                state["body"] += len(message.get("body", b""))
            return message

        async def status_send(message):
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
            await send(message)

        try:
            await self.app(scope, counting_receive, status_send)
        finally:
            method = scope["method"] if scope["method"] in HTTP_METHODS else "OTHER"
            route = route_template(scope)
            self.metrics.http_latency.labels(method, route, str(state["status"])).observe(
                time.perf_counter() - started)
            kind = UPLOAD_ROUTES.get(route)
            if kind and method == "POST":
                outcome = "stored" if 200 <= state["status"] < 300 else "rejected"
                self.metrics.upload_bytes.labels(kind, outcome).inc(state["body"])


def route_template(scope) -> str:
    """The matched route's path template (set in the scope by the router), or "unmatched"."""
    # FastAPI (0.16x) keeps routes of included routers unflattened: scope["route"] holds the inner route
    # ("/models/{model_id}") and the effective route context the full template ("/v1/models/{model_id}").
    fastapi_scope = scope.get("fastapi")
    context = fastapi_scope.get("effective_route_context") if isinstance(fastapi_scope, dict) else None
    for candidate in (context, scope.get("route")):
        path = getattr(candidate, "path_format", None) or getattr(candidate, "path", None)
        if isinstance(path, str) and path:
            return path
    return "unmatched"


def install(app: FastAPI, settings: Settings | None = None) -> None:
    """Add the latency middleware and GET /metrics (unless metrics are off)."""
    settings = settings or get_settings()
    if not settings.metrics_enabled:
        return
    metrics = Metrics(settings)
    app.state.metrics = metrics
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    token = settings.metrics_token

    def prometheus_metrics(request: Request) -> Response:
        if token:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                return Response("a valid metrics token is needed\n", status_code=401, media_type="text/plain",
                                headers={"WWW-Authenticate": "Bearer"})
        encoder, content_type = choose_encoder(request.headers.get("accept", ""))
        return Response(encoder(metrics.registry), media_type=content_type)

    app.add_api_route("/metrics", prometheus_metrics, methods=["GET"], include_in_schema=False)
