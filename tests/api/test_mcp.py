"""`modelpress mcp` (app.mcp_server), driven by the MCP Python SDK's own stdio client against the real embedded
service (`modelpress run`: API, Celery worker, SQLite), as an agent would: upload, start a job, poll it, read the
report, download the model; and the REST API's error codes, unchanged, when a call is refused.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import httpx
import numpy as np
import pytest

from tests.helpers import npz_bytes
from tests.stack import BIN, ROOT, logs

pytestmark = pytest.mark.integration

TOOLS = {"upload_model", "upload_dataset", "list_methods", "submit_job", "optimize", "job_status", "job_report",
         "list_jobs", "cancel_job", "list_artifacts", "download_artifact"}
FAST = {"batch_sizes": [1], "warmup": 2, "iterations": 10}


def server_env(url: str, key: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELPRESS_")}
    env["MODELPRESS_URL"] = url
    if key is not None:
        env["MODELPRESS_API_KEY"] = key
    return env


@asynccontextmanager
async def mcp_session(url: str, key: str):
    """`modelpress mcp` as a subprocess, connected with the SDK's stdio client; the key comes from the environment,
    as the other client commands read it."""
    from mcp import ClientSession, StdioServerParameters
    from mcp.client.stdio import stdio_client

    params = StdioServerParameters(command=str(BIN / "modelpress"), args=["mcp"], env=server_env(url, key),
                                   cwd=str(ROOT))
    async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        yield session


async def call(session, tool: str, **arguments) -> tuple[bool, object]:
    """(is_error, the answer): the structured content (a list unwrapped from {"result": ...}), which the text
    content says too, as JSON."""
    result = await session.call_tool(tool, arguments)
    answer = result.structured_content
    if not result.is_error and set(answer) == {"result"}:
        answer = answer["result"]
    assert json.loads(result.content[0].text) == answer
    return result.is_error, answer


async def ok(session, tool: str, **arguments):
    failed, answer = await call(session, tool, **arguments)
    assert not failed, answer
    return answer


def test_an_agent_uploads_compresses_follows_reads_and_downloads(service, mlp_onnx, tmp_path):
    model_file, dataset_file = tmp_path / "mlp.onnx", tmp_path / "calibration.npz"
    model_file.write_bytes(mlp_onnx)
    dataset_file.write_bytes(npz_bytes(input=np.zeros((4, 64), np.float32)))
    out = tmp_path / "out"

    async def agent() -> dict:
        async with mcp_session(service["url"], service["key"]) as mp:
            assert {t.name for t in (await mp.list_tools()).tools} == TOOLS
            assert "quantize.int8_dynamic" in {m["id"] for m in await ok(mp, "list_methods")}
            model = await ok(mp, "upload_model", path=str(model_file))
            assert model["sha256"] == hashlib.sha256(mlp_onnx).hexdigest()
            dataset = await ok(mp, "upload_dataset", path=str(dataset_file))
            assert dataset["id"]
            job = await ok(mp, "submit_job", model_id=model["id"], steps=["quantize.int8_dynamic"], evaluate=FAST)
            assert job["status"] == "queued" and job["model_id"] == model["id"]
            deadline = time.monotonic() + 180
            while job["status"] not in ("succeeded", "failed", "cancelled"):
                assert time.monotonic() < deadline, f"job not finished: {job}\n{logs(service['tmp'])}"
                await anyio.sleep(0.3)
                job = await ok(mp, "job_status", job_id=job["id"])
            assert job["status"] == "succeeded", job
            report = await ok(mp, "job_report", job_id=job["id"])
            assert report["summary"] == job["summary"]
            assert job["id"] in [j["id"] for j in await ok(mp, "list_jobs", status="succeeded", limit=50)]
            artifacts = {a["name"]: a for a in await ok(mp, "list_artifacts", job_id=job["id"])}
            saved = await ok(mp, "download_artifact", job_id=job["id"], dest=f"{out}/")  # a folder to make
            again_failed, again = await call(mp, "download_artifact", job_id=job["id"], dest=str(out))
            overwritten = await ok(mp, "download_artifact", job_id=job["id"], dest=str(out / "model.onnx"),
                                   overwrite=True)
            cancelled_failed, cancelled = await call(mp, "cancel_job", job_id=job["id"])
            return {"artifacts": artifacts, "saved": saved, "again": (again_failed, again),
                    "overwritten": overwritten, "cancel": (cancelled_failed, cancelled)}

    seen = anyio.run(agent)
    saved, sha256 = seen["saved"], seen["artifacts"]["model.onnx"]["sha256"]
    assert saved["path"] == str(out / "model.onnx") and saved["sha256"] == sha256
    assert hashlib.sha256(Path(saved["path"]).read_bytes()).hexdigest() == sha256
    assert saved["size_bytes"] == seen["artifacts"]["model.onnx"]["size_bytes"] < len(mlp_onnx)
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx"]  # no temporary file left
    # A file already there is kept unless the call says to replace it.
    assert seen["again"] == (True, {"code": "destination_exists", "status": None,
                                    "message": f"{out / 'model.onnx'} exists; pass overwrite=true to replace it"})
    assert seen["overwritten"]["sha256"] == sha256
    # The REST API's 409, its body unchanged.
    failed, problem = seen["cancel"]
    assert failed and (problem["code"], problem["status"]) == ("job_not_cancellable", 409)


def test_refused_calls_carry_the_rest_api_code_and_leave_nothing(service, mlp_onnx, tmp_path):
    rest = httpx.Client(base_url=service["url"], headers={"Authorization": f"Bearer {service['key']}"}, timeout=30)
    model_id = rest.post("/v1/models", content=mlp_onnx, headers={"Content-Type": "application/octet-stream",
                                                                  "X-Filename": "mlp.onnx"}).json()["id"]
    bad_spec = {"model_id": model_id, "steps": [{"method": "quantize.no_such_method", "params": {}}]}

    def kept() -> tuple[list[str], list[str]]:
        return ([j["id"] for j in rest.get("/v1/jobs", params={"limit": 200}).json()["items"]],
                [m["id"] for m in rest.get("/v1/models", params={"limit": 200}).json()["items"]])

    before = kept()

    async def agent() -> dict:
        seen = {}
        async with mcp_session(service["url"], service["key"]) as mp:
            seen["unknown_method"] = await call(mp, "submit_job", model_id=model_id,
                                                steps=["quantize.no_such_method"])
            seen["bad_params"] = await call(mp, "submit_job", model_id=model_id,
                                            steps=[{"method": "quantize.int8_dynamic", "params": {"nope": 1}}])
            seen["missing_job"] = await call(mp, "job_status", job_id="no-such-job")
            seen["missing_file"] = await call(mp, "upload_model", path=str(tmp_path / "absent.onnx"))
            seen["not_a_model"] = await call(mp, "upload_model", path=str(Path(__file__)))
        async with mcp_session(service["url"], "mp_wrong") as intruder:
            seen["wrong_key"] = await call(intruder, "list_jobs")
        return seen

    seen = anyio.run(agent)
    # Each refusal is the REST API's own problem body: the same code, message and status.
    direct = rest.post("/v1/jobs", json=bad_spec)
    assert seen["unknown_method"] == (True, direct.json())
    assert (direct.status_code, direct.json()["code"]) == (422, "unknown_method")
    failed, problem = seen["bad_params"]
    assert failed and problem["status"] == 422 and problem["code"] in ("invalid_params", "invalid_request"), problem
    failed, problem = seen["missing_job"]
    assert failed and (problem["code"], problem["status"]) == ("job_not_found", 404)
    assert seen["missing_file"] == (True, {
        "code": "file_not_found", "status": None,
        "message": f"{tmp_path / 'absent.onnx'} is not a file on the machine the MCP server runs on"})
    direct = rest.post("/v1/models", content=Path(__file__).read_bytes(),
                       headers={"Content-Type": "application/octet-stream", "X-Filename": Path(__file__).name})
    assert direct.status_code in (415, 422) and seen["not_a_model"] == (True, direct.json())
    wrong = httpx.get(f"{service['url']}/v1/jobs", params={"limit": 20},
                      headers={"Authorization": "Bearer mp_wrong"}, timeout=30)
    assert wrong.status_code == 401 and seen["wrong_key"] == (True, wrong.json())
    assert seen["wrong_key"][1]["code"] == "invalid_api_key"
    # Nothing was kept: no job, no model from the refused calls.
    assert kept() == before


def test_without_a_key_the_server_refuses_to_start_and_rest_answers_unauthorized(service):
    started = subprocess.run([str(BIN / "modelpress"), "mcp"], env=server_env(service["url"], None), cwd=ROOT,
                             stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert started.returncode == 2 and started.stdout == ""
    assert "no API key: pass --key or set MODELPRESS_API_KEY" in started.stderr
    # What the service answers a call without a key, which the MCP server never makes.
    missing = httpx.get(f"{service['url']}/v1/jobs", timeout=30)
    assert (missing.status_code, missing.json()["code"]) == (401, "unauthorized")
