"""Recovery from the database's side (issue 9): claims, the reaper, lost messages, stale scratch folders.

These drive workers.recovery.reap and workers.supervise.run_job directly over the embedded broker and, for the
broker inspection, over Redis; tests/workers/test_faults.py kills real workers and restarts a real Redis.
"""
from __future__ import annotations

import datetime as dt
import json
import socket
import subprocess
import sys

import pytest

from app.db import session_scope
from app.dbmodels import Job, JobEvent, utcnow
from tests.helpers import make_key, mlp_onnx_bytes
from workers.recovery import reap


def queued_messages(data_dir) -> list[str]:
    """Job ids of the messages waiting in the embedded filesystem broker."""
    import base64

    folder = data_dir / "broker" / "queue"
    ids = []
    for path in sorted(folder.glob("*.msg")):
        payload = json.loads(path.read_text())
        ids.append(json.loads(base64.b64decode(payload["body"]))[0][0])
    return ids


def drain(data_dir) -> None:
    for path in (data_dir / "broker" / "queue").glob("*.msg"):
        path.unlink()


@pytest.fixture
def job_id(client) -> str:
    headers = {"Authorization": f"Bearer {make_key('alice')}"}
    model = client.post("/v1/models", files={"file": ("m.onnx", mlp_onnx_bytes())}, headers=headers).json()
    resp = client.post("/v1/jobs", headers=headers, json={
        "model_id": model["id"], "steps": [{"method": "quantize.int8_dynamic"}],
        "evaluate": {"batch_sizes": [1], "warmup": 1, "iterations": 3}})
    assert resp.status_code == 202, resp.text
    return resp.json()["id"]


def set_job(job_id: str, **values) -> None:
    with session_scope() as db:
        job = db.get(Job, job_id)
        for name, value in values.items():
            setattr(job, name, value)


def job(job_id: str) -> Job:
    with session_scope() as db:
        return db.get(Job, job_id)


def messages_of(job_id: str) -> list[str]:
    with session_scope() as db:
        return [e.message for e in db.query(JobEvent).filter(JobEvent.job_id == job_id).order_by(JobEvent.id)]


def ago(seconds: float) -> dt.datetime:
    return utcnow() - dt.timedelta(seconds=seconds)


def test_a_running_job_with_a_stale_heartbeat_is_requeued_and_sent_again(job_id, data_dir):
    drain(data_dir)
    set_job(job_id, status="running", attempts=1, heartbeat_at=ago(600), worker_id="elsewhere:1")
    outcome = reap()
    assert outcome["requeued"] == [job_id]
    row = job(job_id)
    assert row.status == "queued" and row.worker_id is None
    assert "requeued after attempt 1" in messages_of(job_id)[-1]
    assert "stopped sending heartbeats 600 s ago" in messages_of(job_id)[-1]
    assert queued_messages(data_dir) == [job_id]
    # The next attempt drops nothing twice and finishes once.
    from workers.supervise import run_job

    run_job(job_id)
    row = job(job_id)
    assert row.status == "succeeded" and row.attempts == 2


def test_a_lost_job_out_of_attempts_fails_with_worker_lost(job_id, data_dir, monkeypatch):
    drain(data_dir)
    set_job(job_id, status="running", attempts=3, heartbeat_at=ago(600))
    assert reap()["failed"] == [job_id]
    row = job(job_id)
    assert row.status == "failed" and row.error_code == "worker_lost"
    assert "attempt 3 of 3" in row.error_message
    assert queued_messages(data_dir) == []


def test_a_live_heartbeat_is_left_alone(job_id, data_dir):
    drain(data_dir)
    set_job(job_id, status="running", attempts=1, heartbeat_at=ago(5))
    assert reap() == {"requeued": [], "failed": [], "resent": []}
    assert job(job_id).status == "running"


