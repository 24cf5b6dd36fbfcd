"""Load on the API with the production settings (issue 9): status polls and job listings from many clients while
a job runs, and the API's memory while it takes 1 GB uploads.

The deployment is the production one on this machine: PostgreSQL (a fresh database), Redis (the machine's,
under a key prefix of this run's own), `modelpress api --workers N` and one `modelpress worker`, which runs a
long job during the whole load. wrk (Debian's package; installed if missing) drives loopback connections:

- `GET /v1/jobs/{id}` of the running job, plain;
- the same with `If-None-Match`, each connection sending the last ETag it was given (as a dashboard polls:
  304 while nothing changed, 200 when the job moved);
- `GET /v1/jobs?limit=20`.

Then three 1 GB uploads, each streamed from disk: a single `.onnx`, a `.zip` of `.onnx` + external data, and
an `.npz` dataset; the API process's peak resident memory (VmHWM, reset before each) against its resident
memory before. Goals: at least 1,000 polls/s with p99 under 50 ms and no errors; memory growth under 100 MB.

    .venv/bin/python bench/load.py [--seconds 20] [--connections 64] [--api-workers 1,2] [--no-upload] [--no-write]
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import free_port, wait_ready  # noqa: E402
from bench.results import publish  # noqa: E402

BIN = Path(sys.executable).parent
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/test"
REDIS = "redis://127.0.0.1:6379/0"
GB = 1 << 30

# Each wrk connection keeps the last ETag it got and sends it back, as a polling dashboard does.
ETAG_LUA = """
local etag = nil
request = function()
  local headers = {}
  for name, value in pairs(wrk.headers) do headers[name] = value end
  if etag then headers["If-None-Match"] = etag end
  return wrk.format("GET", nil, headers)
end
response = function(status, headers, body)
  if headers["ETag"] then etag = headers["ETag"] end
  if headers["etag"] then etag = headers["etag"] end
end
"""


def sh(*argv: str, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), env=env, cwd=ROOT, check=True, capture_output=True, text=True, **kwargs)


def ensure_wrk() -> str:
    found = shutil.which("wrk")
    if found:
        return found
    subprocess.run(["apt-get", "install", "-y", "-q", "wrk"], check=True, capture_output=True,
                   env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    return shutil.which("wrk")


class Deployment:
    def __init__(self, folder: Path, api_workers: int) -> None:
        import psycopg

        self.folder = folder
        self.database = f"mp_load_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.database}"')
        self.prefix = f"mpload-{uuid.uuid4().hex[:8]}-"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("MODELPRESS_")}
        self.env.update(MODELPRESS_MODE="production", MODELPRESS_DATA_DIR=str(folder / "data"),
                        MODELPRESS_DATABASE_URL=f"postgresql+psycopg://postgres@127.0.0.1:5432/{self.database}",
                        MODELPRESS_BROKER_URL=REDIS, MODELPRESS_QUEUE_PREFIX=self.prefix, PYTHONUNBUFFERED="1")
        sh(str(BIN / "modelpress"), "migrate", env=self.env)
        created = sh(str(BIN / "modelpress"), "keys", "create", "--tenant", "load", env=self.env).stdout
        self.key = re.search(r"api key: (\S+)", created).group(1)
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.procs: list[subprocess.Popen] = []
        self.api = self._spawn([str(BIN / "modelpress"), "api", "--port", str(self.port), "--log-level", "warning",
                                "--no-access-log", "--workers", str(api_workers)], "api")
        self.worker = self._spawn([str(BIN / "modelpress"), "worker", "--queues", "gpu,cpu", "--loglevel",
                                   "warning"], "worker")
        self._wait_ready()

    def _spawn(self, argv: list[str], name: str) -> subprocess.Popen:
        log = open(self.folder / f"{name}.log", "w")
        proc = subprocess.Popen(argv, env=self.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs.append(proc)
        return proc

    def _wait_ready(self) -> None:
        try:
            wait_ready(self.base, self.procs)
        except (TimeoutError, RuntimeError) as exc:
            raise TimeoutError(f"{exc}\n{(self.folder / 'api.log').read_text()}") from None

    def http(self):
        import httpx

        return httpx.Client(base_url=self.base, headers={"Authorization": f"Bearer {self.key}"}, timeout=600)

    def api_pids(self) -> list[int]:
        """The processes that serve requests (uvicorn's workers, or the API process itself with one)."""
        children = subprocess.run(["pgrep", "-P", str(self.api.pid)], capture_output=True, text=True).stdout.split()
        served = [int(pid) for pid in children if "multiprocessing" not in _cmdline(int(pid))]
        return served or [self.api.pid]

    def close(self) -> None:
        import signal

        import psycopg
        import redis

        for proc in self.procs:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        client = redis.Redis.from_url(REDIS)
        for key in client.scan_iter(match=f"{self.prefix}*"):
            client.delete(key)
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def mlp_onnx(hidden: int) -> bytes:
    from bench.common import mlp_onnx_bytes

    return mlp_onnx_bytes(hidden=hidden)


def start_jobs(http) -> tuple[str, str]:
    """A few finished jobs (for the listing), then one that runs through the whole load. Returns (the running
    job's id, the id of a finished one)."""
    model = http.post("/v1/models", files={"file": ("mlp.onnx", mlp_onnx(256))}).json()["id"]
    finished = None
    for _ in range(3):
        job = http.post("/v1/jobs", json={"model_id": model, "steps": [{"method": "quantize.int8_dynamic"}],
                                          "evaluate": {"batch_sizes": [1], "warmup": 1, "iterations": 3}}).json()
        finished = job["id"]
    wait_status(http, finished, ("succeeded",), timeout=300)
    big = http.post("/v1/models", files={"file": ("wide.onnx", mlp_onnx(1024))}).json()["id"]
    running = http.post("/v1/jobs", json={"model_id": big, "steps": [{"method": "quantize.int8_dynamic"}],
                                          "evaluate": {"batch_sizes": [64], "warmup": 10,
                                                       "iterations": 100000}}).json()["id"]
    wait_status(http, running, ("running",), timeout=120)
    return running, finished


def wait_status(http, job_id: str, statuses: tuple[str, ...], timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = http.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in statuses:
            return job
        time.sleep(0.5)
    raise TimeoutError(f"job {job_id} not {statuses} after {timeout} s")


def run_wrk(wrk: str, url: str, key: str, *, seconds: int, connections: int, lua: Path | None) -> dict:
    argv = [wrk, "-t2", f"-c{connections}", f"-d{seconds}s", "--latency", "--timeout", "5s",
            "-H", f"Authorization: Bearer {key}"]
    if lua is not None:
        argv += ["-s", str(lua)]
    out = subprocess.run(argv + [url], capture_output=True, text=True, check=True).stdout
    return parse_wrk(out)


def parse_wrk(out: str) -> dict:
    def ms(text: str) -> float:
        value, unit = re.match(r"([\d.]+)(us|ms|s)", text).groups()
        return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]

    latency = dict(re.findall(r"^\s+(50|99)%\s+(\S+)", out, re.M))
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)), "requests": requests,
            "p50_ms": ms(latency["50"]), "p99_ms": ms(latency["99"]),
            "errors": (int(non_2xx.group(1)) if non_2xx else 0)
            + (sum(int(n) for n in socket_errors.groups()) if socket_errors else 0)}


