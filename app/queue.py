"""The Celery app's configuration, shared by the API (which only sends) and the workers.

A message carries only a job id; Postgres (or SQLite) holds the job's state.
"""
from __future__ import annotations

import functools

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
