"""A Python client for the ModelPress API, on httpx alone (no torch, numpy or app internals).

    from app.client import Client
    with Client("http://127.0.0.1:8000", key) as mp:
        model = mp.upload_model("model.onnx")
        job = mp.submit_job(model["id"], steps=["quantize.int8_dynamic"])
        done = mp.wait(job["id"], on_progress=lambda j: print(j["progress"], j["message"]))
        mp.download(done["id"], dest="model.int8.onnx")

Retries: connection errors, 503 and 429 (after Retry-After) are retried with exponential backoff,
other 4xx never. A request that could create something twice is retried only when it certainly did
not reach the server: uploads (the server stores the bytes once per sha256 but records a new model
row per upload) and cancel. Job submissions carry an Idempotency-Key, so they are retried like GETs.
"""
from __future__ import annotations

import email.utils
import hashlib
import os
import random
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import httpx

__all__ = [
    "ChecksumMismatch", "Client", "Conflict", "InvalidRequest", "ModelPressError", "NotFound", "RateLimited",
    "ServerError", "Unauthorized", "Unreachable",
]

TERMINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})
USER_AGENT = "modelpress-client/0.1"
CHUNK_BYTES = 1 << 20
MAX_RETRY_AFTER_S = 120.0


class ModelPressError(Exception):
    """An error answered by the server (RFC 9457 problem+json), or the service being out of reach."""

    def __init__(self, status: int | None, code: str, message: str, body: Any = None) -> None:
        super().__init__(f"{code}: {message}" if status is None else f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.body = body


class InvalidRequest(ModelPressError):
    """422: the request is well-formed but refused (bad params, unknown method, dataset mismatch, ...)."""


class Unauthorized(ModelPressError):
    """401: missing, unknown or revoked API key."""


class NotFound(ModelPressError):
    """404: no such object for this key's tenant (another tenant's objects answer 404 too)."""


class Conflict(ModelPressError):
    """409: the object's state forbids it (a finished job cannot be cancelled, a report not ready yet)."""


class RateLimited(ModelPressError):
    """429 after the retries ran out."""


class ServerError(ModelPressError):
    """5xx (after the retries ran out for 503)."""


class Unreachable(ModelPressError):
    """No answer: connection refused, DNS, timeouts, after the retries ran out. status is None."""


class ChecksumMismatch(ModelPressError):
    """A download whose bytes do not hash to the server's X-Content-SHA256; nothing was written."""


_BY_STATUS: dict[int, type[ModelPressError]] = {
    401: Unauthorized, 404: NotFound, 409: Conflict, 422: InvalidRequest, 429: RateLimited,
}


def error_from_response(response: httpx.Response) -> ModelPressError:
    """The typed error for a non-2xx answer, from its problem JSON (or its text when it has none)."""
    status = response.status_code
    try:
        body: Any = response.json()
    except ValueError:
        body = response.text
    if isinstance(body, dict):
        code = str(body.get("code") or f"http_{status}")
        message = str(body.get("message") or body.get("detail") or body.get("title") or response.reason_phrase)
    else:
        code, message = f"http_{status}", (str(body).strip()[:500] or response.reason_phrase)
    cls = _BY_STATUS.get(status) or (ServerError if status >= 500 else ModelPressError)
    return cls(status, code, message, body)


def _retry_after_s(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


# Failures where the request never reached the server: safe to retry even a non-idempotent POST.
_UNSENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


class Client:
    """ModelPress over HTTP. Every method returns the server's JSON as plain dicts and lists."""

    def __init__(self, url: str, key: str, *, timeout: float = 60.0, retries: int = 3, backoff_s: float = 0.5,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.url = url.rstrip("/")
        self.retries = retries
        self.backoff_s = backoff_s
        self._sleep: Callable[[float], None] = time.sleep  # replaceable in tests
        self._http = httpx.Client(
            base_url=self.url, timeout=timeout, transport=transport,
            headers={"Authorization": f"Bearer {key}", "User-Agent": USER_AGENT, "Accept": "application/json"},
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- transport: one place for retries and errors ------------------------------------------------

    def _delay(self, attempt: int, response: httpx.Response | None = None) -> float:
        if response is not None:
            after = _retry_after_s(response)
            if after is not None:
                return min(after, MAX_RETRY_AFTER_S)
        base = self.backoff_s * (2 ** attempt)
        return base + random.uniform(0, base / 4)

    def _request(self, method: str, path: str, *, repeatable: bool = True, stream: bool = False,
                 content: Callable[[], Any] | None = None, ok: tuple[int, ...] = (), **kwargs: Any) -> httpx.Response:
        """Send with retries. repeatable=False: retry only failures where the request was certainly not
        received (connect errors, 503, 429). content: a factory, called per attempt (a file reopened)."""
        attempt = 0
        while True:
            body = content() if content is not None else None
            try:
                request = self._http.build_request(method, path, content=body, **kwargs)
                response = self._http.send(request, stream=stream)
            except httpx.TransportError as exc:
                retryable = repeatable or isinstance(exc, _UNSENT)
                if not retryable or attempt >= self.retries:
                    raise Unreachable(None, "unreachable", f"{method} {self.url}{path}: {exc!r}"[:500]) from exc
                self._sleep(self._delay(attempt))
                attempt += 1
                continue
            finally:
                close = getattr(body, "close", None)
                if close is not None:
                    close()
            if response.is_success or response.status_code in ok:
                return response
            if response.status_code in (429, 503) and attempt < self.retries:
                response.close()
                self._sleep(self._delay(attempt, response))
                attempt += 1
                continue
            if stream:
                response.read()
            raise error_from_response(response)

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._request(method, path, **kwargs).json()

    # --- uploads ---------------------------------------------------------------------------------

    def _upload(self, path: str, source: str | os.PathLike | bytes, filename: str | None) -> dict:
        if isinstance(source, (bytes, bytearray, memoryview)):
            data = bytes(source)
            filename = filename or "upload.bin"

            def content() -> bytes | BinaryIO:
                return data
        else:
            file = Path(source)
            if not file.is_file():
                raise FileNotFoundError(f"{file}: no such file")
            filename = filename or file.name

            def content() -> bytes | BinaryIO:  # reopened per attempt; httpx sends its length as Content-Length
                return open(file, "rb")
        headers = {"Content-Type": "application/octet-stream", "X-Filename": filename}
        return self._json("POST", path, content=content, headers=headers, repeatable=False)

    def upload_model(self, path_or_bytes: str | os.PathLike | bytes, filename: str | None = None) -> dict:
        """Upload an .onnx (or a .zip of .onnx + external data); streamed from disk. Returns the model."""
        if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
            filename = filename or "model.onnx"
        return self._upload("/v1/models", path_or_bytes, filename)

    def upload_dataset(self, path: str | os.PathLike | bytes, filename: str | None = None) -> dict:
        """Upload an .npz or .safetensors dataset. Returns the dataset with its arrays' names and shapes."""
        if isinstance(path, (bytes, bytearray, memoryview)):
            filename = filename or "dataset.npz"
        return self._upload("/v1/datasets", path, filename)

    def model(self, model_id: str) -> dict:
        return self._json("GET", f"/v1/models/{model_id}")

    # --- jobs ------------------------------------------------------------------------------------

    def submit_job(self, model_id: str, steps: list[dict | str] | None = None, recipe: str | None = None,
                   params: dict | None = None, evaluate: dict | None = None, *, name: str | None = None,
                   queue: str | None = None, target: dict | None = None, goal: dict | None = None,
                   idempotency_key: str | None = None) -> dict:
        """Queue a job: steps (dicts {method, params}, or method ids) or a recipe with its params; `target`, e.g.
        {"runtime": "openvino", "device": "cpu", "precision": "bf16"} (see `targets()`), where the result is built
        for and measured (with a target other than ONNX Runtime on the CPU, steps may be left out); or a `goal`
        instead of all three (see `optimize`). A model alone runs the default goal.

        The Idempotency-Key (a fresh uuid unless given) makes a retried submission return the first job.
        """
        spec: dict[str, Any] = {"model_id": model_id}
        if steps is not None:
            spec["steps"] = [{"method": s, "params": {}} if isinstance(s, str) else s for s in steps]
        if recipe is not None:
            spec["recipe"] = recipe
        if params:
            spec["params"] = params
        if evaluate is not None:
            spec["evaluate"] = evaluate
        if name is not None:
            spec["name"] = name
        if queue is not None:
            spec["queue"] = queue
        if target is not None:
            spec["target"] = target
        if goal is not None:
            spec["goal"] = goal
        key = idempotency_key or str(uuid.uuid4())
        return self._json("POST", "/v1/jobs", json=spec, headers={"Idempotency-Key": key})

    def optimize(self, model_id: str, *, evaluate: dict | None = None, name: str | None = None,
                 queue: str | None = None, idempotency_key: str | None = None, **goal: Any) -> dict:
        """Queue a goal job: the search finds the best model that meets the goal, or the evidence that none does.

        The goal's fields are keywords: objective ("latency", "size", "energy"), batch_size, min_cosine (None: judged
        by max_accuracy_drop alone), max_accuracy_drop, max_latency_ms, max_size_bytes, time_budget_s, families
        (e.g. ["quantize", "targets"]), datasets ({"eval_dataset_id": ..., "calibration_dataset_id": ...,
        "train_dataset_id": ...}); none given: fastest at batch 1 within cosine 0.99. When the job has finished,
        `report(job_id)["search"]` names the candidate handed over (`result_artifact`: model.onnx or
        model_openvino.zip) or, with none, the closest; `["candidates"]` holds every candidate with its artifact.
        """
        return self.submit_job(model_id, evaluate=evaluate, name=name, queue=queue, goal=goal,
                               idempotency_key=idempotency_key)

    def gate(self, candidate_model_id: str, *, baseline_model_id: str | None = None, baseline_job_id: str | None = None,
             max_slowdown_pct: float | None = None, min_cosine: float | None = None,
             max_accuracy_drop: float | None = None, max_size_bytes: int | None = None,
             max_size_growth_pct: float | None = None, eval_dataset_id: str | None = None, batch_size: int = 1,
             time_budget_s: float = 60, name: str | None = None, idempotency_key: str | None = None) -> dict:
        """Queue a regression gate: the candidate against a baseline (a model, or the model.onnx an earlier
        succeeded job handed over), judged by the limits given (at least one). `wait(gate["id"])` follows it like
        any job; then `gate_result(gate["id"])` has `verdict` ("pass" or "fail"), `reason` and `checks`, and
        `gate_report(gate["id"])` the evidence."""
        policy = {key: value for key, value in (
            ("max_slowdown_pct", max_slowdown_pct), ("min_cosine", min_cosine),
            ("max_accuracy_drop", max_accuracy_drop), ("max_size_bytes", max_size_bytes),
            ("max_size_growth_pct", max_size_growth_pct)) if value is not None}
        baseline = {"model_id": baseline_model_id} if baseline_model_id is not None else {"job_id": baseline_job_id}
        body: dict[str, Any] = {"candidate_model_id": candidate_model_id, "baseline": baseline, "policy": policy,
                                "batch_size": batch_size, "time_budget_s": time_budget_s}
        if eval_dataset_id is not None:
            body["eval_dataset_id"] = eval_dataset_id
        if name is not None:
            body["name"] = name
        key = idempotency_key or str(uuid.uuid4())
        return self._json("POST", "/v1/gates", json=body, headers={"Idempotency-Key": key})

    def gate_result(self, gate_id: str) -> dict:
        return self._json("GET", f"/v1/gates/{gate_id}")

    def gate_report(self, gate_id: str) -> dict:
        return self._json("GET", f"/v1/gates/{gate_id}/report")

    def job(self, job_id: str) -> dict:
        return self._json("GET", f"/v1/jobs/{job_id}")

    def iter_jobs(self, status: str | None = None, page_size: int = 50) -> Iterator[dict]:
        """Every job of the caller, newest first, page after page."""
        cursor = None
        while True:
            query: dict[str, Any] = {"limit": page_size}
            if status:
                query["status"] = status
            if cursor:
                query["cursor"] = cursor
            page = self._json("GET", "/v1/jobs", params=query)
            yield from page["items"]
            cursor = page.get("next_cursor")
            if not cursor:
                return

    def jobs(self, status: str | None = None, limit: int | None = 100) -> list[dict]:
        """Up to limit jobs (None: all), newest first, following next_cursor."""
        out: list[dict] = []
        page_size = min(limit, 200) if limit else 200
        for job in self.iter_jobs(status=status, page_size=page_size):
            out.append(job)
            if limit is not None and len(out) >= limit:
                break
        return out

    def cancel(self, job_id: str) -> dict:
        """Cancel a queued job, or stop a running one at its next step boundary. 409 Conflict if finished."""
        # Not repeated blindly: a second cancel of a job the first one cancelled answers 409.
        return self._json("POST", f"/v1/jobs/{job_id}/cancel", repeatable=False)

    def replay(self, job_id: str, *, idempotency_key: str | None = None) -> dict:
        """Queue a new job with a finished job's recorded recipe (same model, datasets, steps or goal, evaluation),
        linked to it (`replay_of`). When it has finished, `report(new_id)["replay"]` says what differed from the
        original, how far the figures moved and whether each model artifact is byte-identical. Conflict
        (job_not_replayable, replay_model_deleted, replay_dataset_deleted) when there is nothing to replay.

        The Idempotency-Key (a fresh uuid unless given) makes a retried request return the first replay.
        """
        key = idempotency_key or str(uuid.uuid4())
        return self._json("POST", f"/v1/jobs/{job_id}/replay", headers={"Idempotency-Key": key})

    def wait(self, job_id: str, on_progress: Callable[[dict], None] | None = None, poll_s: float = 1.0,
             timeout_s: float | None = None) -> dict:
        """Poll until the job is succeeded, failed or cancelled; return that job.

        on_progress(job) is called with each changed state (ETag / If-None-Match: an unchanged job costs
        the server a 304). Raises TimeoutError after timeout_s.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        etag: str | None = None
        job: dict | None = None
        while True:
            headers = {"If-None-Match": etag} if etag else {}
            response = self._request("GET", f"/v1/jobs/{job_id}", headers=headers, ok=(304,))
            if response.status_code != 304:
                etag = response.headers.get("etag")
                job = response.json()
                if on_progress is not None:
                    on_progress(job)
                if job["status"] in TERMINAL_STATUSES:
                    return job
            if deadline is not None and time.monotonic() + poll_s > deadline:
                state = f"{job['status']} at {job['progress']:.0%}" if job else "unknown"
                raise TimeoutError(f"job {job_id} not finished after {timeout_s}s (last seen: {state})")
            self._sleep(poll_s)

    def report(self, job_id: str) -> dict:
        return self._json("GET", f"/v1/jobs/{job_id}/report")

    def events(self, job_id: str, after: int = 0) -> list[dict]:
        """The job's events (state changes and progress messages), oldest first, those with id > after."""
        return self._json("GET", f"/v1/jobs/{job_id}/events", params={"after": after} if after else None)

    def artifacts(self, job_id: str) -> list[dict]:
        return self._json("GET", f"/v1/jobs/{job_id}/artifacts")

    def download(self, job_id: str, name: str = "model.onnx", dest: str | os.PathLike | None = None) -> Path:
        """Stream an artifact to dest (a file, or a folder to put `name` in; default ./name).

        The bytes go to a temporary file beside dest, are hashed on the way and checked against the
        server's X-Content-SHA256; only then is the file renamed to dest. Returns dest.
        """
        target = Path(dest) if dest is not None else Path(name)
        if target.is_dir():
            target = target / name
        target.parent.mkdir(parents=True, exist_ok=True)
        attempt = 0
        while True:
            try:
                return self._download_once(f"/v1/jobs/{job_id}/artifacts/{name}", target)
            except Unreachable:
                raise
            except httpx.TransportError as exc:  # the stream broke mid-body: a GET, so start again
                if attempt >= self.retries:
                    raise Unreachable(None, "unreachable", f"download of {name} broke off: {exc!r}") from exc
                self._sleep(self._delay(attempt))
                attempt += 1

    def _download_once(self, path: str, target: Path) -> Path:
        response = self._request("GET", path, stream=True)
        tmp: Path | None = None
        try:
            fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
            tmp = Path(tmp_name)
            digest = hashlib.sha256()
            with os.fdopen(fd, "wb") as out:
                for chunk in response.iter_bytes(CHUNK_BYTES):
                    digest.update(chunk)
                    out.write(chunk)
            response.close()
            expected = response.headers.get("x-content-sha256")
            if expected and digest.hexdigest() != expected.lower():
                raise ChecksumMismatch(None, "checksum_mismatch",
                                       f"{path}: received sha256 {digest.hexdigest()}, server says {expected}")
            os.replace(tmp, target)
        except BaseException:
            response.close()
            if tmp is not None:
                tmp.unlink(missing_ok=True)
            raise
        return target

    # --- catalogue -------------------------------------------------------------------------------

    def methods(self) -> list[dict]:
        return self._json("GET", "/v1/methods")

    def recipes(self) -> list[dict]:
        return self._json("GET", "/v1/recipes")

    def targets(self) -> dict:
        """What the deployment's live workers serve: {targets: [{runtime, device, precision, queue, default, workers,
        devices, versions}], workers: [...]} (the default target is listed even with no worker)."""
        return self._json("GET", "/v1/targets")
