"""`modelpress mcp`: ModelPress as MCP tools over stdio, for agents (the official MCP Python SDK's MCPServer).

A thin layer over the Python client (app.client): each tool is one or two REST calls with the key and URL the
other client commands use, so the service checks and authorizes everything exactly as it does for REST. A REST
error comes back as a tool error (isError) whose text and structured content are the REST API's problem body: the
same `code`, `message` and `status` (401 `invalid_api_key` for a wrong or revoked key, 422 `unknown_method`, ...).
Errors found on this side before any request carry a code of their own and `status: null`:
`file_not_found`, `destination_exists`, `destination_unwritable`; `unreachable` when the service does not answer.

Files are read and written on the machine this server runs on, with its user's rights: upload tools take a
local path, download_artifact a destination path (never overwritten unless asked).

The `mcp` package is imported here only, so that app.client and the other commands stay light.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from mcp.server.mcpserver import MCPServer
from mcp.types import CallToolResult, TextContent, ToolAnnotations
from pydantic import Field

from app.client import Client, ModelPressError

FILE_NOT_FOUND = "file_not_found"
DESTINATION_EXISTS = "destination_exists"
DESTINATION_UNWRITABLE = "destination_unwritable"

INSTRUCTIONS = """ModelPress compresses ONNX models (quantize, prune, distill) and measures the result against the \
original (size, latency with intervals, fidelity, accuracy).
Typical flow: upload_model(path) -> submit_job(model_id, steps=[...]) or optimize(model_id, goal={...}) -> poll \
job_status(job_id) until status is succeeded, failed or cancelled -> job_report(job_id) -> \
download_artifact(job_id, dest). list_methods gives the method ids and their params' JSON Schemas.
A failed call returns {"code", "message", "status"}: the REST API's error, with the same codes."""

JobId = Annotated[str, Field(description="A job id, as submit_job, optimize or list_jobs return it.")]
LocalPath = Annotated[str, Field(description="A file on this machine (absolute, or relative to the server's "
                                             "working directory; ~ is expanded).")]
Evaluate = Annotated[dict[str, Any] | None, Field(description=(
    "How to measure (the REST API's `evaluate`): batch_sizes, warmup, iterations, eval_dataset_id, input_shapes, "
    "...; the server's defaults if absent."))]
READ_ONLY = ToolAnnotations(read_only_hint=True, destructive_hint=False, open_world_hint=False)
CREATES = ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=False, open_world_hint=False)


def _ok(value: Any) -> CallToolResult:
    """A tool's answer: the REST API's JSON, as text and as structured content (an object; a list is wrapped)."""
    structured = value if isinstance(value, dict) else {"result": value}
    return CallToolResult(content=[TextContent(type="text", text=json.dumps(value, default=str))],
                          structured_content=structured)


def _failed(code: str, message: str, status: int | None = None, body: Any = None) -> CallToolResult:
    """A tool error carrying the REST API's problem body as it came (its code, message and status included)."""
    problem = {"code": code, "message": message, "status": status, **(body if isinstance(body, dict) else {})}
    return CallToolResult(content=[TextContent(type="text", text=json.dumps(problem, default=str))],
                          structured_content=problem, is_error=True)


