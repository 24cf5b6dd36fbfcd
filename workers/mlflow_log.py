"""A succeeded job's MLflow run (the job's `mlflow` option): params, metrics, the report, and the compressed model
with MLflow's ONNX flavour, registered as a new version of `register_as` with tags that lead back to the job and
its source model.

The worker does this after the job's own process has finished and before the job is marked succeeded, so that the
"succeeded" event and webhook carry the outcome. It runs the mlflow client in a process of its own
(`python -m workers.mlflow_log <folder>`), for three reasons:
- the tenant's credential reaches the client as MLFLOW_TRACKING_* variables of that process only, never of the
  worker that serves every tenant;
- every connection it opens is checked against the egress rules (app.integrations.egress), and every artifact
  location the server names must be the server's own proxy (`mlflow-artifacts:`): a tracking server cannot make
  the client write to a `file:` path on the worker or to an `s3:` bucket with the worker's credentials;
- mlflow is a large import, loaded for this run only, and its process is killed if it hangs.
While it runs, the worker keeps the job's heartbeat.

What happens when logging fails (the server unreachable, the credential refused): the job still succeeds. Its
compressed model and report were measured and stored, and stay downloadable; the report's `mlflow` section holds
{"status": "failed", "code", "message"}, and the job's message and summary notes say that the run was not logged,
with the code. A user who asked for registration sees it at once in the job they poll; retrying the compression
for a logging failure would be waste.
"""
from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from app.db import session_scope
from app.dbmodels import Job, Model
from app.errors import MlflowError, MlflowUnreachable, ModelPressError
from app.integrations import service as integrations
from app.integrations.egress import check_uri

log = logging.getLogger("modelpress.worker")

REQUEST, RESULT, OUTPUT = "mlflow-request.json", "mlflow-result.json", "mlflow-output.log"
# The whole logging (model upload included) may take this long; the job's heartbeat goes on meanwhile.
LOG_TIMEOUT_S = 600
# Each HTTP request of the client: no answer within this is mlflow_unreachable (the client does not retry).
REQUEST_TIMEOUT_S = 30
MAX_PARAM_CHARS = 500
# Variables the logging process does not inherit: the worker's own credentials and settings (database URL, cloud
# keys) and any MLflow settings of the operator's, which would override the tenant's.
WITHHELD_ENV = ("MODELPRESS_", "MLFLOW_", "AWS_", "AZURE_", "GOOGLE_", "DATABRICKS_")


# --- in the worker ---------------------------------------------------------------------------------------

def log_succeeded(attempt, claim, result: dict, settings) -> dict:
    """Log the run of a job that succeeded; the outcome goes into result's report (`mlflow`) and summary notes."""
    attempt.progress(0.98, "mlflow", "logging the run to MLflow")
    try:
        outcome = _log(attempt, claim, result, settings)
    except ModelPressError as exc:
        outcome = {"status": "failed", "code": exc.code, "message": exc.message}
    if outcome["status"] == "logged":
        registered = outcome.get("registered_model")
        note = f"MLflow: logged run {outcome['run_id']} to experiment {outcome['experiment']!r}" + (
            f", registered as {registered['name']} version {registered['version']}" if registered else "")
    else:
        log.info("job %s: the MLflow run was not logged: %s", attempt.job_id, outcome["message"])
        note = f"MLflow: the run was not logged ({outcome['code']}): {outcome['message']}"
    outcome["note"] = note
    report, summary = result["report"], result["summary"]
    report["mlflow"] = outcome
    for part in (summary, report.get("summary")):
        if isinstance(part, dict) and note not in part.setdefault("notes", []):
            part["notes"].append(note)
    return outcome


