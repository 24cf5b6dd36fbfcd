"""Targets (issue 18): what a worker can serve (workers.targets), the registry it keeps in the database
(workers.registry), GET /v1/targets, and jobs routed by target (422 no_worker_for_target when nobody serves it).

The API tests register workers through the registry's own code with probes written here (a CPU with or without
BF16, with or without NNCF); the integration test starts two real Celery workers on one PostgreSQL and Redis that
advertise different targets, and shows which one takes a job.
"""
from __future__ import annotations

import base64
import datetime as dt
import json
import time
import uuid
from pathlib import Path

import httpx
import pytest

from app.dbmodels import Job, JobDataset
from tests.helpers import REDIS_URL, mlp_onnx_bytes, npz_bytes, redis_or_skip, row_count
from tests.stack import BIN, base_env, cli, free_port, logs, modelpress, processes, wait_for_job, wait_ready, wait_until

CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9R14 96-Core Processor
flags\t\t: fpu sse2 avx avx2 avx512f avx512bw avx512_vnni avx512_bf16 amx_tile

processor\t: 1
model name\t: AMD EPYC 9R14 96-Core Processor
flags\t\t: fpu sse2 avx avx2 avx512f avx512bw avx512_vnni avx512_bf16 amx_tile
"""


def fake_probe(*, openvino: bool = True, bf16: bool = False, nncf: bool = True, cuda: bool = False) -> dict:
    """What workers.targets.probe answers on a machine of this kind."""
    runtimes: dict = {"onnxruntime": {"version": "1.32.0", "providers": ["CPUExecutionProvider"]
                                      + (["CUDAExecutionProvider"] if cuda else [])}}
    if openvino:
        caps = ["FP32", "INT8", *(["BF16"] if bf16 else [])]
        runtimes["openvino"] = {"version": "2026.4.1", "devices": {"CPU": {"name": "Test CPU", "capabilities": caps}}}
    if nncf:
        runtimes["nncf"] = {"version": "3.4.0"}
    return {"host": "test-host", "cpu": {"name": "Test CPU", "logical_cores": 2,
                                         "isa": ["avx2", "avx512f", *(["avx512_bf16"] if bf16 else [])]},
            "memory_bytes": 8 * 1024**3, "runtimes": runtimes, "unavailable": {},
            "gpus": [{"name": "NVIDIA Test", "memory_bytes": 80 * 1024**3}] if cuda else []}


def keys(targets: list[dict]) -> list[str]:
    from workers.targets import target_key

    return [target_key(t) for t in targets]


# --- what a worker can serve -------------------------------------------------------------------------


def test_cpu_info_reads_the_model_cores_and_isa_flags():
    from workers.targets import cpu_info

    info = cpu_info(CPUINFO)
    assert info["name"] == "AMD EPYC 9R14 96-Core Processor"
    assert info["isa"] == ["avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile"]  # ISA_FLAGS' order
    assert info["logical_cores"] >= 1


def test_gpus_are_read_from_nvidia_smi_without_torch(tmp_path, monkeypatch):
    """What nvidia-smi --query-gpu=name,memory.total --format=csv,noheader,nounits prints (MiB), from a stand-in."""
    from workers.targets import gpus

    monkeypatch.setenv("PATH", str(tmp_path))
    assert gpus() == []  # no nvidia-smi: no GPU
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\nprintf 'NVIDIA H200, 143771\\nNVIDIA A10G, 23028\\n'\n")
    fake.chmod(0o755)
    assert gpus() == [{"name": "NVIDIA H200", "memory_bytes": 143771 * 1024**2},
                      {"name": "NVIDIA A10G", "memory_bytes": 23028 * 1024**2}]


def test_servable_targets_follow_the_hardware_and_the_runtimes():
    from workers.targets import servable_targets

    assert keys(servable_targets(fake_probe(openvino=False, nncf=False))) == ["onnxruntime.cpu"]
    assert keys(servable_targets(fake_probe(bf16=False))) == ["onnxruntime.cpu", "openvino.cpu.f32", "openvino.cpu.int8"]
    assert keys(servable_targets(fake_probe(bf16=True, nncf=False))) == [
        "onnxruntime.cpu", "openvino.cpu.f32", "openvino.cpu.bf16"]
    with_cuda = servable_targets(fake_probe(openvino=False, cuda=True))
    assert [(t["runtime"], t["device"], t["precision"], t["queue"]) for t in with_cuda] == [
        ("onnxruntime", "cpu", None, "cpu"), ("onnxruntime", "cuda", None, "gpu")]
    assert {t["queue"] for t in servable_targets(fake_probe(bf16=True))} == {
        "cpu", "openvino.cpu.f32", "openvino.cpu.bf16", "openvino.cpu.int8", "openvino.cpu.int8_bf16"}


def test_the_worker_targets_setting_selects_by_prefix_and_drops_what_cannot_be_served(caplog):
    from workers.targets import select_targets, servable_targets, worker_targets

    servable = servable_targets(fake_probe(bf16=True))
    assert keys(select_targets(servable, "auto")[0]) == keys(servable)
    assert keys(select_targets(servable, " OpenVINO.cpu ")[0]) == ["openvino.cpu.f32", "openvino.cpu.bf16",
                                                                   "openvino.cpu.int8", "openvino.cpu.int8_bf16"]
    assert keys(select_targets(servable, "openvino.cpu.int8")[0]) == ["openvino.cpu.int8"]  # not int8_bf16
    assert select_targets(servable, "openvino.cp") == ([], ["openvino.cp"])  # a prefix ends at a dot
    assert select_targets(servable, "onnxruntime,openvino.cpu.f32,tensorrt.cuda") == (
        [servable[0], servable[1]], ["tensorrt.cuda"])
    # The queues a worker consumes anyway (-Q cpu) bring their servable targets in; an unservable pattern is logged.
    with caplog.at_level("WARNING", logger="modelpress.worker"):
        served = worker_targets(fake_probe(bf16=False), "openvino.cpu.bf16,openvino.cpu.f32", consumed=["cpu", "gpu"])
    assert keys(served) == ["openvino.cpu.f32", "onnxruntime.cpu"]
    assert "openvino.cpu.bf16" in caplog.text and "dropped" in caplog.text


def test_this_machine_is_probed_in_a_process_of_its_own():
    """The real probe: ONNX Runtime and OpenVINO (installed with the workers) import here; bf16 is offered only
    where OpenVINO's CPU plugin says BF16, int8 where NNCF imports."""
    from workers.targets import ISA_FLAGS, probe_isolated, servable_targets

    found = probe_isolated()
    assert found["runtimes"]["onnxruntime"]["providers"] and found["cpu"]["name"]
    assert set(found["cpu"]["isa"]) <= set(ISA_FLAGS)
    ov_cpu = found["runtimes"]["openvino"]["devices"]["CPU"]
    assert ov_cpu["name"] and "FP32" in ov_cpu["capabilities"]
    served = keys(servable_targets(found))
    assert {"onnxruntime.cpu", "openvino.cpu.f32", "openvino.cpu.int8"} <= set(served)
    assert ("openvino.cpu.bf16" in served) == ("BF16" in ov_cpu["capabilities"])
    json.dumps(found)  # stored as JSON in the registry


