"""Live job events (server-sent events over a real HTTP server) and signed webhooks (delivered by a real Celery
worker to a receiver on 127.0.0.1).

Job state changes are written to the database here, through app.jobs.state as the worker writes them, so the
tests control their order and timing. The SSE and worker tests run on SQLite and on PostgreSQL
(127.0.0.1:5432; skipped when unreachable, failed under CI=true).
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from sqlalchemy import select

from app.db import session_scope
from app.dbmodels import Job, Tenant, WebhookDelivery
from app.jobs.state import add_event, set_status
from tests.helpers import row_count, use_database
from tests.stack import BIN, free_port, logs, processes

# --- fixtures --------------------------------------------------------------------------------------------------

@pytest.fixture(params=["sqlite"])
def backend(request, data_dir, monkeypatch):
    """The data folder's SQLite, or (tests marked both_backends) a fresh PostgreSQL database."""
    yield from use_database(request.param, monkeypatch)


both_backends = pytest.mark.parametrize("backend", ["sqlite", "postgresql"], indirect=True)


@pytest.fixture
def client(backend):
    from fastapi.testclient import TestClient

    from app.main import create_app

    with TestClient(create_app()) as test_client:
        yield test_client


@pytest.fixture
def live_api(client):
    """The app on a real HTTP server (uvicorn, in a thread of this process): streams arrive as they are sent."""
    import uvicorn

    from app.main import create_app

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(), host="127.0.0.1", port=port, log_level="warning",
                                           timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=15)


# Tests deliver to loopback only: private addresses allowed, then narrowed to loopback by the operator allowlist.
LOOPBACK_ONLY = "127.0.0.0/8,::1,localhost"


@pytest.fixture
def allow_private(monkeypatch):
    """The admin settings that let webhooks reach loopback (where the test receiver listens), and nothing else."""
    from app.settings import get_settings

    monkeypatch.setenv("MODELPRESS_WEBHOOK_ALLOW_PRIVATE", "true")
    monkeypatch.setenv("MODELPRESS_WEBHOOK_ALLOWED_HOSTS", LOOPBACK_ONLY)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