def _local(path: str) -> Path:
    return Path(path).expanduser().absolute()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def build_server(client: Client) -> MCPServer:
    """The MCP server whose tools call the service through `client`."""
    server = MCPServer(name="modelpress", instructions=INSTRUCTIONS, log_level="WARNING")

    def call(request, *args: Any, **kwargs: Any) -> CallToolResult:
        """One client call, its answer or its error as the tool's result."""
        try:
            return _ok(request(*args, **kwargs))
        except ModelPressError as exc:
            return _failed(exc.code, exc.message, exc.status, exc.body)

    def upload(request, path: str) -> CallToolResult:
        file = _local(path)
        if not file.is_file():
            return _failed(FILE_NOT_FOUND, f"{file} is not a file on the machine the MCP server runs on")
        return call(request, file)

    @server.tool(annotations=CREATES)
    def upload_model(path: LocalPath) -> CallToolResult:
        """Upload a model file: .onnx, or a .zip of an .onnx with its external-data files. Returns the model (its
        id, sha256, inputs and outputs)."""
        return upload(client.upload_model, path)

    @server.tool(annotations=CREATES)
    def upload_dataset(path: LocalPath) -> CallToolResult:
        """Upload a dataset file: .npz or .safetensors, arrays named after the model's inputs plus optional
        `labels`. Returns the dataset (its id, arrays and shapes)."""
        return upload(client.upload_dataset, path)

    @server.tool(annotations=READ_ONLY)
    def list_methods() -> CallToolResult:
        """The compression methods: their ids (for submit_job's steps) and their params' JSON Schemas."""
        return call(client.methods)

    @server.tool(annotations=CREATES)
    def submit_job(
        model_id: Annotated[str, Field(description="The id upload_model returned.")],
        steps: Annotated[list[str | dict[str, Any]] | None, Field(description=(
            'The methods to run in order: method ids ("quantize.int8_dynamic") or {"method": id, "params": {...}}.'
        ))] = None,
        recipe: Annotated[str | None, Field(description="A recipe id instead of steps.")] = None,
        params: Annotated[dict[str, Any] | None, Field(description="The recipe's params.")] = None,
        evaluate: Evaluate = None,
        name: Annotated[str | None, Field(description="A name for the job.")] = None,
        target: Annotated[dict[str, Any] | None, Field(description=(
            'Where the result is built for and measured, e.g. {"runtime": "openvino", "device": "cpu"}.'))] = None,
    ) -> CallToolResult:
        """Start a compression job on an uploaded model (POST /v1/jobs): steps, or a recipe with its params.
        Returns the queued job; follow it with job_status."""
        return call(client.submit_job, model_id, steps=steps, recipe=recipe, params=params, evaluate=evaluate,
                    name=name, target=target)

    @server.tool(annotations=CREATES)
    def optimize(
        model_id: Annotated[str, Field(description="The id upload_model returned.")],
        goal: Annotated[dict[str, Any] | None, Field(description=(
            "The REST API's goal: objective (latency, size, energy), batch_size, min_cosine, max_accuracy_drop, "
            "max_latency_ms, max_size_bytes, min_speedup, time_budget_s, families, datasets. Absent: fastest at "
            "batch 1 within cosine 0.99."))] = None,
        evaluate: Evaluate = None,
        name: Annotated[str | None, Field(description="A name for the job.")] = None,
    ) -> CallToolResult:
        """Start a goal job: the search finds the best model that meets the goal, or the evidence that none does.
        Returns the queued job; when it has finished, job_report's `search` names the artifact handed over."""
        return call(client.submit_job, model_id, goal=goal or {}, evaluate=evaluate, name=name)

    @server.tool(annotations=READ_ONLY)
    def job_status(job_id: JobId) -> CallToolResult:
        """The job: status (queued, running, succeeded, failed, cancelled), progress, stage, message, error, and
        the measured summary once it has finished."""
        return call(client.job, job_id)

    @server.tool(annotations=READ_ONLY)
    def job_report(job_id: JobId) -> CallToolResult:
        """The finished job's report: steps, measurements, verdict (and a goal job's candidates and search)."""
        return call(client.report, job_id)

    @server.tool(annotations=READ_ONLY)
    def list_jobs(
        status: Annotated[Literal["queued", "running", "succeeded", "failed", "cancelled"] | None,
                          Field(description="Only jobs in this status.")] = None,
        limit: Annotated[int, Field(ge=1, le=1000, description="At most this many jobs.")] = 20,
    ) -> CallToolResult:
        """The caller's jobs, newest first."""
        return call(client.jobs, status=status, limit=limit)

    @server.tool(annotations=ToolAnnotations(read_only_hint=False, destructive_hint=True, idempotent_hint=False,
                                             open_world_hint=False))
    def cancel_job(job_id: JobId) -> CallToolResult:
        """Cancel a queued job, or stop a running one at its next step boundary (409 job_not_cancellable once it
        has finished)."""
        return call(client.cancel, job_id)

    @server.tool(annotations=READ_ONLY)
    def list_artifacts(job_id: JobId) -> CallToolResult:
        """The job's artifacts (model.onnx, report.json, ...): name, kind, size_bytes, sha256."""
        return call(client.artifacts, job_id)

    @server.tool(annotations=ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=True,
                                             open_world_hint=False))
    def download_artifact(
        job_id: JobId,
        dest: Annotated[str, Field(description=(
            "A file path on this machine, or a folder to put `name` in (an existing one, or a path ending in /)."))],
        name: Annotated[str, Field(description="The artifact's name (list_artifacts).")] = "model.onnx",
        overwrite: Annotated[bool, Field(description="Replace a file already at dest.")] = False,
    ) -> CallToolResult:
        """Download an artifact to dest. Its bytes are checked against the server's sha256 before the file appears;
        returns the path written, its size and sha256."""
        target = _local(dest)
        if target.is_dir() or dest.endswith(("/", os.sep)):  # a folder, or one to make: `name` goes inside
            target = target / name
        if target.exists() and not overwrite:
            return _failed(DESTINATION_EXISTS, f"{target} exists; pass overwrite=true to replace it")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            return _failed(DESTINATION_UNWRITABLE, f"cannot create {target.parent}: {exc.strerror or exc}")
        try:
            saved = client.download(job_id, name, dest=target)
        except ModelPressError as exc:
            return _failed(exc.code, exc.message, exc.status, exc.body)
        except OSError as exc:  # the folder is not writable: nothing was written
            return _failed(DESTINATION_UNWRITABLE, f"cannot write {target}: {exc.strerror or exc}")
        return _ok({"job_id": job_id, "name": name, "path": str(saved), "size_bytes": saved.stat().st_size,
                    "sha256": _sha256(saved)})

    return server


def serve(client: Client) -> int:
    """Serve the tools on stdin/stdout until the client closes them."""
    with client:
        build_server(client).run("stdio")
    return 0