# --- the registry and GET /v1/targets ----------------------------------------------------------------


def register(worker_id: str, probe: dict, patterns: str = "auto", *, seen_s_ago: float = 0) -> None:
    """A worker's row, written by the registry's own code (as workers.registry.register does at worker_ready)."""
    from app.dbmodels import Worker
    from app.settings import get_settings
    from workers import registry
    from workers.targets import worker_targets

    targets = worker_targets(probe, patterns, consumed=["cpu"])
    registration = registry.Registration(worker_id=worker_id, queues=sorted({"cpu", *(t["queue"] for t in targets)}),
                                         targets=targets, capabilities=probe)
    registry.touch(registration, get_settings(), fresh=True)
    if seen_s_ago:
        from app.db import session_scope

        with session_scope() as db:
            db.get_one(Worker, worker_id).last_seen_at = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=seen_s_ago)


@pytest.fixture
def model_id(client, alice) -> str:
    resp = client.post("/v1/models", files={"file": ("mlp.onnx", mlp_onnx_bytes())}, headers=alice)
    assert resp.status_code == 201, resp.text
    return resp.json()["id"]


def spec(model_id: str, **extra) -> dict:
    return {"model_id": model_id, "evaluate": {"batch_sizes": [1], "warmup": 1, "iterations": 5}, **extra}