@pytest.fixture
def worker(backend, data_dir, tmp_path, allow_private):
    """A real Celery worker on the cpu queue (where webhook deliveries go), on this test's database and broker.

    Jobs in these tests are submitted to the gpu queue, which no worker consumes: only webhooks run."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELPRESS_")}
    env |= {"MODELPRESS_DATA_DIR": str(data_dir), "MODELPRESS_WEBHOOK_ALLOW_PRIVATE": "true",
            "MODELPRESS_WEBHOOK_ALLOWED_HOSTS": LOOPBACK_ONLY, "PYTHONUNBUFFERED": "1"}
    if os.environ.get("MODELPRESS_DATABASE_URL"):
        env["MODELPRESS_DATABASE_URL"] = os.environ["MODELPRESS_DATABASE_URL"]
    log_dir = tmp_path / "worker-logs"
    log_dir.mkdir()
    argv = [str(BIN / "modelpress"), "worker", "--queues", "cpu", "--loglevel", "info"]
    with processes(argv, env=env, log_dir=log_dir) as procs:
        deadline = time.monotonic() + 60
        while "ready." not in (log_dir / "proc-0.log").read_text():
            assert procs[0].poll() is None and time.monotonic() < deadline, logs(log_dir)
            time.sleep(0.2)
        yield log_dir


class Receiver:
    """An HTTP endpoint on 127.0.0.1 that records every POST and answers the given statuses in turn (then 200)."""

    def __init__(self, statuses: list[int] | None = None) -> None:
        self.statuses = list(statuses or [])
        self.requests: list[dict] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.requests.append({"headers": {k.lower(): v for k, v in self.headers.items()},
                                          "body": body, "path": self.path})
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                self.send_response(status)
                if 300 <= status < 400:
                    self.send_header("Location", f"http://127.0.0.1:{receiver.port}/elsewhere")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/hooks/modelpress"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    made: list[Receiver] = []

    def make(statuses: list[int] | None = None) -> Receiver:
        made.append(Receiver(statuses))
        return made[-1]

    yield make
    for r in made:
        r.close()


@pytest.fixture
def model_id(client, alice, mlp_onnx) -> str:
    resp = client.post("/v1/models", files={"file": ("mlp.onnx", mlp_onnx)}, headers=alice)
    assert resp.status_code == 201, resp.text
    return resp.json()["id"]


# --- helpers ---------------------------------------------------------------------------------------------------

def tenant_id(name: str) -> str:
    with session_scope() as db:
        return db.scalar(select(Tenant.id).where(Tenant.name == name))


def new_job(tenant: str) -> str:
    """A queued job written as POST /v1/jobs writes it (without a model: nothing runs it)."""
    with session_scope() as db:
        job = Job(tenant_id=tenant_id(tenant), model_id=None, spec={"steps": [], "evaluate": {}}, queue="gpu",
                  status="queued", progress=0.0, stage="queued")
        db.add(job)
        db.flush()
        set_status(db, job, "queued", message="waiting for a worker")
        return job.id


def advance(job_id: str, step: str) -> None:
    """One state change or progress message, written as the worker writes it."""
    with session_scope() as db:
        job = db.get(Job, job_id)
        if step == "progress":
            job.progress, job.stage, job.message = job.progress + 0.25, "measuring", f"at {job.progress + 0.25:.2f}"
            add_event(db, job, kind="progress")
        else:
            job.stage = step
            set_status(db, job, step, message=f"now {step}")


def job_spec(model_id: str, **extra) -> dict:
    return {"model_id": model_id, "steps": [{"method": "quantize.int8_dynamic", "params": {}}], "queue": "gpu",
            **extra}


def webhook_job(client, headers: dict, model_id: str, url: str, events: list[str]) -> tuple[str, str]:
    """The tenant's signing secret, made now, and a job of theirs whose webhooks go to url: (secret, job id)."""
    secret = client.post("/v1/webhook-secret", headers=headers).json()["secret"]
    resp = client.post("/v1/jobs", json=job_spec(model_id, webhook_url=url, webhook_events=events), headers=headers)
    assert resp.status_code == 202, resp.text
    return secret, resp.json()["id"]


def read_sse(url: str, headers: dict, frames: list, meta: dict, timeout: float = 30) -> None:
    """Read a server-sent event stream to its end; each frame is {"id", "event", "data", "comment"}."""
    with httpx.stream("GET", url, headers={**headers, "Accept": "text/event-stream"}, timeout=timeout) as resp:
        meta["status"], meta["content_type"] = resp.status_code, resp.headers.get("content-type", "")
        frame: dict = {}
        for line in resp.iter_lines():
            if line == "":
                if frame:
                    frames.append(frame)
                frame = {}
            elif line.startswith(":"):
                frame["comment"] = line[1:].strip()
            else:
                field, _, value = line.partition(":")
                frame[field] = value.removeprefix(" ")
    meta["ended"] = True


def stream_in_thread(url: str, headers: dict) -> tuple[threading.Thread, list, dict]:
    frames: list = []
    meta: dict = {}
    thread = threading.Thread(target=read_sse, args=(url, headers, frames, meta), daemon=True)
    thread.start()
    return thread, frames, meta


def verify_signature(secret: str, request: dict, tolerance_s: int = 300) -> None:
    """What a receiver does (the README's five lines)."""
    fields = dict(part.split("=", 1) for part in request["headers"]["modelpress-signature"].split(","))
    expected = hmac.new(secret.encode(), f"{fields['t']}.".encode() + request["body"], hashlib.sha256).hexdigest()
    assert hmac.compare_digest(expected, fields["v1"]), "bad signature"
    assert abs(time.time() - int(fields["t"])) < tolerance_s


