"""Each job runs in a fenced process of its own (issue 9): memory, CPU time, wall clock, no network.

These run jobs the way a worker does (workers.supervise.run_job starts the job's process), without a Celery
worker around them; tests/workers/test_faults.py does the same on the real stack.
"""
from __future__ import annotations

import json
import socket
import subprocess
import sys

import numpy as np
import pytest
from sqlalchemy import select

from app.db import session_scope
from app.dbmodels import Artifact
from tests.helpers import ROOT, memory_hog_onnx, mlp_onnx_bytes, onnx_bytes, store_files
from tests.stack import adopting_orphans, job_processes, wait_until
from workers.supervise import run_job


@pytest.fixture(autouse=True)
def _orphans_stay_in_view():
    with adopting_orphans():  # a job's process outliving its parent is still found by job_processes()
        yield


def set_env(monkeypatch, **values) -> None:
    for name, value in values.items():
        monkeypatch.setenv(f"MODELPRESS_{name.upper()}", str(value))
    from app.settings import get_settings

    get_settings.cache_clear()


def submit(client, headers, model: bytes, **evaluate) -> str:
    resp = client.post("/v1/models", files={"file": ("m.onnx", model)}, headers=headers)
    assert resp.status_code == 201, resp.text
    spec = {"model_id": resp.json()["id"], "steps": [{"method": "quantize.int8_dynamic"}],
            "evaluate": {"batch_sizes": [1], "warmup": 1, "iterations": 5, **evaluate}}
    resp = client.post("/v1/jobs", json=spec, headers=headers)
    assert resp.status_code == 202, resp.text
    return resp.json()["id"]


def test_a_job_runs_fenced_and_its_report_says_how(client, alice):
    job_id = submit(client, alice, mlp_onnx_bytes())
    run_job(job_id)
    job = client.get(f"/v1/jobs/{job_id}", headers=alice).json()
    assert job["status"] == "succeeded", job
    sandbox = client.get(f"/v1/jobs/{job_id}/report", headers=alice).json()["sandbox"]
    assert sandbox["network"].startswith("none"), sandbox  # this machine allows network namespaces
    assert sandbox["memory_bytes"] > 0 and sandbox["wall_clock_s"] > 0
    wait_until(lambda: not job_processes(), 30)


def test_a_model_that_exhausts_memory_fails_with_resource_limit_and_the_next_job_runs(client, alice, monkeypatch):
    set_env(monkeypatch, job_memory_limit_bytes=1 << 30)
    hog = submit(client, alice, memory_hog_onnx())
    run_job(hog)
    job = client.get(f"/v1/jobs/{hog}", headers=alice).json()
    assert job["status"] == "failed", job
    assert job["error"]["code"] == "resource_limit", job["error"]
    assert "out of memory" in job["error"]["message"] and "1.0 GiB" in job["error"]["message"]
    # The worker (this process) goes on: the next job, same limits, succeeds.
    fine = submit(client, alice, mlp_onnx_bytes())
    run_job(fine)
    assert client.get(f"/v1/jobs/{fine}", headers=alice).json()["status"] == "succeeded"
    wait_until(lambda: not job_processes(), 30)


def test_cpu_time_cap_stops_the_job_with_resource_limit(client, alice, monkeypatch):
    set_env(monkeypatch, job_cpu_time_limit_s=1, job_timeout_s=60)  # a regression fails in a minute, not hours
    job_id = submit(client, alice, mlp_onnx_bytes(hidden=1024), iterations=100000, batch_sizes=[64])
    run_job(job_id)
    job = client.get(f"/v1/jobs/{job_id}", headers=alice).json()
    assert job["status"] == "failed" and job["error"]["code"] == "resource_limit", job
    assert "CPU-time limit of 1 s" in job["error"]["message"]
    wait_until(lambda: not job_processes(), 30)


def test_wall_clock_cap_kills_the_job_and_all_it_started(client, alice, monkeypatch):
    set_env(monkeypatch, job_timeout_s=4, heartbeat_interval_s=0.5, heartbeat_timeout_s=5)
    job_id = submit(client, alice, mlp_onnx_bytes(hidden=1024), iterations=100000, batch_sizes=[64])
    run_job(job_id)
    job = client.get(f"/v1/jobs/{job_id}", headers=alice).json()
    assert job["status"] == "failed" and job["error"]["code"] == "resource_limit", job
    assert "wall-clock limit of 4 s" in job["error"]["message"]
    wait_until(lambda: not job_processes(), 30)  # the measuring grandchild went with it


