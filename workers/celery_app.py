"""The workers' Celery app: `celery -A workers.celery_app worker -Q gpu,cpu`."""
from __future__ import annotations

from app.queue import make_celery
from app.settings import get_settings

celery = make_celery(get_settings())
app = celery

import workers.tasks  # noqa: E402,F401  (registers the tasks on this app)