def wait_for(predicate, timeout: float = 60, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise TimeoutError(f"{what} not met after {timeout}s")


# --- server-sent events ----------------------------------------------------------------------------------------

@both_backends
def test_sse_streams_state_and_progress_in_order_and_ends_after_the_terminal_state(live_api, alice):
    job_id = new_job("alice")
    url = f"{live_api}/v1/jobs/{job_id}/events"
    thread, frames, meta = stream_in_thread(url, alice)
    wait_for(lambda: frames, 10, "the queued event")
    # The stream polls without blocking the server: other requests are answered meanwhile.
    assert httpx.get(f"{live_api}/healthz", timeout=2).status_code == 200
    for step in ("running", "progress", "progress", "succeeded"):
        time.sleep(0.3)
        advance(job_id, step)
    thread.join(timeout=15)
    assert not thread.is_alive() and meta.get("ended"), "the stream must end after the terminal state"
    assert meta["status"] == 200 and meta["content_type"].startswith("text/event-stream")

    data = [json.loads(f["data"]) for f in frames]
    assert [(f["event"], d["status"]) for f, d in zip(frames, data)] == [
        ("state", "queued"), ("state", "running"), ("progress", "running"), ("progress", "running"),
        ("state", "succeeded")]
    ids = [int(f["id"]) for f in frames]
    assert ids == sorted(ids) and len(set(ids)) == 5 and ids == [d["id"] for d in data]
    assert [d["progress"] for d in data] == [0.0, 0.0, 0.25, 0.5, 1.0]
    assert data[-1]["job_status"] == "succeeded" and data[-1]["job_progress"] == 1.0
    assert data[1]["message"] == "now running" and data[2]["stage"] == "measuring"

    # Resuming after the running event gives only the later ones, then ends (the job is finished).
    for headers, query in (({"Last-Event-ID": str(ids[1])}, ""), ({}, f"?after={ids[1]}")):
        thread, again, meta = stream_in_thread(url + query, {**alice, **headers})
        thread.join(timeout=10)
        assert meta.get("ended") and [int(f["id"]) for f in again] == ids[2:]

    # Clients that do not ask for a stream get the JSON list, as before.
    listed = httpx.get(url, headers=alice, timeout=10)
    assert listed.headers["content-type"].startswith("application/json")
    assert [e["id"] for e in listed.json()] == ids
    assert [e["id"] for e in httpx.get(url, headers={**alice, "Last-Event-ID": str(ids[3])}).json()] == ids[4:]


@both_backends
def test_sse_sends_keep_alive_comments_and_holds_no_connection_between_polls(live_api, alice, monkeypatch):
    from app.jobs import sse

    monkeypatch.setattr(sse, "KEEPALIVE_S", 0.4)
    job_id = new_job("alice")
    advance(job_id, "running")
    thread, frames, meta = stream_in_thread(f"{live_api}/v1/jobs/{job_id}/events", alice)
    wait_for(lambda: any(f.get("comment") == "keep-alive" for f in frames), 10, "a keep-alive comment")
    assert thread.is_alive(), "a running job's stream stays open"
    # Between polls the open stream holds no database connection (so no transaction either).
    from app.db import get_engine

    checked_out = []
    for _ in range(10):
        checked_out.append(get_engine().pool.checkedout())
        time.sleep(0.1)
    assert checked_out.count(0) >= 8, checked_out
    advance(job_id, "cancelled")
    thread.join(timeout=10)
    assert meta.get("ended")
    assert [f["event"] for f in frames if "event" in f] == ["state", "state", "state"]
    assert json.loads([f for f in frames if "data" in f][-1]["data"])["status"] == "cancelled"


def test_sse_of_another_tenants_job_is_404_before_streaming(live_api, alice, bob):
    job_id = new_job("alice")
    for path in (f"/v1/jobs/{job_id}/events", f"/v1/jobs/{uuid.uuid4()}/events"):
        resp = httpx.get(live_api + path, headers={**bob, "Accept": "text/event-stream"}, timeout=10)
        assert resp.status_code == 404
        assert resp.headers["content-type"].startswith("application/problem+json")
        assert resp.json()["code"] == "job_not_found"
    bad = httpx.get(f"{live_api}/v1/jobs/{job_id}/events", headers={**alice, "Last-Event-ID": "x"}, timeout=10)
    assert bad.status_code == 422


# --- webhooks: secret and submit-time checks -------------------------------------------------------------------

def test_secret_is_shown_once_and_rotation_replaces_it(client, alice, bob):
    first = client.post("/v1/webhook-secret", headers=alice)
    assert first.status_code == 201 and first.headers["cache-control"] == "no-store"
    secret = first.json()["secret"]
    assert secret.startswith("whsec_") and len(secret) > 40
    # There is no way to read it again.
    assert client.get("/v1/webhook-secret", headers=alice).status_code == 405
    assert secret not in json.dumps(client.get("/openapi.json").json())
    rotated = client.post("/v1/webhook-secret", headers=alice).json()["secret"]
    assert rotated != secret
    with session_scope() as db:
        assert db.scalar(select(Tenant.webhook_secret).where(Tenant.name == "alice")) == rotated
    bobs = client.post("/v1/webhook-secret", headers=bob).json()["secret"]
    assert bobs not in (secret, rotated)
    assert client.post("/v1/webhook-secret").status_code == 401


def test_webhook_without_a_secret_is_422_webhook_secret_missing(client, alice, model_id):
    resp = client.post("/v1/jobs", json=job_spec(model_id, webhook_url="https://hooks.example.com/x"), headers=alice)
    assert resp.status_code == 422
    assert resp.json()["code"] == "webhook_secret_missing" and "POST /v1/webhook-secret" in resp.json()["detail"]
    assert row_count(Job) == 0


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:8080/hook",
    "http://10.0.0.1/hook",
    "https://169.254.169.254/latest/meta-data/",
    "http://[::1]:9000/hook",
    "http://localhost:8080/hook",
    "http://[::ffff:192.168.1.1]/hook",
    "http://0.0.0.0/hook",
    "http://224.0.0.1/hook",
])
def test_webhook_to_a_private_address_is_refused_at_submit(client, alice, model_id, url):
    client.post("/v1/webhook-secret", headers=alice)
    resp = client.post("/v1/jobs", json=job_spec(model_id, webhook_url=url), headers=alice)
    assert resp.status_code == 422, resp.text
    assert resp.json()["code"] == "webhook_url_forbidden" and resp.json()["field"] == "webhook_url"
    assert "MODELPRESS_WEBHOOK_ALLOW_PRIVATE" in resp.json()["detail"]
    assert row_count(Job) == 0


