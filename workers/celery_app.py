"""The workers' Celery app: `celery -A workers.celery_app worker -Q gpu,cpu`."""
from __future__ import annotations

from app.queue import make_celery
from app.retention import beat_schedule
from app.settings import get_settings
from workers.recovery import beat_schedule as recovery_schedule

celery = make_celery(get_settings())
app = celery
# Periodic tasks for `celery beat` (or `worker -B`): the recovery sweep always, retention when
# MODELPRESS_RETENTION_DAYS > 0.
celery.conf.beat_schedule = {**(celery.conf.beat_schedule or {}), **recovery_schedule(get_settings()),
                             **beat_schedule(get_settings())}

import workers.tasks  # noqa: E402  (registers the tasks on this app)
import workers.webhooks  # noqa: E402,F401