OPENVINO_F32 = {"runtime": "openvino", "device": "cpu", "precision": "f32"}


def test_with_no_worker_only_the_default_target_is_listed_and_other_targets_are_refused(client, alice, model_id,
                                                                                        data_dir):
    found = client.get("/v1/targets", headers=alice).json()
    assert found == {"targets": [{"runtime": "onnxruntime", "device": "cpu", "precision": None, "queue": "cpu",
                                  "default": True, "workers": 0, "devices": [], "versions": {}}], "workers": []}
    resp = client.post("/v1/jobs", json=spec(model_id, target=OPENVINO_F32), headers=alice)
    assert resp.status_code == 422, resp.text
    problem = resp.json()
    assert problem["code"] == "no_worker_for_target" and problem["field"] == "target"
    assert "openvino/cpu/f32" in problem["message"] and problem["targets"] == []
    assert row_count(Job) == 0 and not list((data_dir / "broker" / "queue").glob("*.msg"))
    # The default target behaves as without one: queued for a worker that has not started yet.
    default = client.post("/v1/jobs", json=spec(model_id, target={"runtime": "onnxruntime"},
                                                 steps=[{"method": "quantize.int8_dynamic"}]), headers=alice)
    assert default.status_code == 202, default.text
    assert default.json()["queue"] == "cpu" and default.json()["target"]["precision"] is None


def test_live_workers_are_listed_with_their_hardware_and_jobs_routed_to_their_queue(database, client, alice, model_id,
                                                                                  data_dir):
    """On SQLite and PostgreSQL: two workers, one without BF16; a stale third one is not live."""
    register("plain@a", fake_probe(bf16=False), "onnxruntime")
    register("ov@b", fake_probe(bf16=False))
    register("gone@c", fake_probe(bf16=True), seen_s_ago=3600)
    found = client.get("/v1/targets", headers=alice).json()
    assert [w["id"] for w in found["workers"]] == ["ov@b", "plain@a"]
    ov = next(w for w in found["workers"] if w["id"] == "ov@b")
    assert ov["capabilities"]["runtimes"]["openvino"]["devices"]["CPU"]["capabilities"] == ["FP32", "INT8"]
    assert ov["queues"] == ["cpu", "openvino.cpu.f32", "openvino.cpu.int8"] and ov["last_seen_at"]
    by_name = {"/".join(filter(None, (t["runtime"], t["device"], t["precision"]))): t for t in found["targets"]}
    assert list(by_name) == ["onnxruntime/cpu", "openvino/cpu/f32", "openvino/cpu/int8"]  # no bf16: gone@c is stale
    assert by_name["onnxruntime/cpu"]["workers"] == 2 and by_name["onnxruntime/cpu"]["default"]
    assert by_name["openvino/cpu/f32"] == {
        "runtime": "openvino", "device": "cpu", "precision": "f32", "queue": "openvino.cpu.f32", "default": False,
        "workers": 1, "devices": [{"name": "Test CPU", "isa": ["avx2", "avx512f"], "memory_bytes": None}],
        "versions": {"openvino": "2026.4.1"}}
    assert by_name["openvino/cpu/int8"]["versions"] == {"openvino": "2026.4.1", "nncf": "3.4.0"}

    # Served: queued on the target's own queue, without steps, the target stored with its precision.
    resp = client.post("/v1/jobs", json=spec(model_id, target={"runtime": "openvino"}), headers=alice)
    assert resp.status_code == 202, resp.text
    job = resp.json()
    assert job["queue"] == "openvino.cpu.f32" and job["steps"] == []
    assert job["target"] == {**OPENVINO_F32, "calibration_dataset_id": None, "calibration_samples": 300,
                             "max_accuracy_drop": None}
    assert client.get(f"/v1/jobs/{job['id']}", headers=alice).json()["target"] == job["target"]
    sent = [p.name for p in (data_dir / "broker" / "queue").glob("*.msg")] if database == "sqlite" else None
    assert sent is None or [name.partition(".")[2] for name in sent] == ["openvino.cpu.f32.msg"]

    # bf16 asked of workers whose CPU has no BF16: refused, listing what is served; nothing stored.
    jobs_before = row_count(Job)
    resp = client.post("/v1/jobs", json=spec(model_id, target={**OPENVINO_F32, "precision": "bf16"},
                                             steps=[{"method": "quantize.fp16"}]), headers=alice)
    assert resp.status_code == 422, resp.text
    problem = resp.json()
    assert problem["code"] == "no_worker_for_target" and "openvino/cpu/bf16" in problem["message"]
    assert [(t["runtime"], t["precision"], t["workers"]) for t in problem["targets"]] == [
        ("onnxruntime", None, 2), ("openvino", "f32", 1), ("openvino", "int8", 1)]
    assert row_count(Job) == jobs_before


