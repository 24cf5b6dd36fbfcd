"""Faults survived, on the real stack (issue 9): PostgreSQL, a Redis of the test's own, `modelpress api` and
`modelpress worker` processes, killed and restarted as production would see them.

- a worker's job process killed with SIGKILL mid-job: redelivered at once (acks_late, reject_on_worker_lost),
  picked up again, finished once;
- a whole worker killed: its message never comes back, the reaper sees the stale heartbeat and requeues;
- Redis restarted and flushed with jobs queued: the jobs are sent again from the database;
- the API killed mid-upload: nothing half-stored, and its restart cleans the leftover;
- the broker down at submit: a clean 503 and nothing stored;
- a hostile model that exhausts memory: `resource_limit`, and the same worker goes on.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.helpers import IN_CI, ROOT, memory_hog_onnx, mlp_onnx_bytes
from tests.stack import (
    BIN,
    RedisServer,
    adopting_orphans,
    base_env,
    free_port,
    job_processes,
    modelpress,
    wait_for_job,
    wait_ready,
    wait_until,
)

pytestmark = pytest.mark.integration

FAST = {"batch_sizes": [1], "warmup": 1, "iterations": 3}


class Stack:
    """The production deployment on this machine, process by process."""

    def __init__(self, folder: Path, database_url: str, redis: RedisServer) -> None:
        self.folder, self.database_url, self.redis = folder, database_url, redis
        self.env = base_env(folder / "data", MODELPRESS_MODE="production", MODELPRESS_DATABASE_URL=database_url,
                            MODELPRESS_BROKER_URL=redis.url, MODELPRESS_HEARTBEAT_INTERVAL_S="1",
                            MODELPRESS_HEARTBEAT_TIMEOUT_S="6", MODELPRESS_REQUEUE_GRACE_S="0")
        self.procs: list[subprocess.Popen] = []
        self.port = free_port()
        modelpress("migrate", env=self.env)
        created = modelpress("keys", "create", "--tenant", "acme", env=self.env).stdout
        self.key = created.split("api key: ")[1].split()[0]

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def spawn(self, argv: list[str], name: str, **env: str) -> subprocess.Popen:
        log = open(self.folder / f"{name}.log", "a")
        proc = subprocess.Popen(argv, env={**self.env, **env}, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs.append(proc)
        return proc

    def api(self) -> subprocess.Popen:
        proc = self.spawn([str(BIN / "modelpress"), "api", "--port", str(self.port), "--log-level", "warning"], "api")
        wait_ready(self.base, [proc])
        return proc

    def worker(self, name: str = "worker", *extra: str, **env: str) -> subprocess.Popen:
        return self.spawn([str(BIN / "modelpress"), "worker", "--queues", "gpu,cpu", "--loglevel", "info", *extra],
                          name, **env)

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.base, headers={"Authorization": f"Bearer {self.key}"}, timeout=60)

    def sql(self, query: str, *args):
        import psycopg

        with psycopg.connect(self.database_url.replace("+psycopg", "")) as conn:
            return conn.execute(query, args).fetchall()

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-5000:]}"
                         for p in sorted(self.folder.glob("*.log")))

    def close(self) -> None:
        for proc in self.procs:
            kill_group(proc, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                kill_group(proc, signal.SIGKILL)
                proc.wait()


def kill_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


@pytest.fixture
def stack(request, tmp_path, postgres_database):
    if shutil.which("redis-server") is None:
        if IN_CI:
            pytest.fail("redis-server is not installed (CI=true: integration tests must run)")
        pytest.skip("redis-server is not installed (these tests run a Redis of their own)")
    redis = RedisServer(tmp_path)
    built = None
    try:
        redis.start()
        built = Stack(tmp_path, postgres_database, redis)
        with adopting_orphans():  # a job's process outliving its killed worker is still found by job_processes()
            yield built
    finally:
        if built is not None:
            built.close()
        redis.stop()
        if built is not None and getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed:
            print(built.logs())


def upload(http: httpx.Client, model: bytes) -> str:
    resp = http.post("/v1/models", files={"file": ("m.onnx", model)})
    assert resp.status_code == 201, resp.text
    return resp.json()["id"]


def submit(http: httpx.Client, model_id: str, **evaluate) -> str:
    resp = http.post("/v1/jobs", json={"model_id": model_id, "steps": [{"method": "quantize.int8_dynamic"}],
                                       "evaluate": {**FAST, **evaluate}})
    assert resp.status_code == 202, resp.text
    return resp.json()["id"]


def check_finished_once(stack: Stack, http: httpx.Client, job_id: str) -> dict:
    job = wait_for_job(http, job_id, timeout=300)
    assert job["status"] == "succeeded", (job, stack.logs())
    names = [a["name"] for a in http.get(f"/v1/jobs/{job_id}/artifacts").json()]
    assert sorted(names) == ["latency-samples.json", "model.onnx", "recipe.json", "report.json"]  # one of each
    rows = stack.sql("SELECT model_role, provider, batch_size, metric, count(*) FROM measurements WHERE job_id = %s "
                     "GROUP BY 1, 2, 3, 4 HAVING count(*) > 1", job_id)
    assert rows == []  # no measurement of the dead attempt left beside the new one's
    return job


def test_a_job_process_killed_with_sigkill_is_picked_up_again_and_finishes_once(stack):
    stack.api()
    worker = stack.worker()
    with stack.http() as http:
        job_id = submit(http, upload(http, mlp_onnx_bytes(hidden=1024)), batch_sizes=[64], iterations=3000)
        # Mid-job: the step's model is stored and the measurement is under way.
        wait_until(lambda: http.get(f"/v1/jobs/{job_id}").json()["stage"] == "measuring", timeout=120)
        (worker_id,), = stack.sql("SELECT worker_id FROM jobs WHERE id = %s", job_id)
        host, _, pid = worker_id.rpartition(":")
        assert host == socket.gethostname() and int(pid) != worker.pid  # the pool process, not the main one
        os.kill(int(pid), signal.SIGKILL)
        job = check_finished_once(stack, http, job_id)
        assert job["attempts"] == 2
        messages = [e["message"] for e in http.get(f"/v1/jobs/{job_id}/events").json() if e["kind"] == "state"]
        # (the message ends naming the Celery worker that took it: "... on worker modelpress-<pid>@<host>")
        assert any(m.startswith(f"attempt 2: started again after a lost worker on worker modelpress-{worker.pid}@")
                   for m in messages), messages
        assert worker.poll() is None  # the worker itself lives on
    wait_until(lambda: not job_processes(), 30)  # the killed attempt's job process died with it
    # Attempt 2 removed attempt 1's scratch folder, and its own went when it finished.
    wait_until(lambda: not list((stack.folder / "data" / "store" / "tmp").glob("work-*")), timeout=30)


def test_a_whole_worker_killed_is_requeued_by_the_reaper_and_finished_by_another(stack):
    stack.api()
    first = stack.worker("first")
    with stack.http() as http:
        job_id = submit(http, upload(http, mlp_onnx_bytes(hidden=1024)), batch_sizes=[64], iterations=3000)
        wait_until(lambda: http.get(f"/v1/jobs/{job_id}").json()["stage"] == "measuring", timeout=120)
        # The measuring process's files lie in the job's own scratch folder, not in the system's temp folder.
        scratch = stack.folder / "data" / "store" / "tmp"
        measuring = wait_until(lambda: list(scratch.glob("work-*/tmp/modelpress-measure-*")), timeout=60)
        kill_group(first, signal.SIGKILL)  # the main process and its pool: the message is never rejected
        first.wait()
        wait_until(lambda: not job_processes(), 30)  # the job and measuring processes died with their worker
        assert all(folder.exists() for folder in measuring)  # nobody removed them yet
        assert http.get(f"/v1/jobs/{job_id}").json()["status"] == "running"
        # Another worker with beat: the reaper finds the heartbeat stale and requeues the job.
        stack.worker("second", "--beat", MODELPRESS_REAPER_INTERVAL_S="2")
        job = check_finished_once(stack, http, job_id)
        assert job["attempts"] == 2
        messages = [e["message"] for e in http.get(f"/v1/jobs/{job_id}/events").json()]
        assert any(m and m.startswith("requeued after attempt 1: its worker") for m in messages), messages
    # The second worker's sweep removed the killed attempt's folder, its measuring files with it; the second
    # attempt's folder went when it finished: nothing of the job remains.
    assert not any(folder.exists() for folder in measuring)
    wait_until(lambda: not list(scratch.glob("work-*")), timeout=30)


def test_jobs_queued_when_redis_restarts_or_is_flushed_are_sent_again(stack):
    stack.api()
    with stack.http() as http:
        model_id = upload(http, mlp_onnx_bytes())
        before_restart = submit(http, model_id)
        assert stack.redis.client().llen("cpu") == 1
        stack.redis.stop()
        stack.redis.start()  # no persistence: the message is gone
        assert stack.redis.client().llen("cpu") == 0
        before_flush = wait_until(lambda: _submit_when_broker_answers(http, model_id), timeout=60)
        stack.redis.client().flushall()
        assert http.get(f"/v1/jobs/{before_restart}").json()["status"] == "queued"
        stack.worker()  # its start-up sweep finds both jobs queued in PostgreSQL without a message
        for job_id in (before_restart, before_flush):
            job = wait_for_job(http, job_id, timeout=180)
            assert job["status"] == "succeeded" and job["attempts"] == 1, job
            messages = [e["message"] for e in http.get(f"/v1/jobs/{job_id}/events").json()]
            assert any("sent to the queue again" in (m or "") for m in messages), messages


def _submit_when_broker_answers(http: httpx.Client, model_id: str) -> str | None:
    resp = http.post("/v1/jobs", json={"model_id": model_id, "steps": [{"method": "quantize.int8_dynamic"}],
                                       "evaluate": FAST})
    return resp.json()["id"] if resp.status_code == 202 else None


def test_the_api_killed_mid_upload_leaves_nothing_and_its_restart_cleans_up(stack):
    api = stack.api()
    tmp = stack.folder / "data" / "store" / "tmp"
    declared = 64 << 20
    with socket.create_connection(("127.0.0.1", stack.port)) as conn:
        conn.sendall((f"POST /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {stack.key}\r\n"
                      "Content-Type: application/octet-stream\r\nX-Filename: big.onnx\r\n"
                      f"Content-Length: {declared}\r\n\r\n").encode())
        chunk = b"\0" * (1 << 20)
        for _ in range(8):
            conn.sendall(chunk)

        def partial_upload():
            files = [p for p in tmp.rglob("upload") if p.is_file()]
            return files if files and files[0].stat().st_size > 0 else None

        partial = wait_until(partial_upload, timeout=30)
        kill_group(api, signal.SIGKILL)
        api.wait()
    assert partial[0].exists()  # the dead process left half an upload in tmp/...
    assert stack.sql("SELECT count(*) FROM models") == [(0,)]  # ...and nothing else
    assert stack.sql("SELECT count(*) FROM blobs") == [(0,)]
    blobs = stack.folder / "data" / "store" / "blobs"
    assert not blobs.exists() or not any(p.is_file() for p in blobs.rglob("*"))
    stack.api()
    assert list(tmp.iterdir()) == []  # the restarted API removed it
    with stack.http() as http:
        assert http.get("/v1/models").json()["items"] == []


def test_broker_down_at_submit_is_a_clean_503_and_nothing_is_stored(stack):
    stack.api()
    with stack.http() as http:
        model_id = upload(http, mlp_onnx_bytes())
        stack.redis.stop()
        resp = http.post("/v1/jobs", json={"model_id": model_id, "steps": [{"method": "quantize.int8_dynamic"}]})
        assert resp.status_code == 503, resp.text
        assert resp.json()["code"] == "broker_unavailable"
        assert stack.sql("SELECT count(*) FROM jobs") == [(0,)]
        assert stack.sql("SELECT count(*) FROM audit_log WHERE action = 'job.submit'") == [(0,)]
        assert http.get("/readyz").status_code == 503
        stack.redis.start()
        assert wait_until(lambda: _submit_when_broker_answers(http, model_id), timeout=60)
        assert stack.sql("SELECT count(*) FROM jobs") == [(1,)]


def test_a_model_exhausting_memory_fails_its_job_and_the_worker_goes_on(stack):
    stack.api()
    worker = stack.worker(MODELPRESS_JOB_MEMORY_LIMIT_BYTES=str(1 << 30))
    with stack.http() as http:
        hog = submit(http, upload(http, memory_hog_onnx()))
        fine = submit(http, upload(http, mlp_onnx_bytes()))
        job = wait_for_job(http, hog, timeout=180)
        assert job["status"] == "failed" and job["error"]["code"] == "resource_limit", job
        assert wait_for_job(http, fine, timeout=180)["status"] == "succeeded"
    assert worker.poll() is None


def test_a_goal_search_whose_worker_is_killed_resumes_from_its_stored_candidates(stack):
    """Issue 19: candidates are stored as they finish, so a lost worker costs the candidate under way, not the
    search: the next attempt keeps the records and models of the first and builds only what is left."""
    stack.api()
    worker = stack.worker()
    with stack.http() as http:
        model_id = upload(http, mlp_onnx_bytes(hidden=512))
        resp = http.post("/v1/jobs", json={"model_id": model_id, "evaluate": FAST | {"iterations": 20},
                                           "goal": {"families": ["quantize", "mixed_precision", "targets"],
                                                    "time_budget_s": 600}})
        assert resp.status_code == 202, resp.text
        job_id = resp.json()["id"]

        def records() -> dict[str, str]:
            return {a["name"]: a["sha256"] for a in http.get(f"/v1/jobs/{job_id}/artifacts").json()
                    if a["kind"] == "candidate-record"}

        # Killed after the first stored candidate: with one measuring process for the whole search, the candidates
        # after the second finished before the kill landed in one run of five.
        first = wait_until(lambda: (lambda found: found if len(found) >= 1 else None)(records()), timeout=240)
        (worker_id,), = stack.sql("SELECT worker_id FROM jobs WHERE id = %s", job_id)
        os.kill(int(worker_id.rpartition(":")[2]), signal.SIGKILL)
        job = wait_for_job(http, job_id, timeout=600)
        assert job["status"] == "succeeded", (job, stack.logs())
        assert job["attempts"] == 2
        after = records()
        assert {name: after.get(name) for name in first} == first  # kept as attempt 1 stored them
        report = http.get(f"/v1/jobs/{job_id}/report").json()
        assert any(note.startswith("resumed after a lost worker") for note in report["search"]["notes"]), report["search"]
        names = [c["name"] for c in report["candidates"]]
        assert len(names) == len(set(names))  # nothing built twice
        assert worker.poll() is None