@pytest.mark.parametrize("extra", [
    {"webhook_url": "ftp://hooks.example.com/x"},
    {"webhook_url": "/relative/path"},
    {"webhook_url": "https://user:pw@hooks.example.com/x"},
    {"webhook_url": "https://hooks.example.com/" + "a" * 2048},
    {"webhook_events": ["succeeded"]},
    {"webhook_url": "https://hooks.example.com/x", "webhook_events": ["finished"]},
    {"webhook_url": "https://hooks.example.com/x", "webhook_events": []},
])
def test_bad_webhook_fields_are_422(client, alice, model_id, extra):
    client.post("/v1/webhook-secret", headers=alice)
    resp = client.post("/v1/jobs", json=job_spec(model_id, **extra), headers=alice)
    assert resp.status_code == 422 and resp.json()["code"] == "invalid_request", resp.text


def test_allowed_private_target_is_stored_on_the_job_with_default_events(client, alice, model_id, allow_private,
                                                                           data_dir):
    client.post("/v1/webhook-secret", headers=alice)
    resp = client.post("/v1/jobs", json=job_spec(model_id, webhook_url="http://127.0.0.1:9/hook"), headers=alice)
    assert resp.status_code == 202, resp.text
    job = resp.json()
    assert job["webhook_url"] == "http://127.0.0.1:9/hook"
    assert job["webhook_events"] == ["succeeded", "failed", "cancelled"]
    # "queued" was not asked for: the only message is the job's own.
    assert len(list((data_dir / "broker" / "queue").glob("*.msg"))) == 1