@pytest.mark.parametrize(("body", "status", "code", "field"), [
    ({"target": {"runtime": "tpu"}}, 422, "invalid_request", "target.runtime"),
    ({"target": {"runtime": "openvino", "precision": "f64"}}, 422, "invalid_request", "target.precision"),
    ({"target": {"runtime": "openvino", "dtype": "f32"}}, 422, "invalid_request", "target.dtype"),
    ({"target": {"runtime": "onnxruntime", "precision": "bf16"}, "steps": [{"method": "quantize.fp16"}]}, 422,
     "invalid_request", "target"),
    ({"target": {"runtime": "openvino", "calibration_dataset_id": "x"}}, 422, "invalid_request", "target"),
    ({"target": {"runtime": "openvino", "precision": "int8", "calibration_samples": 0}}, 422, "invalid_request",
     "target.calibration_samples"),
    ({"target": {"runtime": "onnxruntime"}}, 422, "invalid_request", "body"),  # the default target needs steps
    ({"target": OPENVINO_F32, "queue": "cpu"}, 422, "invalid_params", "queue"),
])
def test_bad_targets_are_422_naming_the_field_and_store_nothing(client, alice, model_id, data_dir, body, status, code,
                                                                 field):
    register("ov@b", fake_probe(bf16=True))
    resp = client.post("/v1/jobs", json=spec(model_id, **body), headers=alice)
    assert resp.status_code == status, resp.text
    problem = resp.json()
    assert problem["code"] == code, problem
    fields = [e["field"] for e in problem.get("errors", [])] or [problem["field"]]
    assert field in fields, problem
    assert row_count(Job) == 0 and not list((data_dir / "broker" / "queue").glob("*.msg"))