def _log(attempt, claim, result: dict, settings) -> dict:
    options = claim.spec["mlflow"]
    with session_scope() as db:
        job = db.get(Job, attempt.job_id)
        if job is None:
            raise MlflowError("the job was deleted while it finished")
        source = db.get(Model, job.model_id) if job.model_id else None
        connection = integrations.connection(db=db, settings=settings, tenant_id=job.tenant_id,
                                             what="logging the job's run to MLflow")
        source_model = {"id": source.id if source else None, "sha256": claim.model_sha,
                        "name": source.name if source else None}
    check_uri(connection.tracking_uri, allow_private=settings.mlflow_allow_private)
    folder = attempt.folder
    report_path = folder / "mlflow-report.json"
    report_path.write_text(json.dumps(result["report"], indent=2, default=str))
    model = next((a for a in attempt.artifacts if a["name"] == "model.onnx"), None)
    register_as = options.get("register_as")
    request = {
        "tracking_uri": connection.tracking_uri, "allow_private": settings.mlflow_allow_private,
        "experiment": options.get("experiment") or "modelpress",
        "run_name": options.get("run_name") or f"modelpress-{attempt.job_id}",
        "register_as": (connection.registered_model_prefix + register_as) if register_as else None,
        "report_path": str(report_path),
        "model_path": str(attempt.store.local_path(model["sha256"])) if model else None,
        "params": params(attempt.job_id, claim.spec, result["report"], source_model),
        "metrics": metrics(result["report"]),
        "tags": tags(attempt.job_id, source_model, result["summary"], model),
        "secrets": [s for s in (connection.password, connection.token) if s],
    }
    (folder / REQUEST).write_text(json.dumps(request))
    (folder / REQUEST).chmod(0o600)
    try:
        return _run_child(attempt, folder, connection, beat_every_s=settings.heartbeat_interval_s)
    finally:
        (folder / REQUEST).unlink(missing_ok=True)  # it names the secrets to scrub from messages