# --- webhooks: deliveries by a real worker ---------------------------------------------------------------------

@both_backends
def test_signed_webhooks_are_delivered_by_the_worker(client, alice, bob, model_id, worker, receiver):
    target = receiver()
    secret, job_id = webhook_job(client, alice, model_id, target.url, ["running", "progress", "succeeded"])
    for step in ("running", "progress", "progress", "succeeded"):  # the second progress is within 10 s: not sent
        advance(job_id, step)
    wait_for(lambda: len(target.requests) >= 3, 60, f"3 webhooks\n{logs(worker)}")
    time.sleep(1.0)  # nothing more arrives
    assert sorted(r["headers"]["modelpress-event"] for r in target.requests) == ["progress", "running", "succeeded"]
    job_json = client.get(f"/v1/jobs/{job_id}", headers=alice).json()
    for request in target.requests:
        verify_signature(secret, request)
        assert request["path"] == "/hooks/modelpress"
        assert request["headers"]["content-type"] == "application/json"
        body = json.loads(request["body"])
        assert body["id"] == job_id and secret not in request["body"].decode()
        if request["headers"]["modelpress-event"] == "succeeded":
            # the job JSON, as GET /v1/jobs/{id} shows it, with the payload's version and event (app.events)
            assert {k: v for k, v in body.items() if k not in ("schema_version", "event")} == job_json
    forged = dict(target.requests[0], body=target.requests[0]["body"] + b" ")
    with pytest.raises(AssertionError, match="bad signature"):
        verify_signature(secret, forged)

    deliveries = client.get(f"/v1/jobs/{job_id}/deliveries", headers=alice).json()
    assert len(deliveries) == 3
    assert {d["delivery_id"] for d in deliveries} == {r["headers"]["modelpress-delivery"] for r in target.requests}
    for d in deliveries:
        assert d["delivered"] and d["status_code"] == 200 and d["attempt"] == 1 and d["error"] is None
        assert d["url"] == target.url and d["duration_ms"] >= 0 and d["next_attempt_at"] is None
    assert client.get(f"/v1/jobs/{job_id}/deliveries", headers=bob).status_code == 404


@both_backends
def test_a_failing_receiver_gets_retried_with_backoff(client, alice, model_id, worker, receiver):
    target = receiver([500, 503])  # fails twice, then answers 200
    secret = client.post("/v1/webhook-secret", headers=alice).json()["secret"]
    job_id = client.post("/v1/jobs", json=job_spec(model_id, webhook_url=target.url), headers=alice).json()["id"]
    advance(job_id, "running")  # not a requested event
    advance(job_id, "failed")

    def delivered():
        rows = client.get(f"/v1/jobs/{job_id}/deliveries", headers=alice).json()
        return rows if any(r["delivered"] for r in rows) else None

    rows = wait_for(delivered, 60, f"a delivered webhook\n{logs(worker)}")
    assert [(r["attempt"], r["status_code"], r["delivered"]) for r in rows] == [
        (1, 500, False), (2, 503, False), (3, 200, True)]
    assert len({r["delivery_id"] for r in rows}) == 1 and {r["event"] for r in rows} == {"failed"}
    assert rows[0]["error"] == "HTTP 500" and rows[2]["error"] is None
    # Exponential backoff: the second attempt waits 1 s, the third 2 s.
    created = [_parse(r["created_at"]) for r in rows]
    nexts = [_parse(r["next_attempt_at"]) if r["next_attempt_at"] else None for r in rows]
    assert abs((nexts[0] - created[0]).total_seconds() - 1) < 0.5 and abs((nexts[1] - created[1]).total_seconds() - 2) < 0.5
    assert nexts[2] is None
    assert (created[1] - created[0]).total_seconds() >= 0.9 and (created[2] - created[1]).total_seconds() >= 1.9
    assert len(target.requests) == 3
    assert len({r["headers"]["modelpress-delivery"] for r in target.requests}) == 1
    for request in target.requests:
        verify_signature(secret, request)
        assert request["headers"]["modelpress-event"] == "failed"