def test_the_calibration_dataset_is_checked_and_linked_like_the_jobs_other_datasets(client, alice, bob, model_id):
    import numpy as np

    register("ov@b", fake_probe())
    rng = np.random.default_rng(0)

    def upload(headers, **arrays) -> str:
        resp = client.post("/v1/datasets", files={"file": ("d.npz", npz_bytes(**arrays))}, headers=headers)
        assert resp.status_code == 201, resp.text
        return resp.json()["id"]

    good = upload(alice, features=rng.standard_normal((16, 64)).astype(np.float32))
    wrong = upload(alice, pixels=rng.standard_normal((16, 64)).astype(np.float32))
    foreign = upload(bob, features=rng.standard_normal((16, 64)).astype(np.float32))
    int8 = {"runtime": "openvino", "device": "cpu", "precision": "int8"}
    for dataset, status, code in ((foreign, 404, "dataset_not_found"), (wrong, 422, "dataset_mismatch")):
        resp = client.post("/v1/jobs", json=spec(model_id, target={**int8, "calibration_dataset_id": dataset}),
                           headers=alice)
        assert (resp.status_code, resp.json()["code"], resp.json()["field"]) == (
            status, code, "target.calibration_dataset_id"), resp.text
    assert row_count(Job) == 0
    resp = client.post("/v1/jobs", json=spec(model_id, target={**int8, "calibration_dataset_id": good}), headers=alice)
    assert resp.status_code == 202, resp.text
    assert resp.json()["queue"] == "openvino.cpu.int8"
    from app.db import session_scope

    with session_scope() as db:
        links = [(link.role, link.dataset_id) for link in db.query(JobDataset).filter_by(job_id=resp.json()["id"])]
    assert links == [("target.calibration", good)]
    # While the job waits, the dataset cannot go from under it.
    assert client.delete(f"/v1/datasets/{good}", headers=alice).status_code == 409


def test_registry_rows_follow_a_workers_life_on_both_databases(database, client, alice, monkeypatch):
    """register -> heartbeat -> clean shutdown, through workers.registry's own functions."""
    from app.dbmodels import Worker
    from app.settings import get_settings
    from workers import registry

    registration = registry.Registration(worker_id="w@h", queues=["cpu", "openvino.cpu.f32"],
                                         targets=[{"runtime": "openvino", "device": "cpu", "precision": "f32",
                                                   "queue": "openvino.cpu.f32"}],
                                         capabilities=fake_probe())
    monkeypatch.setattr(registry, "_current", registration)
    settings = get_settings()
    registry.touch(registration, settings, fresh=True)
    first = client.get("/v1/targets", headers=alice).json()["workers"][0]
    time.sleep(0.05)
    registry.touch(registration, settings)  # a heartbeat: only last_seen_at moves
    second = client.get("/v1/targets", headers=alice).json()["workers"][0]
    assert second["last_seen_at"] > first["last_seen_at"] and second["started_at"] == first["started_at"]
    assert row_count(Worker) == 1
    registry.unregister(settings)
    assert row_count(Worker) == 0
    assert client.get("/v1/targets", headers=alice).json()["workers"] == []
    registry.touch(registration, settings)  # a heartbeat after its row went (removed by hand): written again
    assert row_count(Worker) == 1


def test_a_lost_message_of_a_target_job_is_sent_again_to_its_queue(client, alice, model_id, data_dir, monkeypatch):
    from app.settings import get_settings
    from workers.recovery import reap

    monkeypatch.setenv("MODELPRESS_REQUEUE_GRACE_S", "0")
    get_settings.cache_clear()
    register("ov@b", fake_probe())
    job_id = client.post("/v1/jobs", json=spec(model_id, target=OPENVINO_F32), headers=alice).json()["id"]
    folder = data_dir / "broker" / "queue"
    assert reap()["resent"] == []  # its message waits in openvino.cpu.f32: nothing is missing
    for path in folder.glob("*.msg"):
        path.unlink()  # the broker lost it
    assert reap()["resent"] == [job_id]
    [message] = folder.glob("*.msg")
    assert message.name.endswith(".openvino.cpu.f32.msg")
    assert json.loads(base64.b64decode(json.loads(message.read_text())["body"]))[0] == [job_id]


def test_queues_of_targets_are_looked_into_on_redis(client, redis_prefix):
    from app.queue import get_celery, queued_job_ids
    from app.settings import get_settings

    settings = get_settings()
    get_celery().send_task("modelpress.run_job", args=["ov-job"], queue=settings.queue_name("openvino.cpu.bf16"))
    assert "ov-job" not in queued_job_ids(settings)
    assert "ov-job" in queued_job_ids(settings, queues=["openvino.cpu.bf16"])