def test_the_jobs_process_reaches_no_network():
    """The fence, applied as the job's process applies it, against a server listening on loopback."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    probe = ("import json, socket, sys, os\n"
             "from workers.sandbox import JobLimits, apply_in_child\n"
             "applied = {}\n"
             "if sys.argv[1] == 'fenced':\n"
             "    applied = apply_in_child(JobLimits(None, None, 60, 'none'), os.getppid())\n"
             "try:\n"
             f"    socket.create_connection(('127.0.0.1', {port}), timeout=3).close(); reached = True\n"
             "except OSError as exc:\n"
             "    reached = str(exc)\n"
             "print(json.dumps({'reached': reached, 'network': applied.get('network')}))\n")
    try:
        results = {}
        for mode in ("fenced", "open"):
            done = subprocess.run([sys.executable, "-c", probe, mode], cwd=ROOT, capture_output=True, text=True,
                                  timeout=60)
            results[mode] = json.loads(done.stdout)
    finally:
        server.close()
    assert results["open"]["reached"] is True  # the control: the server is there
    assert results["fenced"]["reached"] is not True, results
    assert "unreachable" in results["fenced"]["reached"].lower()
    assert results["fenced"]["network"].startswith("none")


def test_an_op_onnx_runtime_cannot_run_fails_the_job_as_unsupported_op(client, alice):
    # com.microsoft is ONNX Runtime's own contrib domain, so the upload cannot tell this op does not exist.
    from onnx import TensorProto, helper, numpy_helper

    model = onnx_bytes(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("NotAnOp", ["h"], ["y"], domain="com.microsoft")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
        [numpy_helper.from_array(np.ones((4, 4), np.float32), "W")], domains=["com.microsoft"])
    job_id = submit(client, alice, model)
    run_job(job_id)
    job = client.get(f"/v1/jobs/{job_id}", headers=alice).json()
    assert job["status"] == "failed", job
    assert job["error"]["code"] == "unsupported_op", job["error"]
    assert "com.microsoft:NotAnOp" in job["error"]["message"]


def test_an_artifact_outside_the_jobs_folder_is_never_stored(data_dir, tmp_path):
    """The worker trusts the job's process no further than its own folder: a process that names another file
    (a parser exploit, say) gets the job failed, and nothing of that file is stored."""
    from app.errors import JobFailed
    from app.store import get_store
    from workers.supervise import Attempt

    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0")
    store = get_store()
    with store.workdir() as folder:
        (folder / "link.onnx").symlink_to(secret)
        attempt = Attempt(job_id="none", number=1, store=store, folder=folder)
        for path in (secret, folder / "link.onnx", folder / ".." / "elsewhere.onnx"):
            with pytest.raises(JobFailed, match="not one of its own files"):
                attempt.store_artifact({"path": str(path), "name": "model.onnx", "sha256": "0" * 64})
    with session_scope() as db:
        assert db.scalars(select(Artifact)).all() == []
    assert not any(p.read_bytes() == b"root:x:0:0" for p in store_files(data_dir))


def test_cancelling_a_running_job_stops_its_process(client, alice):
    import threading
    import time

    job_id = submit(client, alice, mlp_onnx_bytes(hidden=1024), iterations=100000, batch_sizes=[64])
    worker = threading.Thread(target=run_job, args=(job_id,), daemon=True)
    worker.start()
    deadline = time.monotonic() + 60
    while client.get(f"/v1/jobs/{job_id}", headers=alice).json()["stage"] != "measuring":
        assert time.monotonic() < deadline, "the job never reached its measurement"
        time.sleep(0.2)
    asked = time.monotonic()
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=alice).status_code == 202
    worker.join(timeout=60)
    assert not worker.is_alive()
    job = client.get(f"/v1/jobs/{job_id}", headers=alice).json()
    assert job["status"] == "cancelled", job
    assert time.monotonic() - asked < 30  # 100000 calls would take minutes: it stopped on the way
    wait_until(lambda: not job_processes(), 30)
