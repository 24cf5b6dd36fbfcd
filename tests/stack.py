"""Real processes for end-to-end tests: the API (uvicorn) and a Celery worker, driven over HTTP."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def modelpress(*args: str, env: dict, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "modelpress"), *args], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=120, check=True, **kwargs)


def wait_ready(base_url: str, procs: list[subprocess.Popen], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        try:
            if httpx.get(f"{base_url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{base_url} not ready after {timeout}s")


@contextmanager
def processes(*argvs: list[str], env: dict, log_dir: Path):
    procs = []
    try:
        for index, argv in enumerate(argvs):
            log = open(log_dir / f"proc-{index}.log", "w")
            procs.append(subprocess.Popen(argv, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True))
        yield procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def logs(log_dir: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-4000:]}" for p in sorted(log_dir.glob("*.log")))


def base_env(data_dir: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELPRESS_")}
    env.update({"MODELPRESS_DATA_DIR": str(data_dir), "PYTHONUNBUFFERED": "1", **extra})
    return env


def wait_for_job(http: httpx.Client, job_id: str, timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    etag = None
    seen_statuses = []
    while time.monotonic() < deadline:
        headers = {"If-None-Match": etag} if etag else {}
        resp = http.get(f"/v1/jobs/{job_id}", headers=headers)
        if resp.status_code == 304:
            time.sleep(0.3)
            continue
        resp.raise_for_status()
        etag = resp.headers["etag"]
        job = resp.json()
        if not seen_statuses or seen_statuses[-1] != job["status"]:
            seen_statuses.append(job["status"])
        if job["status"] in ("succeeded", "failed", "cancelled"):
            job["_seen_statuses"] = seen_statuses
            return job
        time.sleep(0.3)
    raise TimeoutError(f"job {job_id} not finished after {timeout}s (seen {seen_statuses})")


class RedisServer:
    """A redis-server of the test's own on a free port (tests that restart or flush Redis never touch the
    machine's): no persistence, so a restart loses every message, as a crashed production Redis can."""

    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        self.folder = folder
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        import redis

        log = open(self.folder / f"redis-{self.port}.log", "a")
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", str(self.folder)], stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                redis.Redis.from_url(self.url, socket_timeout=1).ping()
                return self
            except redis.RedisError:
                time.sleep(0.1)
        raise TimeoutError(f"redis-server on port {self.port} did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def client(self):
        import redis

        return redis.Redis.from_url(self.url, socket_timeout=3)