# --- two real workers on PostgreSQL + Redis ------------------------------------------------------------


@pytest.mark.integration
def test_two_workers_advertise_different_targets_and_jobs_go_to_the_one_that_serves_them(
        tmp_path, postgres_database, queue_prefix):
    redis_or_skip()
    env = base_env(tmp_path / "data", MODELPRESS_MODE="production", MODELPRESS_DATABASE_URL=postgres_database,
                   MODELPRESS_BROKER_URL=REDIS_URL, MODELPRESS_QUEUE_PREFIX=queue_prefix)
    modelpress("migrate", env=env)
    key = modelpress("keys", "create", "--tenant", "acme", env=env).stdout.split("api key: ")[1].split()[0]
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    worker = [str(BIN / "modelpress"), "worker", "--queues", "gpu,cpu", "--loglevel", "info"]
    folders = {name: tmp_path / name for name in ("api", "plain", "openvino")}
    for folder in folders.values():
        folder.mkdir()
    with processes([str(BIN / "modelpress"), "api", "--port", str(port), "--log-level", "warning"], env=env,
                   log_dir=folders["api"]) as api, \
         processes(worker, env={**env, "MODELPRESS_WORKER_TARGETS": "onnxruntime"}, log_dir=folders["plain"]) as plain, \
         processes(worker, env={**env, "MODELPRESS_WORKER_TARGETS": "onnxruntime,openvino.cpu.f32"},
                   log_dir=folders["openvino"]) as (openvino_proc,):
        try:
            wait_ready(base, api + plain + [openvino_proc])
            with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=60) as http:
                check_routing(http, tmp_path, base, key, openvino_proc, plain[0].pid)
        except BaseException:
            print("\n".join(logs(folder) for folder in folders.values()))
            raise


