"""Real processes for end-to-end tests: the API (uvicorn) and a Celery worker, driven over HTTP."""
from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

from bench.common import free_port, wait_ready  # noqa: F401 - re-exported: the tests start services with them

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def wait_until(check, timeout: float, every: float = 0.2):
    """`check()`'s first true value, tried every `every` s; TimeoutError once `timeout` s have passed without one."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up waiting after {timeout} s")
        time.sleep(every)


JOB_PROCESS_MARKERS = ("workers.job_child", "workers.measure.child")
PR_SET_CHILD_SUBREAPER = 36


@contextmanager
def adopting_orphans():
    """While it lasts, this process is the child subreaper of everything it starts: a process whose parent
    dies (a job's process whose worker was killed, say) is re-parented here instead of to init, so that
    `job_processes` still sees it. (Adopted processes are never waited for: once dead they stay zombies, without
    a command line, which `job_processes` does not count, until this process ends.)"""
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    try:
        yield
    finally:
        prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


def job_processes() -> list[str]:
    """Command lines of the job processes (workers.job_child) and measuring processes (workers.measure.child)
    descended from this test process: its workers' leftovers, never another test run's on the same machine."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # it ended meanwhile
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the last ")".
        parents[int(stat.parent.name)] = int(text[text.rindex(")") + 2:].split()[1])
    descendants, frontier = set(), {os.getpid()}
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier} - descendants
        descendants |= frontier
    found = []
    for pid in sorted(descendants):
        try:
            raw = (Path("/proc") / str(pid) / "cmdline").read_bytes()
        except OSError:
            continue
        cmdline = raw.replace(b"\0", b" ").decode(errors="replace").strip()
        if any(marker in cmdline for marker in JOB_PROCESS_MARKERS):
            found.append(f"{pid} {cmdline}")
    return found


def modelpress(*args: str, env: dict, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "modelpress"), *args], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=120, check=True, **kwargs)


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


@contextmanager
def production_stack(folder: Path, database_url: str, redis_url: str, queue_prefix: str, tenants=("acme",)):
    """The production deployment as processes: PostgreSQL, Redis, a migrated database, one API and one worker.
    Yields (base URL, {tenant: API key}); prints the processes' logs when the block fails."""
    env = base_env(folder / "data", MODELPRESS_MODE="production", MODELPRESS_DATABASE_URL=database_url,
                   MODELPRESS_BROKER_URL=redis_url, MODELPRESS_QUEUE_PREFIX=queue_prefix)
    modelpress("migrate", env=env)
    keys = {tenant: modelpress("keys", "create", "--tenant", tenant, env=env).stdout.split("api key: ")[1].split()[0]
            for tenant in tenants}
    port = free_port()
    api = [str(BIN / "modelpress"), "api", "--port", str(port), "--log-level", "warning"]
    worker = [str(BIN / "modelpress"), "worker", "--queues", "gpu,cpu", "--loglevel", "info"]
    with processes(api, worker, env=env, log_dir=folder) as procs:
        base = f"http://127.0.0.1:{port}"
        try:
            wait_ready(base, procs)
            yield base, keys
        except BaseException:
            print(logs(folder))
            raise


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
        self.log = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        import redis

        self.log = open(self.folder / f"redis-{self.port}.log", "a")
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", str(self.folder)], stdout=self.log,
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
        if self.log is not None:
            self.log.close()
            self.log = None

    def client(self):
        import redis

        return redis.Redis.from_url(self.url, socket_timeout=3)


def cli(service, *args: str, key: str | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELPRESS_")}
    env.update(MODELPRESS_URL=service["url"], MODELPRESS_API_KEY=key or service["key"], COLUMNS="160")
    return subprocess.run([str(BIN / "modelpress"), *args], env=env, cwd=cwd or service["tmp"],
                          capture_output=True, text=True, timeout=240)