# --- uploads ------------------------------------------------------------------------------------------------

def big_onnx(path: Path, size: int) -> Path:
    """y = x @ W with W of `size` bytes of float32 (random, so nothing compresses it away)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    side = int((size / 4) ** 0.5)
    weight = np.random.default_rng(0).standard_normal((side, side), dtype=np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "big",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", side])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", side])],
                              initializer=[numpy_helper.from_array(weight, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))
    return path


def big_zip(path: Path, onnx_path: Path) -> Path:
    import onnx

    model = onnx.load(str(onnx_path))
    folder = path.parent / "ext"
    folder.mkdir(exist_ok=True)
    onnx.save_model(model, str(folder / "big.onnx"), save_as_external_data=True, location="big.onnx.data",
                    size_threshold=0)
    del model
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.write(folder / "big.onnx", "big.onnx")
        zf.write(folder / "big.onnx.data", "big.onnx.data")
    shutil.rmtree(folder)
    return path


def big_npz(path: Path, size: int) -> Path:
    import numpy as np

    rows = size // (4 * 256)
    np.savez(path, features=np.random.default_rng(0).standard_normal((rows, 256), dtype=np.float32),
             labels=np.zeros(rows, np.int64))
    return path


def rss_kib(pid: int) -> dict[str, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    return {key: int(re.search(rf"^{key}:\s+(\d+) kB", status, re.M).group(1)) for key in ("VmRSS", "VmHWM")}


def upload_growth(deployment: Deployment, path: Path, route: str) -> dict:
    import httpx

    pid = deployment.api_pids()[0]
    before = rss_kib(pid)["VmRSS"]
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    started = time.perf_counter()
    with open(path, "rb") as fh:
        def chunks():
            while chunk := fh.read(1 << 20):
                yield chunk

        resp = httpx.post(f"{deployment.base}{route}", content=chunks(), timeout=900,
                          headers={"Authorization": f"Bearer {deployment.key}", "X-Filename": path.name,
                                   "Content-Type": "application/octet-stream"})
    took = time.perf_counter() - started
    peak = rss_kib(pid)["VmHWM"]
    return {"status": resp.status_code, "code": resp.json().get("code") if resp.status_code >= 400 else None,
            "bytes": path.stat().st_size, "growth_mib": (peak - before) / 1024, "rss_before_mib": before / 1024,
            "seconds": took}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--api-workers", default="1,2")
    parser.add_argument("--upload-bytes", type=int, default=GB)
    parser.add_argument("--no-upload", action="store_true")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    started = time.time()
    wrk = ensure_wrk()
    rows, goals = [], []
    uploads: list[tuple[str, dict]] = []
    with tempfile.TemporaryDirectory(prefix="mp-load-") as folder_name:
        folder = Path(folder_name)
        lua = folder / "etag.lua"
        lua.write_text(ETAG_LUA)
        for workers in [int(w) for w in args.api_workers.split(",")]:
            run_folder = folder / f"api-{workers}"
            run_folder.mkdir()
            deployment = Deployment(run_folder, workers)
            try:
                with deployment.http() as http:
                    running, _finished = start_jobs(http)
                scenarios = [("GET /v1/jobs/{id}", f"/v1/jobs/{running}", None),
                             ("GET /v1/jobs/{id}, If-None-Match", f"/v1/jobs/{running}", lua),
                             ("GET /v1/jobs?limit=20", "/v1/jobs?limit=20", None)]
                for label, path, script in scenarios:
                    figures = run_wrk(wrk, deployment.base + path, deployment.key, seconds=args.seconds,
                                      connections=args.connections, lua=script)
                    with deployment.http() as http:
                        still = http.get(f"/v1/jobs/{running}").json()["status"]
                    rows.append((workers, label, figures, still))
                    print(workers, label, figures, "job:", still, flush=True)
                    if "{id}" in label:
                        goals.append((workers, label, figures))
                if not args.no_upload and workers == 1:
                    data = folder / "uploads"
                    data.mkdir()
                    single = big_onnx(data / "big.onnx", args.upload_bytes)
                    zipped = big_zip(data / "big.zip", single)
                    for label, path, route in [("single .onnx", single, "/v1/models"),
                                               (".zip: .onnx + external data", zipped, "/v1/models")]:
                        uploads.append((label, upload_growth(deployment, path, route)))
                        print(label, uploads[-1][1], flush=True)
                    single.unlink()
                    zipped.unlink()
                    dataset = big_npz(data / "big.npz", args.upload_bytes)
                    uploads.append((".npz dataset", upload_growth(deployment, dataset, "/v1/datasets")))
                    print(".npz dataset", uploads[-1][1], flush=True)
                    dataset.unlink()
            finally:
                deployment.close()

    table = ["| API processes | requests | req/s | p50 | p99 | errors | job during the load |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for workers, label, f, still in rows:
        table.append(f"| {workers} | {label} | {f['rps']:.0f} | {f['p50_ms']:.2f} ms | {f['p99_ms']:.2f} ms | "
                     f"{f['errors']} | {still} |")
    if uploads:
        table += ["", "| upload (streamed, 1 API process) | size | answer | API memory growth (peak RSS) | time |",
                  "| --- | --- | --- | --- | --- |"]
        for label, u in uploads:
            table.append(f"| {label} | {u['bytes'] / GB:.2f} GiB | {u['status']}{' ' + u['code'] if u['code'] else ''}"
                         f" | {u['growth_mib']:.0f} MiB (from {u['rss_before_mib']:.0f} MiB) | {u['seconds']:.1f} s |")
    readout = ["", "Read against issue 9's goals:"]
    for workers, label, f in goals:
        met = f["rps"] >= 1000 and f["p99_ms"] < 50 and f["errors"] == 0
        readout.append(f"- {label} with {workers} API process(es): {f['rps']:.0f} req/s, p99 {f['p99_ms']:.1f} ms, "
                       f"{f['errors']} errors (goal ≥ 1000/s, p99 < 50 ms, 0 errors: {'**met**' if met else '**not met**'})")
    for label, u in uploads:
        met = u["status"] == 201 and u["growth_mib"] < 100
        readout.append(f"- upload of a {u['bytes'] / GB:.2f} GiB {label}: API memory grew {u['growth_mib']:.0f} MiB "
                       f"(goal < 100 MB: {'**met**' if met else '**not met**'})")
    how = (f"Production settings (PostgreSQL, Redis, `modelpress api --workers N --no-access-log`, one worker) on "
           f"loopback; wrk, 2 threads, {args.connections} connections, {args.seconds} s per row, while the worker runs "
           "a job (quantize + a 100000-call measurement: it holds the cores' share a real job would). The "
           "If-None-Match row: each connection sends back the last ETag it got (304 until the job's progress "
           "moves). Uploads: a raw body streamed from disk; growth = the API process's peak RSS (VmHWM, reset "
           "before each upload) minus its RSS before.")
    publish("API under load, and memory while uploading 1 GB", how, "\n".join(table + readout), started=started,
            write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