def check_routing(http: httpx.Client, tmp_path: Path, base: str, key: str, openvino_proc, plain_pid: int) -> None:
    def both_registered():
        found = http.get("/v1/targets").json()
        return found if len(found["workers"]) == 2 else None

    found = wait_until(both_registered, timeout=60, every=0.5)
    ov_worker = next(w for w in found["workers"] if w["id"].startswith(f"modelpress-{openvino_proc.pid}@"))
    plain_worker = next(w for w in found["workers"] if w["id"].startswith(f"modelpress-{plain_pid}@"))
    assert keys(plain_worker["targets"]) == ["onnxruntime.cpu"]
    assert keys(ov_worker["targets"]) == ["onnxruntime.cpu", "openvino.cpu.f32"]
    assert "openvino.cpu.f32" in ov_worker["queues"] and "openvino.cpu.f32" not in plain_worker["queues"]
    for worker in (plain_worker, ov_worker):  # each with the capabilities it probed on this machine
        assert worker["capabilities"]["cpu"]["name"] and worker["capabilities"]["runtimes"]["onnxruntime"]["version"]
    assert ov_worker["capabilities"]["runtimes"]["openvino"]["devices"]["CPU"]["capabilities"]
    by_name = {"/".join(filter(None, (t["runtime"], t["device"], t["precision"]))): t for t in found["targets"]}
    assert list(by_name) == ["onnxruntime/cpu", "openvino/cpu/f32"]  # bf16 and int8 are servable, but not asked for
    assert by_name["onnxruntime/cpu"]["workers"] == 2 and by_name["openvino/cpu/f32"]["workers"] == 1

    model_id = http.post("/v1/models", files={"file": ("mlp.onnx", mlp_onnx_bytes())}).json()["id"]
    # Two openvino jobs while the plain worker is idle: the openvino worker (one job at a time) runs the first while
    # the second waits in its queue, which the idle plain worker would take at once if it consumed it.
    openvino_jobs = [http.post("/v1/jobs", json=spec(model_id, target=OPENVINO_F32)).json() for _ in range(2)]
    assert [job["queue"] for job in openvino_jobs] == ["openvino.cpu.f32"] * 2

    # Each job's "running" event names the worker that took it. (Their outcome is the OpenVINO lowering's business,
    # tested with it; here only the routing.)
    def started_on(job_id: str):
        events = http.get(f"/v1/jobs/{job_id}/events").json()
        return next((e["message"] for e in events if e["kind"] == "state" and e["status"] == "running"), None)

    for job in openvino_jobs:
        assert wait_until(lambda job=job: started_on(job["id"]), timeout=90, every=0.3).endswith(
            f"on worker {ov_worker['id']}")
        wait_for_job(http, job["id"], timeout=180)
    default_job = http.post("/v1/jobs", json=spec(model_id, steps=[{"method": "quantize.int8_dynamic"}])).json()
    assert default_job["queue"] == "cpu"
    assert wait_for_job(http, default_job["id"], timeout=180)["status"] == "succeeded"

    # The CLI sees the same, and its --target is refused where nobody serves it.
    service = {"url": base, "key": key, "tmp": tmp_path}
    listed = cli(service, "targets", "--json")
    assert listed.returncode == 0, listed.stderr
    assert len(json.loads(listed.stdout)["targets"]) == 2
    table = cli(service, "targets")
    assert table.returncode == 0 and "openvino/cpu/f32" in table.stdout and "onnxruntime/cpu (default)" in table.stdout
    (tmp_path / "mlp.onnx").write_bytes(mlp_onnx_bytes())
    refused = cli(service, "compress", "mlp.onnx", "--target", "openvino:cpu:bf16")
    assert refused.returncode == 1 and "no_worker_for_target" in refused.stderr, refused.stderr

    # A clean stop takes the worker out of the registry at once: its target goes, and jobs for it are refused.
    openvino_proc.terminate()
    assert openvino_proc.wait(timeout=60) == 0
    found = http.get("/v1/targets").json()
    assert [w["id"] for w in found["workers"]] == [plain_worker["id"]]
    assert [t["runtime"] for t in found["targets"]] == ["onnxruntime"]
    resp = http.post("/v1/jobs", json=spec(model_id, target=OPENVINO_F32),
                     headers={"Idempotency-Key": str(uuid.uuid4())})
    assert resp.status_code == 422 and resp.json()["code"] == "no_worker_for_target", resp.text
    assert [t["runtime"] for t in resp.json()["targets"]] == ["onnxruntime"]


# --- where users see it: CLI pieces and the dashboard ----------------------------------------------------


def test_cli_target_option_and_the_summary_rows_of_a_target(tmp_path, capsys):
    import argparse

    from app.cli import main, parse_target, summary_rows

    assert parse_target("OpenVINO:cpu:bf16") == {"runtime": "openvino", "device": "cpu", "precision": "bf16"}
    assert parse_target("openvino:cpu") == {"runtime": "openvino", "device": "cpu"}
    for bad in ("openvino", "openvino:cpu:bf16:x", "openvino::f32"):
        with pytest.raises(argparse.ArgumentTypeError, match="RUNTIME:DEVICE"):
            parse_target(bad)
    model = tmp_path / "m.onnx"
    model.write_bytes(b"x")
    with pytest.raises(SystemExit) as usage:  # nothing to do: no method, recipe or other target
        main(["compress", str(model), "--key", "k", "--url", "http://127.0.0.1:9", "--target", "onnxruntime:cpu"])
    assert usage.value.code == 2 and "--method or --recipe" in capsys.readouterr().err
    # The summary fields the worker writes for a target (app.reports): its two gains beside the total.
    rows = dict(summary_rows({
        "speedup": {"1": 2.4}, "speedup_ci": {"1": "2.40x (2.30-2.50)"},
        "target": {"runtime": "openvino", "device": "cpu", "precision": "bf16", "device_name": "AMD EPYC"},
        "runtime_speedup": {"1": 1.6}, "runtime_speedup_ci": {"1": "1.60x (1.50-1.70)"},
        "compression_speedup": {"1": 1.5}, "compression_speedup_ci": {"1": None}}))
    assert rows["target"] == "openvino/cpu/bf16 on AMD EPYC"
    assert rows["runtime gain, batch 1"] == "1.60x (1.50-1.70)" and rows["compression gain, batch 1"] == "1.50x"
    assert rows["speedup, batch 1"].startswith("2.40x (2.30-2.50)")