def test_a_queued_job_whose_message_was_lost_is_sent_again_once(job_id, data_dir, monkeypatch):
    monkeypatch.setenv("MODELPRESS_REQUEUE_GRACE_S", "0")
    from app.settings import get_settings

    get_settings.cache_clear()
    assert queued_messages(data_dir) == [job_id]
    assert reap()["resent"] == []  # its message is there: nothing to do
    drain(data_dir)  # the broker lost it
    assert reap()["resent"] == [job_id]
    assert queued_messages(data_dir) == [job_id]
    assert "sent to the queue again" in messages_of(job_id)[-1]
    assert reap()["resent"] == []  # sent once: the message is there again


def test_a_message_on_its_way_is_not_taken_for_lost(job_id, data_dir):
    drain(data_dir)  # updated just now: within requeue_grace_s (30 s by default)
    assert reap()["resent"] == []


def test_the_broker_is_looked_into_on_redis_too(client, redis_prefix):
    """Waiting and delivered-but-unacknowledged messages both count as present."""
    from app.queue import get_celery, queued_job_ids
    from app.settings import get_settings

    settings = get_settings()
    celery = get_celery()
    celery.send_task("modelpress.run_job", args=["waiting-job"], queue=settings.queue_name("cpu"))
    celery.send_task("modelpress.run_job", args=["urgent-job"], queue=settings.queue_name("gpu"), priority=9)
    celery.send_task("modelpress.deliver_webhook", args=["not-a-job"], queue=settings.queue_name("cpu"))
    assert queued_job_ids(settings) >= {"waiting-job", "urgent-job"}
    assert "not-a-job" not in queued_job_ids(settings)
    with celery.connection_for_read() as conn:
        message = conn.SimpleQueue(settings.queue_name("gpu")).get(timeout=5)  # delivered, not acked
        assert "urgent-job" in queued_job_ids(settings)
        message.ack()
    assert "urgent-job" not in queued_job_ids(settings)


def test_a_duplicate_message_for_a_live_attempt_is_dropped(job_id, data_dir):
    from workers.supervise import run_job

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = f"{socket.gethostname()}:{sleeper.pid}"
        set_job(job_id, status="running", attempts=1, heartbeat_at=ago(1), worker_id=live)
        run_job(job_id)  # a second delivery while that process runs the job
        row = job(job_id)
        assert row.status == "running" and row.attempts == 1 and row.worker_id == live
    finally:
        sleeper.kill()
        sleeper.wait()
    # The process is gone (its heartbeat still fresh): the next delivery starts the job over.
    run_job(job_id)
    row = job(job_id)
    assert row.status == "succeeded" and row.attempts == 2
    assert any("started again after a lost worker" in m for m in messages_of(job_id))


def test_an_attempt_the_reaper_requeued_cannot_write_over_its_successor(job_id):
    from app.store import get_store
    from workers.supervise import Attempt, Superseded

    set_job(job_id, status="running", attempts=1, heartbeat_at=utcnow())
    with get_store().workdir() as folder:
        attempt = Attempt(job_id=job_id, number=1, store=get_store(), folder=folder)
        attempt.heartbeat()
        set_job(job_id, status="queued")  # the reaper took it back
        with pytest.raises(Superseded):
            attempt.heartbeat()
        with pytest.raises(Superseded):
            attempt.progress(0.5, "measuring", "stale")
    assert job(job_id).status == "queued" and job(job_id).message != "stale"


def test_clean_tmp_removes_what_dead_processes_left_and_never_a_live_folder(data_dir):
    from app.store import get_store

    store = get_store()
    stale = store.tmp / "work-dead"
    stale.mkdir()
    (stale / ".lock").touch()
    (stale / "upload").write_bytes(b"half an upload")
    with store.workdir() as live:
        (live / "upload").write_bytes(b"an upload in progress")
        # Another process looks (the lock is per open file, so a child process is the honest test).
        done = subprocess.run([sys.executable, "-c", "from app.store import get_store; print(get_store().clean_tmp())"],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert (live / "upload").exists()
        assert not stale.exists()
    assert list(store.tmp.iterdir()) == []