def _parse(value: str):
    import datetime as dt

    return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))


# --- webhooks: one attempt, made in this process ---------------------------------------------------------------

def _submit(client, alice, model_id, url: str, *, then_allow: bool, monkeypatch, **env: str) -> str:
    """A job whose webhook was allowed at submit (admin setting on); then the setting is `then_allow`."""
    from app.settings import get_settings

    client.post("/v1/webhook-secret", headers=alice)
    monkeypatch.setenv("MODELPRESS_WEBHOOK_ALLOW_PRIVATE", "true")
    monkeypatch.setenv("MODELPRESS_WEBHOOK_ALLOWED_HOSTS", LOOPBACK_ONLY)
    get_settings.cache_clear()
    resp = client.post("/v1/jobs", json=job_spec(model_id, webhook_url=url), headers=alice)
    assert resp.status_code == 202, resp.text
    monkeypatch.setenv("MODELPRESS_WEBHOOK_ALLOW_PRIVATE", str(then_allow).lower())
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    return resp.json()["id"]


def _webhook_messages(data_dir) -> int:
    return sum("deliver_webhook" in p.read_text() for p in (data_dir / "broker" / "queue").glob("*.msg"))


def test_delivery_rechecks_the_address_and_records_a_refusal_without_retry(client, alice, model_id, receiver,
                                                                          monkeypatch, data_dir):
    from workers.webhooks import deliver

    target = receiver()
    job_id = _submit(client, alice, model_id, target.url, then_allow=False, monkeypatch=monkeypatch)
    record = deliver(job_id=job_id, event="succeeded", delivery_id=str(uuid.uuid4()))
    assert record is not None and not record.delivered and record.status_code is None
    assert "loopback" in record.error and record.next_attempt_at is None
    assert target.requests == [] and _webhook_messages(data_dir) == 0
    rows = client.get(f"/v1/jobs/{job_id}/deliveries", headers=alice).json()
    assert len(rows) == 1 and "loopback" in rows[0]["error"]


def test_redirects_are_not_followed_and_a_repeated_message_is_ignored(client, alice, model_id, receiver,
                                                                       monkeypatch, data_dir):
    from workers.webhooks import deliver

    target = receiver([302])
    job_id = _submit(client, alice, model_id, target.url, then_allow=True, monkeypatch=monkeypatch)
    delivery_id = str(uuid.uuid4())
    record = deliver(job_id=job_id, event="succeeded", delivery_id=delivery_id)
    assert record.status_code == 302 and not record.delivered and "redirects are not followed" in record.error
    assert [r["path"] for r in target.requests] == ["/hooks/modelpress"]  # /elsewhere was not visited
    assert record.next_attempt_at is not None and _webhook_messages(data_dir) == 1  # attempt 2 is queued
    # The same message delivered twice (acks_late after a lost worker) makes one attempt.
    assert deliver(job_id=job_id, event="succeeded", delivery_id=delivery_id) is None
    assert row_count(WebhookDelivery) == 1 and len(target.requests) == 1


def test_retries_stop_when_the_retry_window_is_spent(client, alice, model_id, receiver, monkeypatch, data_dir):
    from workers.webhooks import deliver

    target = receiver([500])
    job_id = _submit(client, alice, model_id, target.url, then_allow=True, monkeypatch=monkeypatch,
                     MODELPRESS_WEBHOOK_RETRY_WINDOW_S="60")
    # The 7th attempt would wait 64 s: past the 60 s window.
    record = deliver(job_id=job_id, event="failed", delivery_id=str(uuid.uuid4()), attempt=7,
                     first_attempt_at=time.time() - 63)
    assert record.status_code == 500 and record.next_attempt_at is None and _webhook_messages(data_dir) == 0


def test_unreachable_hostname_is_refused(client, alice, model_id):
    client.post("/v1/webhook-secret", headers=alice)
    resp = client.post("/v1/jobs", json=job_spec(model_id, webhook_url="https://no-such-host.invalid/x"),
                       headers=alice)
    assert resp.status_code == 422 and resp.json()["code"] == "webhook_url_unresolvable"


