"""The Celery app's configuration, shared by the API (which only sends) and the workers.

A message carries only a job id; Postgres (or SQLite) holds the job's state.
"""
from __future__ import annotations

import functools
import json
from collections.abc import Iterable

from celery import Celery

from app.settings import Settings, get_settings

RUN_JOB_TASK = "modelpress.run_job"


def make_celery(settings: Settings) -> Celery:
    celery = Celery("modelpress", broker=settings.celery_broker_url, set_as_current=False)
    transport_options: dict = {}
    if settings.celery_broker_url.startswith("filesystem"):
        folder = settings.broker_folder / "queue"
        for sub in ("processed", "control"):
            (settings.broker_folder / sub).mkdir(parents=True, exist_ok=True)
        folder.mkdir(parents=True, exist_ok=True)
        transport_options = {
            "data_folder_in": str(folder),
            "data_folder_out": str(folder),
            "processed_folder": str(settings.broker_folder / "processed"),
            "control_folder": str(settings.broker_folder / "control"),
            "store_processed": False,
        }
    else:
        # Unacknowledged messages come back after this long: longer than the longest job.
        transport_options = {"visibility_timeout": settings.visibility_timeout_s}
    celery.conf.update(
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=5,
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue=settings.queue_name(settings.default_queue),
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.5, "interval_max": 1},
        worker_hijack_root_logger=False,
        worker_enable_remote_control=not settings.celery_broker_url.startswith("filesystem"),
        worker_send_task_events=False,
    )
    return celery


@functools.lru_cache
def get_celery() -> Celery:
    return make_celery(get_settings())


def enqueue_job(job_id: str, queue: str) -> None:
    settings = get_settings()
    get_celery().send_task(RUN_JOB_TASK, args=[job_id], queue=settings.queue_name(queue))


def broker_reachable() -> tuple[bool, str]:
    settings = get_settings()
    if settings.celery_broker_url.startswith("filesystem"):
        folder = settings.broker_folder / "queue"
        ok = folder.is_dir()
        return ok, "filesystem broker folder present" if ok else f"broker folder {folder} missing"
    try:
        with get_celery().connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
        return True, "broker reachable"
    except Exception as exc:  # any failure means not ready
        return False, f"broker unreachable: {exc}"


QUEUES = ("cpu", "gpu")  # ONNX Runtime's queues; every other target has one of its own (app.targets.schemas.queue_for)


def redis_list_keys(channel, name: str) -> list[str]:
    """The Redis lists Celery's transport keeps for one queue: one per priority step."""
    return [channel._q_for_pri(name, pri) for pri in channel.priority_steps]


def _job_id_of(payload: dict) -> str | None:
    """The job id a kombu message (as the Redis and filesystem transports store it) carries, if it runs one."""
    import base64

    headers = payload.get("headers") or {}
    if headers.get("task") != RUN_JOB_TASK:
        return None
    body = payload.get("body", "")
    try:
        if (payload.get("properties") or {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        return str(args[0]) if args else None
    except (ValueError, TypeError, IndexError, KeyError):
        return None


def queued_job_ids(settings: Settings, queues: Iterable[str] = ()) -> set[str] | None:
    """Ids of the jobs whose message waits in the broker (in QUEUES and `queues`: a target's queue, say) or is held,
    unacknowledged, by a worker.

    None when this broker cannot be looked into (then nothing can be said to be missing). A job `queued` in the
    database but absent here has lost its message (a Redis restart or flush) and must be sent again.
    """
    ids: set[str] = set()
    names = [settings.queue_name(queue) for queue in dict.fromkeys([*QUEUES, *queues])]
    if settings.celery_broker_url.startswith("filesystem"):
        folder = settings.broker_folder / "queue"
        wanted = {f"{name}.msg" for name in names}
        for entry in folder.iterdir() if folder.is_dir() else []:
            if entry.name.partition(".")[2] not in wanted:
                continue
            try:
                job_id = _job_id_of(json.loads(entry.read_text()))
            except (OSError, ValueError):  # consumed while we looked, or half written
                continue
            if job_id:
                ids.add(job_id)
        return ids
    with get_celery().connection_for_read() as conn:
        conn.ensure_connection(max_retries=1, timeout=2)
        channel = conn.default_channel
        client = getattr(channel, "client", None)
        if conn.transport.driver_type != "redis" or client is None:
            return None
        keys = [key for name in names for key in redis_list_keys(channel, name)]
        with client.pipeline() as pipe:
            for key in keys:
                pipe.lrange(key, 0, -1)
            pipe.hvals(channel.unacked_key)
            *waiting, unacked = pipe.execute()
    for raw in (item for batch in waiting for item in batch):
        try:
            job_id = _job_id_of(json.loads(raw))
        except ValueError:
            continue
        if job_id:
            ids.add(job_id)
    for raw in unacked:  # [message, exchange, routing key] of each delivered, unacknowledged message
        try:
            job_id = _job_id_of(json.loads(raw)[0])
        except (ValueError, IndexError, TypeError):
            continue
        if job_id:
            ids.add(job_id)
    return ids