def test_dashboard_lists_targets_and_starts_a_job_on_one_then_shows_both_gains(browser, service, tmp_path):
    """The embedded service's worker serves every target this machine can (MODELPRESS_WORKER_TARGETS=auto)."""
    base, key = service["url"], service["key"]
    api = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=60)
    model_id = api.post("/v1/models", files={"file": ("mlp.onnx", mlp_onnx_bytes())}).json()["id"]

    def served_targets():  # once the worker has started and registered
        targets = api.get("/v1/targets").json()["targets"]
        names = {"/".join(filter(None, (t["runtime"], t["device"], t["precision"]))) for t in targets}
        return names if "openvino/cpu/f32" in names else None

    served = wait_until(served_targets, timeout=60, every=0.5)

    page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
    problems: list[str] = []
    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    page.goto(f"{base}/ui#/targets")
    page.fill("#api-key", key)
    page.click("#signin-form button[type=submit]")
    page.wait_for_selector("#targets-table")
    assert set(page.eval_on_selector_all("#targets-table tr[data-target]", "rows => rows.map(r => r.dataset.target)")) == served
    assert "(default)" in page.inner_text("#targets-table tr[data-target='onnxruntime/cpu']")
    assert page.locator("#workers-table tr[data-worker]").count() >= 1
    page.screenshot(path=str(tmp_path / "targets.png"), full_page=True)

    page.goto(f"{base}/ui#/jobs/new?model={model_id}")
    page.wait_for_selector("#job-form")
    # A goal is offered first (it tries every target itself, so the target picker waits for another choice).
    assert page.is_checked("#mode-goal") and page.is_disabled("#job-target")
    page.check("#mode-steps")
    assert page.is_disabled("#mode-none") and page.is_enabled("#job-queue")
    page.select_option("#job-target", page.get_attribute("#job-target option[data-target='openvino/cpu/f32']", "value"))
    assert page.is_enabled("#mode-none") and page.is_disabled("#job-queue")
    page.check("#mode-none")
    page.fill("input[name='evaluate.batch_sizes']", "1")
    page.fill("input[name='evaluate.warmup']", "1")
    page.fill("input[name='evaluate.iterations']", "5")
    page.click("#start-job")
    page.wait_for_url("**#/jobs?new=*")
    job_id = page.url.rsplit("new=", 1)[1]
    job = api.get(f"/v1/jobs/{job_id}").json()
    assert (job["target"]["runtime"], job["target"]["precision"], job["steps"], job["queue"]) == (
        "openvino", "f32", [], "openvino.cpu.f32")

    job = wait_for_job(api, job_id, timeout=180)
    assert job["status"] == "succeeded", job  # (the OpenVINO lowering's own tests say more of its outcome)
    summary = job["summary"]
    page.goto(f"{base}/ui#/jobs/{job_id}")
    page.wait_for_selector("#report[data-ready=true]", timeout=60_000)
    row = page.locator("#gains-table tr[data-batch='1'] td[data-gain]")
    cells = {cell.get_attribute("data-gain"): cell.inner_text() for cell in row.all()}
    assert cells == {"runtime": summary["runtime_speedup_ci"]["1"], "compression": summary["compression_speedup_ci"]["1"],
                     "total": summary["speedup_ci"]["1"]}
    assert page.locator("#gains-chart svg").count() == 1 and "openvino/cpu/f32" in page.inner_text("#gains h2")
    page.screenshot(path=str(tmp_path / "job-target.png"), full_page=True)
    assert not problems, problems
