"""The Python client (app.client) and the `modelpress` client commands.

Unit tests drive the client's retry and error rules through httpx.MockTransport; the rest runs
against a real embedded service (`modelpress run`: API + Celery worker + SQLite), as a user would.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import httpx
import pytest

from app.client import (
    ChecksumMismatch,
    Client,
    Conflict,
    InvalidRequest,
    NotFound,
    RateLimited,
    ServerError,
    Unauthorized,
    Unreachable,
)
from tests.helpers import mlp_onnx_bytes
from tests.stack import BIN, ROOT, cli, free_port, logs

PROBLEM = "application/problem+json"


def problem(status: int, code: str, message: str = "nope", **headers: str) -> httpx.Response:
    return httpx.Response(status, json={"status": status, "code": code, "message": message, "detail": message},
                          headers={"Content-Type": PROBLEM, **headers})


def mock_client(handler, **kwargs) -> tuple[Client, list[float]]:
    client = Client("http://mp.test", "mp_key", transport=httpx.MockTransport(handler), backoff_s=0.1, **kwargs)
    sleeps: list[float] = []
    client._sleep = sleeps.append
    return client, sleeps


# --- unit: retries and typed errors ------------------------------------------------------------------

def test_the_client_imports_no_torch_numpy_or_service_code():
    code = ("import sys, app.client; heavy = ('torch', 'onnx', 'onnxruntime', 'numpy', 'sqlalchemy', 'celery', "
            "'fastapi'); print([m for m in sys.modules if m.split('.')[0] in heavy or "
            "(m.startswith('app.') and not m.startswith('app.client'))])")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_503_is_retried_with_growing_backoff_then_succeeds():
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if len(calls) < 3:
            return problem(503, "broker_unavailable", "queue down")
        return httpx.Response(200, json=[{"id": "quantize.int8_dynamic"}])

    client, sleeps = mock_client(handler)
    assert client.methods() == [{"id": "quantize.int8_dynamic"}]
    assert len(calls) == 3
    assert len(sleeps) == 2 and sleeps[1] > sleeps[0] >= 0.1
    assert calls[0].headers["authorization"] == "Bearer mp_key"


def test_503_gives_up_after_the_retries_with_the_server_code():
    calls = []
    client, sleeps = mock_client(lambda r: calls.append(r) or problem(503, "broker_unavailable", "queue down"),
                                 retries=2)
    with pytest.raises(ServerError) as info:
        client.job("j1")
    assert (info.value.status, info.value.code, info.value.message) == (503, "broker_unavailable", "queue down")
    assert len(calls) == 3 and len(sleeps) == 2


def test_429_waits_as_long_as_retry_after_says():
    answers = [problem(429, "rate_limited", **{"Retry-After": "7"}), httpx.Response(200, json={"id": "j1"})]
    client, sleeps = mock_client(lambda r: answers.pop(0))
    assert client.job("j1") == {"id": "j1"}
    assert sleeps == [7.0]
    client, _ = mock_client(lambda r: problem(429, "rate_limited"), retries=1)
    with pytest.raises(RateLimited):
        client.job("j1")


@pytest.mark.parametrize(("status", "code", "error"), [
    (404, "job_not_found", NotFound), (422, "unknown_method", InvalidRequest), (401, "unauthorized", Unauthorized),
    (409, "job_not_cancellable", Conflict),
])
def test_other_4xx_are_never_retried_and_carry_their_code(status, code, error):
    calls = []
    client, sleeps = mock_client(lambda r: calls.append(r) or problem(status, code, "why"))
    with pytest.raises(error) as info:
        client.job("j1")
    assert (info.value.status, info.value.code, info.value.message) == (status, code, "why")
    assert info.value.body["code"] == code
    assert len(calls) == 1 and sleeps == []


def test_connection_errors_are_retried():
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if len(calls) < 3:
            raise httpx.ConnectError("connection refused", request=request)
        return httpx.Response(200, json={"id": "j1", "status": "queued"})

    client, sleeps = mock_client(handler)
    assert client.job("j1")["id"] == "j1"
    assert len(calls) == 3 and len(sleeps) == 2


def test_a_refused_port_ends_in_unreachable_after_the_retries():
    client = Client(f"http://127.0.0.1:{free_port()}", "mp_key", retries=2, backoff_s=0.01)
    with pytest.raises(Unreachable) as info:
        client.methods()
    assert info.value.status is None and info.value.code == "unreachable"


def test_an_upload_is_retried_only_when_it_cannot_have_reached_the_server(tmp_path):
    model = tmp_path / "m.onnx"
    model.write_bytes(b"onnx bytes")
    calls = []

    def lost_answer(request: httpx.Request) -> httpx.Response:
        calls.append(request.read())
        raise httpx.ReadTimeout("no answer", request=request)

    client, _ = mock_client(lost_answer)
    with pytest.raises(Unreachable):
        client.upload_model(model)
    assert len(calls) == 1  # the server may have stored it: a retry could record the model twice

    calls.clear()

    def refused_then_ok(request: httpx.Request) -> httpx.Response:
        calls.append((request.read(), request.headers["x-filename"], request.headers["content-length"]))
        if len(calls) == 1:
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(201, json={"id": "m1"})

    client, _ = mock_client(refused_then_ok)
    assert client.upload_model(model) == {"id": "m1"}
    assert calls == [(b"onnx bytes", "m.onnx", "10")] * 2  # the file was reopened for the retry


def test_a_submission_is_retried_with_the_same_idempotency_key():
    keys = []

    def handler(request: httpx.Request) -> httpx.Response:
        keys.append(request.headers["idempotency-key"])
        if len(keys) == 1:
            raise httpx.ReadTimeout("no answer", request=request)
        return httpx.Response(202, json={"id": "j1", **json.loads(request.content)})

    client, _ = mock_client(handler)
    job = client.submit_job("m1", steps=["quantize.int8_dynamic"])
    assert job["steps"] == [{"method": "quantize.int8_dynamic", "params": {}}]
    assert len(keys) == 2 and keys[0] == keys[1] and len(keys[0]) == 36


def test_optimize_sends_a_goal_and_a_model_alone_sends_no_steps():
    sent = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(json.loads(request.content))
        return httpx.Response(202, json={"id": "j1"})

    client, _ = mock_client(handler)
    client.optimize("m1", objective="size", min_cosine=None, max_accuracy_drop=1.0, families=["quantize"],
                    datasets={"eval_dataset_id": "d1"}, name="smaller")
    client.optimize("m1")
    client.submit_job("m1")
    assert sent == [
        {"model_id": "m1", "name": "smaller", "goal": {"objective": "size", "min_cosine": None, "max_accuracy_drop": 1.0,
                                                      "families": ["quantize"], "datasets": {"eval_dataset_id": "d1"}}},
        {"model_id": "m1", "goal": {}},  # the default goal, said explicitly
        {"model_id": "m1"},  # the server runs the default goal
    ]


def test_wait_revalidates_with_the_etag_and_reports_only_changes():
    states = [({"id": "j1", "status": "running", "progress": 0.4, "message": "quantizing"}, '"a"'), (None, '"a"'),
              ({"id": "j1", "status": "succeeded", "progress": 1.0, "message": "done"}, '"b"')]
    sent = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request.headers.get("if-none-match"))
        job, etag = states.pop(0)
        return httpx.Response(304 if job is None else 200, json=job, headers={"ETag": etag})

    client, sleeps = mock_client(handler)
    seen = []
    assert client.wait("j1", on_progress=seen.append, poll_s=0.5)["status"] == "succeeded"
    assert sent == [None, '"a"', '"a"'] and [j["progress"] for j in seen] == [0.4, 1.0] and sleeps == [0.5, 0.5]
    running = {"id": "j1", "status": "running", "progress": 0.4, "message": ""}
    client, _ = mock_client(lambda r: httpx.Response(200, json=running))
    with pytest.raises(TimeoutError, match="running at 40%"):
        client.wait("j1", poll_s=0.01, timeout_s=0.05)


def test_a_download_whose_sha256_differs_leaves_nothing(tmp_path):
    client, _ = mock_client(lambda r: httpx.Response(200, content=b"tampered", headers={
        "X-Content-SHA256": hashlib.sha256(b"original").hexdigest()}))
    with pytest.raises(ChecksumMismatch):
        client.download("j1", dest=tmp_path / "out.onnx")
    assert list(tmp_path.iterdir()) == []


def test_the_summary_table_reads_accuracy_intervals_and_skipped_sizes():
    from app.cli import summary_rows

    rows = dict(summary_rows({
        "original_size_bytes": 4_000_000, "compressed_size_bytes": 1_000_000, "size_ratio": 0.25,
        "speedup": {"1": 1.83}, "speedup_ci": {"1": "1.83x (1.79-1.88)"}, "noisy_batch_sizes": [1],
        "latency_p50_ms": {"1": {"original": 2.0, "compressed": 1.09}},
        "accuracy": {"samples": 397, "original_top1": 0.975, "compressed_top1": 0.972, "top1_drop_points": 0.3},
        "fidelity": {"cosine_similarity": 0.99991, "top1_agreement": 0.99}, "fidelity_on": "dataset eval.npz",
        "energy_j_per_inference": None, "energy_note": "no RAPL counter",
        "skipped_batch_sizes": [{"batch_size": 8, "reason": "input 'images' has a fixed batch of 1"}],
        "notes": ["[bold]not markup[/bold]"],
        "verdict": {"verdict": "not_beneficial", "reason": "top-1 dropped 2.40 points > 1 (97.50% -> 95.10%)"},
    }))
    assert next(iter(rows)) == "verdict"  # the table leads with it
    assert rows["verdict"] == "not beneficial: top-1 dropped 2.40 points > 1 (97.50% -> 95.10%)"
    assert rows["size"] == "4.00 MB -> 1.00 MB (x0.25)"
    assert rows["speedup, batch 1"].startswith("1.83x (1.79-1.88)   p50 2.000 -> 1.090 ms") and "noisy" in rows[
        "speedup, batch 1"]
    assert rows["accuracy (top-1)"] == "97.50% -> 97.20% (-0.30 points, 397 samples)"
    assert rows["fidelity"] == "cosine 0.9999, top-1 agreement 99.0% (on dataset eval.npz)"
    assert rows["energy"] == "not measured: no RAPL counter"
    assert "fixed batch" in rows["skipped, batch 8"] and rows["note"] == "[bold]not markup[/bold]"


def test_the_pareto_table_marks_the_front_and_names_who_dominates():
    from rich.console import Console

    from app.cli import pareto_table

    assert pareto_table({"summary": {}}) is None  # a report written before fronts
    table = pareto_table({"summary": {"verdict": {"budget": {"batch_size": 8}}}, "pareto": [
        {"name": "original", "p50_ms": 2.0, "size_bytes": 4_000_000, "worst_cosine": 1.0, "energy_j": None,
         "on_front": True, "dominated_by": []},
        {"name": "step 1 (quantize.int8_dynamic)", "p50_ms": 9.5, "size_bytes": 4_100_000, "worst_cosine": 0.8,
         "energy_j": None, "on_front": False, "dominated_by": ["original"]}]})
    console = Console(width=160, record=True)
    console.print(table)
    text = console.export_text()
    assert "p50 ms @8" in text and "energy" not in text  # no column for a dimension never measured
    assert "on the front" in text and "dominated by original" in text and "0.8000" in text


def test_a_goal_job_with_nothing_handed_over_leads_with_the_verdict_and_names_the_closest():
    from rich.console import Console

    from app.cli import candidates_table, goal_rows

    measured = {"speedup": {"4": 0.9}, "speedup_ci": {"4": "0.90x (0.85-0.97)"}, "size_ratio": 0.27,
                "fidelity": {"worst_cosine": 0.9991}}
    report = {
        "summary": {"verdict": {"verdict": "not_beneficial", "reason": "no candidate met the goal; the closest was "
                                "int8_dynamic: not faster"}},
        "search": {"goal": {"objective": "latency", "batch_size": 4, "min_cosine": 0.99, "time_budget_s": 60,
                            "families": ["quantize"], "datasets": {"eval_dataset_id": "d1"}},
                   "chosen": None, "best_in_search": None, "closest": "int8_dynamic", "result_artifact": None,
                   "elapsed_s": 41.5, "time_budget_s": 60, "candidates": {"measured": 1, "failed": 1, "skipped": 1}},
        "candidates": [
            {"name": "int8_dynamic", "family": "quantize", "status": "measured", "summary": measured,
             "artifact": "candidate-01-int8_dynamic.onnx",
             "verdict": {"verdict": "not_beneficial", "reason": "not faster: 0.90x (0.85-0.97) at batch 4"}},
            {"name": "int8_static", "family": "quantize", "status": "failed", "artifact": None, "verdict": None,
             "error": {"code": "calibration_failed", "message": "no samples"}},
            {"name": "fp16", "family": "quantize", "status": "skipped", "artifact": None, "verdict": None,
             "error": {"code": "time_budget", "message": "not started: the time budget (60 s) would not hold it"}},
        ],
    }
    rows = goal_rows(report)
    assert rows[0] == ("verdict", "not beneficial: no candidate met the goal; the closest was int8_dynamic: not faster")
    what = dict(rows)
    assert what["result"] == ("nothing handed over: no candidate met the goal; the closest was int8_dynamic "
                              "(candidate-01-int8_dynamic.onnx)")
    assert what["search"] == "3 candidates (1 measured, 1 failed, 1 skipped) in 41.5 s of the 60 s budget"
    assert what["goal"] == ("latency at batch 4; worst cosine >= 0.99; time budget 60 s; families: quantize; "
                            "datasets: eval d1")
    console = Console(width=200, record=True)
    console.print(candidates_table(report))
    text = console.export_text()
    assert "speedup @4" in text and "int8_dynamic (closest)" in text and "0.90x (0.85-0.97)" in text
    assert "0.9991" in text and "x0.27" in text and "candidate-01-int8_dynamic.onnx" in text
    assert "calibration_failed: no samples" in text and "time_budget: not started" in text
    assert candidates_table({"summary": {}}) is None  # a steps job's report


# --- against a real embedded service --------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_job(service):
    """One int8 job run through the client, shared by the tests that read a finished job."""
    seen: list[dict] = []
    with Client(service["url"], service["key"]) as mp:
        model = mp.upload_model(mlp_onnx_bytes(), filename="mlp.onnx")
        job = mp.submit_job(model["id"], steps=[{"method": "quantize.int8_dynamic", "params": {}}],
                            evaluate={"batch_sizes": [1], "warmup": 2, "iterations": 10})
        done = mp.wait(job["id"], on_progress=seen.append, poll_s=0.2, timeout_s=180)
    if done["status"] != "succeeded":
        print(logs(service["tmp"]))
    return {"model": model, "job": done, "seen": seen}


@pytest.mark.integration
def test_client_compresses_waits_with_progress_and_downloads_checked(service, finished_job, tmp_path):
    job, seen = finished_job["job"], finished_job["seen"]
    assert job["status"] == "succeeded", job
    progress = [j["progress"] for j in seen]
    assert progress == sorted(progress) and progress[-1] == 1.0 and len(set(progress)) >= 2, progress
    assert seen[-1] == job
    with Client(service["url"], service["key"]) as mp:
        saved = mp.download(job["id"], dest=tmp_path)
        assert saved == tmp_path / "model.onnx"
        artifacts = {a["name"]: a for a in mp.artifacts(job["id"])}
        assert hashlib.sha256(saved.read_bytes()).hexdigest() == artifacts["model.onnx"]["sha256"]
        assert saved.stat().st_size < len(mlp_onnx_bytes())
        assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]  # no temporary file left
        assert mp.report(job["id"])["summary"] == job["summary"]
        assert mp.events(job["id"])[-1]["status"] == "succeeded"
        # The same bytes again: stored once on the server (same sha256).
        again = mp.upload_model(mlp_onnx_bytes(), filename="mlp.onnx")
        assert again["sha256"] == finished_job["model"]["sha256"]
        # Pages are followed: one job per page gives the same list.
        assert [j["id"] for j in mp.iter_jobs(page_size=1)] == [j["id"] for j in mp.jobs(limit=None)]


@pytest.mark.integration
def test_client_errors_are_typed_with_the_server_code(service, finished_job):
    with Client(service["url"], service["key"]) as mp:
        with pytest.raises(NotFound) as missing:
            mp.job("no-such-job")
        assert missing.value.code == "job_not_found" and missing.value.status == 404
        with pytest.raises(InvalidRequest) as bad:
            mp.submit_job(finished_job["model"]["id"], steps=["quantize.no_such_method"])
        assert bad.value.code == "unknown_method" and "no_such_method" in bad.value.message
        with pytest.raises(Conflict) as finished:
            mp.cancel(finished_job["job"]["id"])
        assert finished.value.code == "job_not_cancellable"
    with Client(service["url"], "mp_wrong") as intruder, pytest.raises(Unauthorized):
        intruder.jobs()


@pytest.mark.integration
def test_cli_compress_waits_prints_the_summary_and_saves(service, tmp_path):
    model = tmp_path / "mlp.onnx"
    model.write_bytes(mlp_onnx_bytes())
    out = tmp_path / "out.onnx"
    done = cli(service, "compress", str(model), "--method", "quantize.int8_dynamic", "--param", "per_channel=false",
               "--batch-sizes", "1,2", "--warmup", "2", "--iterations", "10", "--wait", "-o", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    assert out.is_file() and out.stat().st_size < model.stat().st_size
    assert "size" in done.stdout and "speedup, batch 1" in done.stdout and "speedup, batch 2" in done.stdout
    assert "fidelity" in done.stdout and "cosine" in done.stdout
    assert "beneficial: " in done.stdout and "Pareto front" in done.stdout and "original" in done.stdout
    job_id = done.stderr.split(" job ", 1)[1].split()[0]

    shown = cli(service, "jobs", "show", job_id, "--json")
    assert shown.returncode == 0, shown.stderr
    job = json.loads(shown.stdout)
    assert job["status"] == "succeeded" and job["steps"][0]["params"]["per_channel"] is False
    for batch in ("1", "2"):  # the table shows the interval the summary holds, e.g. 1.83x (1.79-1.88)
        assert job["summary"]["speedup_ci"][batch] in done.stdout
    listed = cli(service, "jobs", "list")
    assert listed.returncode == 0 and job_id in listed.stdout
    again = tmp_path / "again.onnx"
    fetched = cli(service, "download", job_id, "-o", str(again))
    assert fetched.returncode == 0 and again.read_bytes() == out.read_bytes()
    methods = cli(service, "methods")
    assert methods.returncode == 0 and "quantize.int8_dynamic" in methods.stdout


@pytest.mark.integration
def test_cli_exit_codes_for_a_failed_job_usage_errors_and_server_errors(service, tmp_path):
    model = tmp_path / "mlp.onnx"
    model.write_bytes(mlp_onnx_bytes())
    failed = cli(service, "compress", str(model), "--method", "quantize.int8_dynamic",
                 "--param", 'nodes_to_exclude=["no_such_node"]', "--wait")
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "failed: unknown_node:" in failed.stderr and "no_such_node" in failed.stderr

    usage = cli(service, "compress", str(model), "--method", "quantize.int8_dynamic", "--param", "oops")
    assert usage.returncode == 2 and "KEY=VALUE" in usage.stderr
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELPRESS_")}
    no_key = subprocess.run([str(BIN / "modelpress"), "jobs", "list"], env=env, capture_output=True, text=True)
    assert no_key.returncode == 2 and "API key" in no_key.stderr
    unreadable = cli(service, "compress", str(tmp_path / "absent.onnx"), "--method", "quantize.int8_dynamic")
    assert unreadable.returncode == 2 and "absent.onnx" in unreadable.stderr

    refused = cli(service, "compress", str(model), "--method", "quantize.no_such_method")
    assert refused.returncode == 1 and "unknown_method" in refused.stderr
    missing = cli(service, "jobs", "show", "no-such-job")
    assert missing.returncode == 1 and "job_not_found" in missing.stderr


@pytest.mark.integration
def test_cli_optimize_leads_with_the_verdict_lists_the_candidates_and_saves_what_was_handed_over(service, tmp_path):
    import numpy as np

    # Wide enough that int8 usually runs faster than float on a CPU: the model is most often handed over.
    model = tmp_path / "wide.onnx"
    model.write_bytes(mlp_onnx_bytes(in_features=512, hidden=2048))
    evaluation = tmp_path / "eval.npz"
    np.savez(evaluation, features=np.random.default_rng(0).standard_normal((32, 512)).astype(np.float32))
    out = tmp_path / "out"
    done = cli(service, "optimize", str(model), "--time-budget", "60", "--families", "quantize",
               "--eval-dataset", str(evaluation), "--wait", "-o", f"{out}/")
    assert done.returncode == 0, done.stdout + done.stderr  # 0 whatever the verdict
    assert "uploaded eval.npz as the eval dataset" in done.stderr
    job_id = done.stderr.split(" job ", 1)[1].split()[0]
    job = json.loads(cli(service, "jobs", "show", job_id, "--json").stdout)
    assert job["status"] == "succeeded" and job["steps"] == []
    assert job["goal"]["families"] == ["quantize"] and job["goal"]["time_budget_s"] == 60
    assert job["goal"]["datasets"]["eval_dataset_id"]
    with Client(service["url"], service["key"]) as mp:
        report = mp.report(job_id)
        artifacts = {a["name"]: a for a in mp.artifacts(job_id)}
    verdict, search = report["verdict"], report["search"]
    # The verdict and its reason lead; then the candidates, each with its interval; then the front.
    lead = done.stdout.split("\n")[:3]
    assert any("verdict" in line and verdict["verdict"].replace("_", " ") in line for line in lead), lead
    assert done.stdout.index("verdict") < done.stdout.index("candidates") < done.stdout.index("Pareto front")
    for candidate in report["candidates"]:
        assert candidate["name"] in done.stdout
        if candidate["status"] == "measured":
            assert candidate["summary"]["speedup_ci"]["1"] in done.stdout
    assert "of the 60 s budget" in done.stdout
    if search["result_artifact"]:
        saved = out / search["result_artifact"]
        assert hashlib.sha256(saved.read_bytes()).hexdigest() == artifacts[search["result_artifact"]]["sha256"]
        assert f"saved the chosen model ({search['chosen']}" in done.stderr
    else:
        assert verdict["verdict"] == "not_beneficial" and not out.exists()
        assert "nothing saved" in done.stderr and search["closest"] in done.stderr

    # A goal without a fidelity budget is refused by the server, with its reason.
    refused = cli(service, "optimize", str(model), "--no-min-cosine")
    assert refused.returncode == 1 and "fidelity budget" in refused.stderr
    usage = cli(service, "optimize", str(model), "--eval-dataset", str(tmp_path / "absent.npz"))
    assert usage.returncode == 2 and "absent.npz" in usage.stderr