def _run_child(attempt, folder: Path, connection, *, beat_every_s: float) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(WITHHELD_ENV)}
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env |= {"PYTHONUNBUFFERED": "1", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
            "MLFLOW_HTTP_REQUEST_TIMEOUT": str(REQUEST_TIMEOUT_S), "TMPDIR": str(folder)}
    if connection.token is not None:
        env["MLFLOW_TRACKING_TOKEN"] = connection.token
    elif connection.username is not None and connection.password is not None:
        env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"] = connection.username, connection.password
    (folder / RESULT).unlink(missing_ok=True)
    with open(folder / OUTPUT, "wb") as output:
        child = subprocess.Popen([sys.executable, "-m", "workers.mlflow_log", str(folder)], cwd=folder, env=env,
                                 stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    deadline = time.monotonic() + LOG_TIMEOUT_S
    try:
        while True:
            try:
                child.wait(timeout=beat_every_s)
                break
            except subprocess.TimeoutExpired:
                pass
            attempt.heartbeat(beat=True)  # Superseded when the reaper gave the job to another attempt
            if time.monotonic() > deadline:
                raise MlflowUnreachable(f"logging the run to MLflow did not finish within {LOG_TIMEOUT_S} s and was "
                                        "stopped")
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    try:
        outcome = json.loads((folder / RESULT).read_text())
    except (OSError, ValueError):
        tail = (folder / OUTPUT).read_text(errors="replace")[-800:].strip() if (folder / OUTPUT).exists() else ""
        raise MlflowError(f"the MLflow logging process ended ({child.returncode}) without a result"
                          + (f": {tail}" if tail else "")) from None
    if outcome.get("status") not in ("logged", "failed"):
        raise MlflowError("the MLflow logging process gave an unreadable result")
    return outcome


def params(job_id: str, spec: dict, report: dict, source_model: dict) -> dict[str, str]:
    """The run's params: the job, its source model, its steps (method, version, params) or goal, its evaluation."""
    found: dict[str, Any] = {"modelpress.job_id": job_id, "source_model.id": source_model["id"],
                             "source_model.sha256": source_model["sha256"]}
    for step in report.get("steps") or []:
        prefix = f"step{step.get('index', '')}"
        found[f"{prefix}.method"] = step.get("method")
        found[f"{prefix}.version"] = step.get("version")
        found[f"{prefix}.params"] = step.get("params")
    for key, value in (spec.get("goal") or {}).items():
        found[f"goal.{key}"] = value
    for key, value in (spec.get("evaluate") or {}).items():
        found[f"evaluate.{key}"] = value
    if spec.get("target"):
        found["target"] = spec["target"]
    chosen = (report.get("search") or {}).get("chosen")
    if chosen:
        found["search.chosen"] = chosen
    return {key: _param_text(value) for key, value in found.items() if value is not None}


def _param_text(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= MAX_PARAM_CHARS else text[: MAX_PARAM_CHARS - 3] + "..."


def metrics(report: dict) -> dict[str, float]:
    """The run's metrics: sizes; per batch size, latency p50/p95/p99 of the original and the compressed model and
    the speedup with its interval bounds; fidelity; accuracy; energy where it was measured."""
    summary = report.get("summary") or {}
    found: dict[str, Any] = {
        "size.original_bytes": summary.get("original_size_bytes"),
        "size.compressed_bytes": summary.get("compressed_size_bytes"),
        "size.ratio": summary.get("size_ratio"),
    }
    latency = (report.get("measurement") or {}).get("latency") or {}
    for entry in latency.get("batch_sizes") or []:
        batch = entry.get("batch_size")
        for role, stats in (("original", entry.get("baseline") or {}), ("compressed", entry.get("result") or {})):
            for percentile in ("p50", "p95", "p99"):
                found[f"latency_{percentile}_ms.{role}.batch_{batch}"] = stats.get(f"{percentile}_ms")
    for batch, speedup in (summary.get("speedup") or {}).items():
        found[f"speedup.batch_{batch}"] = speedup
        interval = (summary.get("speedup_interval") or {}).get(batch) or {}
        found[f"speedup_low.batch_{batch}"] = interval.get("low")
        found[f"speedup_high.batch_{batch}"] = interval.get("high")
    for key, value in (summary.get("fidelity") or {}).items():
        found[f"fidelity.{key}"] = value
    for key, value in (summary.get("accuracy") or {}).items():
        if key != "samples":
            found[f"accuracy.{key}"] = value
    for role, joules in (summary.get("energy_j_per_inference") or {}).items():
        found[f"energy_j_per_inference.{role}"] = joules
    return {key: float(value) for key, value in found.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)}


def tags(job_id: str, source_model: dict, summary: dict, model: dict | None) -> dict[str, str]:
    """Tags of the run and of the registered model version: the way back to the job and to the source model."""
    found = {"modelpress.job_id": job_id, "modelpress.source_model_id": source_model["id"],
             "modelpress.source_model_sha256": source_model["sha256"],
             "modelpress.source_model_name": source_model["name"],
             "modelpress.model_sha256": model["sha256"] if model else None,
             "modelpress.verdict": (summary.get("verdict") or {}).get("verdict")}
    return {key: str(value) for key, value in found.items() if value is not None}


# --- in the logging process ----------------------------------------------------------------------------------

_refused: list[ModelPressError] = []


def main(folder: Path) -> int:
    request = json.loads((folder / REQUEST).read_text())
    try:
        outcome = _log_run(request)
    except ModelPressError as exc:
        outcome = _failed(exc.code, exc.message, request)
    except Exception as exc:
        outcome = _classify(exc, request)
    (folder / RESULT).write_text(json.dumps(outcome))
    return 0


def _log_run(request: dict) -> dict:
    uri = request["tracking_uri"]
    _guard_egress(allow_private=request["allow_private"])
    import mlflow
    import mlflow.onnx
    import onnx
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    _only_proxied_artifacts(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = MlflowClient(uri, registry_uri=uri)
    name = request["experiment"]
    experiment = client.get_experiment_by_name(name)
    experiment_id = experiment.experiment_id if experiment is not None else client.create_experiment(name)
    # The client's create_run, not mlflow.start_run: no context tags (the worker's user name, its source path).
    run = client.create_run(experiment_id, run_name=request["run_name"], tags=request["tags"])
    run_id = run.info.run_id
    outcome: dict[str, Any] = {"status": "logged", "tracking_uri": uri, "experiment": name,
                               "experiment_id": experiment_id, "run_id": run_id}
    try:
        now = int(time.time() * 1000)
        params = [Param(k, v) for k, v in request["params"].items()]
        metrics = [Metric(k, v, now, 0) for k, v in request["metrics"].items()]
        for start in range(0, max(len(params), len(metrics)), 100):  # MLflow takes 100 params per batch
            client.log_batch(run_id, metrics=metrics[start:start + 100], params=params[start:start + 100])
        client.log_artifact(run_id, request["report_path"], artifact_path="modelpress")
        outcome["report_artifact"] = f"modelpress/{Path(request['report_path']).name}"
        if request["model_path"]:
            proto = onnx.load(request["model_path"])
            import onnxruntime

            info = mlflow.onnx.log_model(
                proto, name="model", run_id=run_id, tags=request["tags"],
                # Given, not inferred: inference would load the model in yet another process to see its imports.
                pip_requirements=[f"onnx=={onnx.__version__}", f"onnxruntime=={onnxruntime.__version__}"],
                # One file while protobuf allows it (2 GiB), so that the registered model is the job's model.onnx.
                save_as_external_data=Path(request["model_path"]).stat().st_size > 1 << 30)
            outcome["model_uri"] = info.model_uri
            if request["register_as"]:
                version = mlflow.register_model(info.model_uri, request["register_as"],
                                                tags=request["tags"] | {"modelpress.run_id": run_id})
                outcome["registered_model"] = {"name": version.name, "version": str(version.version),
                                               "uri": f"models:/{version.name}/{version.version}"}
        else:
            outcome["model_uri"] = None
            outcome["model_note"] = "the job handed over no ONNX model (model.onnx), so none was logged or registered"
    except BaseException:
        try:
            client.set_terminated(run_id, "FAILED")
        except Exception:  # the first error is the one to report
            pass
        raise
    client.set_terminated(run_id, "FINISHED")
    return outcome


def _guard_egress(*, allow_private: bool) -> None:
    """Every connection the client opens (urllib3, under requests) goes to an address the egress rules allow."""
    import urllib3.util.connection as connection

    from app.integrations.egress import allowed_addresses

    original = connection.create_connection

    def guarded(address, *args, **kwargs):
        host, port = address
        try:
            addresses = allowed_addresses(host, port, allow_private=allow_private)
        except ModelPressError as exc:
            _refused.append(exc)
            raise
        error: OSError | None = None
        for ip in addresses:
            try:
                return original((ip, port), *args, **kwargs)
            except OSError as exc:
                error = exc
        raise error or OSError(f"no address for {host}")

    connection.create_connection = guarded


def _only_proxied_artifacts(tracking_uri: str) -> None:
    """Artifacts only through the tracking server's proxy (mlflow-artifacts:, or runs:/ and models:/ URIs, which
    resolve to one): any other location is refused before a repository for it is made."""
    from urllib.parse import urlsplit

    from mlflow.store.artifact import artifact_repository_registry

    from app.errors import MlflowArtifactsNotProxied

    registry = artifact_repository_registry._artifact_repository_registry
    original = registry.get_artifact_repository
    netloc = urlsplit(tracking_uri).netloc

    def proxied_only(artifact_uri, tracking_uri=None, registry_uri=None):
        parts = urlsplit(str(artifact_uri))
        if parts.scheme not in ("mlflow-artifacts", "runs", "models") or (
                parts.scheme == "mlflow-artifacts" and parts.netloc and parts.netloc != netloc):
            exc = MlflowArtifactsNotProxied(
                f"the MLflow server stores this run's artifacts at {str(artifact_uri)[:200]!r}, which it does not serve "
                "itself: ModelPress writes artifacts only through the server's artifact proxy (mlflow-artifacts:, "
                "`mlflow server --serve-artifacts`)")
            _refused.append(exc)
            raise exc
        return original(artifact_uri, tracking_uri, registry_uri)

    registry.get_artifact_repository = proxied_only  # type: ignore[method-assign]  # every lookup passes here


def _classify(exc: BaseException, request: dict) -> dict:
    """An exception of the client as one of our codes, in words."""
    if _refused:
        return _failed(_refused[0].code, _refused[0].message, request)
    text = f"{type(exc).__name__}: {exc}"
    error_code = str(getattr(exc, "error_code", "") or "")
    uri = request["tracking_uri"]
    if error_code in ("UNAUTHENTICATED", "PERMISSION_DENIED") or "error code 401" in text or "error code 403" in text:
        return _failed("mlflow_unauthorized", f"the MLflow server at {uri} refused the tenant's credentials ({text}); "
                       "set them with PUT /v1/integrations/mlflow", request)
    unreachable = ("Max retries exceeded", "Connection refused", "NewConnectionError", "ConnectionError",
                   "Name or service not known", "timed out", "Timeout", "RemoteDisconnected", "Connection aborted")
    if any(marker in text for marker in unreachable):
        return _failed("mlflow_unreachable", f"the MLflow server at {uri} is unreachable ({text})", request)
    return _failed("mlflow_error", f"the MLflow server at {uri} answered with an error ({text})", request)


def _failed(code: str, message: str, request: dict) -> dict:
    for secret in request.get("secrets") or []:
        message = message.replace(secret, "***")
    message = " ".join(message.split())
    return {"status": "failed", "code": code, "message": message if len(message) <= 1000 else message[:997] + "..."}


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