def test_forbidden_reason_covers_each_range():
    from app.webhooks.targets import forbidden_reason

    for address in ("127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.0.1", "169.254.169.254", "::1", "fe80::1",
                    "fc00::1", "224.0.0.251", "ff02::1", "0.0.0.0", "::", "240.0.0.1", "100.64.0.1",
                    "::ffff:10.0.0.1"):
        assert forbidden_reason(address), address
    for address in ("93.184.216.34", "1.1.1.1", "2606:4700:4700::1111"):
        assert forbidden_reason(address) is None, address


@pytest.mark.parametrize("address, wrapping", [
    ("2002:a9fe:a9fe::", "6to4"),                       # 6to4 of 169.254.169.254 (cloud metadata)
    ("2002:7f00:1::", "6to4"),                          # 6to4 of 127.0.0.1
    ("2001:0:a9fe:a9fe::1", "Teredo"),                  # Teredo server 169.254.169.254
    ("2001:0:4136:e378:8000:63bf:f5ff:fffe", "Teredo"),  # Teredo client 10.0.0.1 (obfuscated)
    ("64:ff9b::a9fe:a9fe", "NAT64"),
    ("64:ff9b:1::a00:1", "NAT64"),
    ("::a9fe:a9fe", "IPv4-compatible"),
    ("2606:4700::5efe:a00:1", "ISATAP"),
    ("::ffff:169.254.169.254", "IPv4-mapped"),
])
def test_ipv6_forms_that_wrap_a_special_ipv4_address_are_refused(address, wrapping):
    """Python counts 2002::/16 as global; every wrapping is unwrapped and the IPv4 inside is judged."""
    from app.webhooks.targets import forbidden_reason

    reason = forbidden_reason(address)
    assert reason and wrapping in reason, (address, reason)


def test_a_6to4_address_of_a_public_host_is_allowed():
    from app.webhooks.targets import forbidden_reason

    assert forbidden_reason("2002:808:808::1") is None


def test_operator_allowlist_and_denylist():
    from app.errors import WebhookUrlForbidden
    from app.webhooks.targets import EgressPolicy, check_host

    loopback = EgressPolicy(allow_private=True, allowed=("127.0.0.0/8", "::1", "localhost"))
    assert check_host("127.0.0.1", 80, policy=loopback) == ["127.0.0.1"]
    assert check_host("localhost", 80, policy=loopback)
    with pytest.raises(WebhookUrlForbidden, match="allowlist"):
        check_host("1.1.1.1", 80, policy=loopback)  # public, but not on the list (no connection is made)
    denied = EgressPolicy(denied=("1.1.1.0/24", "*.example.com"))
    with pytest.raises(WebhookUrlForbidden, match="denylist"):
        check_host("1.1.1.1", 80, policy=denied)
    assert check_host("8.8.8.8", 80, policy=denied) == ["8.8.8.8"]
    with pytest.raises(WebhookUrlForbidden, match="denylist"):
        check_host("127.0.0.1", 80, policy=EgressPolicy(allow_private=True, denied=("127.0.0.1",)))


def test_allowlist_is_enforced_at_submit(client, alice, model_id, monkeypatch):
    from app.settings import get_settings

    monkeypatch.setenv("MODELPRESS_WEBHOOK_ALLOWED_HOSTS", "hooks.example.com")
    get_settings.cache_clear()
    try:
        client.post("/v1/webhook-secret", headers=alice)
        resp = client.post("/v1/jobs", json=job_spec(model_id, webhook_url="http://1.1.1.1/hook"), headers=alice)
        assert resp.status_code == 422 and resp.json()["code"] == "webhook_url_forbidden", resp.text
        assert "MODELPRESS_WEBHOOK_ALLOWED_HOSTS" in resp.json()["detail"]
        assert row_count(Job) == 0
    finally:
        get_settings.cache_clear()
