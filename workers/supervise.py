"""A job's life in the worker: claim it, run it in a fenced process of its own, store what that process
sends, and finish it.

Postgres (or SQLite) holds the job's state; the worker process is its only writer while the job runs. The job's
steps and measurements run in a child process (workers.job_child, limits in workers.sandbox) that has no
database, broker or network; it sends progress and artifacts on a pipe, which this process writes down, with a
heartbeat every `heartbeat_interval_s`. A child that exhausts its limits fails its job (`resource_limit`) and
the worker goes on with the next one.

Running it twice for one job id yields one result: a finished job is left alone; a job found `running` is
started over only when its previous attempt is dead (its process gone, or its heartbeat stale), and a
duplicate message for a live attempt is dropped. Every write of an attempt checks that the job is still that
attempt's (`Attempt.owned`): one the reaper has requeued (workers.recovery) cannot overwrite its successor.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from sqlalchemy import CursorResult, Update, delete, select, update
from sqlalchemy.orm import Session

from app.blobs import release_blob
from app.db import session_scope
from app.dbmodels import (
    TERMINAL_STATUSES,
    Artifact,
    Blob,
    Dataset,
    Job,
    JobDataset,
    JobModel,
    Measurement,
    Model,
    utcnow,
)
from app.errors import JobFailed, ModelPressError
from app.jobs.state import add_event, set_status
from app.settings import Settings, get_settings
from app.store import ArtifactStore, get_store
from workers.job_child import OUTPUT, REQUEST, RESULT, STOP
from workers.registry import served_targets
from workers.sandbox import JobLimits, describe, how_it_ended, looks_out_of_memory, output_tail

log = logging.getLogger("modelpress.worker")
MAX_MESSAGE_BYTES = 1 << 20


def _rows_updated(db: Session, statement: Update) -> int:
    """Rows an UPDATE changed (its result is a CursorResult; Session.execute is typed as returning a Result)."""
    return cast("CursorResult[Any]", db.execute(statement)).rowcount


class Superseded(Exception):
    """This attempt is no longer the job's: the reaper requeued it, or another attempt claimed it."""


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass
class Claim:
    attempt: int
    model_sha: str
    model_format: str
    spec: dict
    datasets: dict[str, tuple[str, str, str]]  # id -> (sha256, format, name)
    models: dict[str, tuple[str, str]]  # id -> (sha256, format)
    kind: str = "compress"  # or "convert" (workers/convert), "gate" (workers/gate)
    # A goal search's candidates kept from a lost attempt: artifact name -> sha256.
    resume: dict[str, str] = field(default_factory=dict)


@dataclass
class Attempt:
    """One attempt at a job, as the worker supervises it."""

    job_id: str
    number: int
    store: ArtifactStore
    folder: Path
    artifacts: list[dict[str, Any]] = field(default_factory=list)

    def owned(self, db) -> Job:
        """The job row, locked, if it is still this attempt's; else Superseded."""
        job = db.get(Job, self.job_id, with_for_update=True)
        if job is None or job.attempts != self.number or job.status != "running":
            raise Superseded(f"job {self.job_id} is no longer attempt {self.number}'s"
                             + (f" (it is {job.status}, attempt {job.attempts})" if job is not None else ""))
        return job

    def progress(self, value: float, stage: str, message: str) -> None:
        with session_scope() as db:
            job = self.owned(db)
            job.progress = max(job.progress, min(float(value), 0.99))
            job.stage, job.message = str(stage)[:64], str(message)
            job.updated_at = job.heartbeat_at = utcnow()
            add_event(db, job, kind="progress")

    def heartbeat(self, *, beat: bool = True) -> bool:
        """Write the heartbeat (when `beat`); returns whether cancellation was requested. Superseded when the
        job is no longer this attempt's."""
        with session_scope() as db:
            owned = (Job.id == self.job_id, Job.attempts == self.number, Job.status == "running")
            if beat:
                if _rows_updated(db, update(Job).where(*owned).values(heartbeat_at=utcnow())) != 1:
                    raise Superseded(f"job {self.job_id} is no longer attempt {self.number}'s")
                return bool(db.scalar(select(Job.cancel_requested).where(Job.id == self.job_id)))
            cancel = db.scalar(select(Job.cancel_requested).where(*owned))
            if cancel is None:
                raise Superseded(f"job {self.job_id} is no longer attempt {self.number}'s")
            return bool(cancel)

    def store_artifact(self, message: dict) -> None:
        """Store a file the job's process finished, after checking it is one of the job's own files."""
        path = Path(str(message.get("path", "")))
        name = str(message.get("name", ""))
        inside = path.resolve().is_relative_to(self.folder.resolve())
        if not inside or path.is_symlink() or not path.is_file() or not name or "/" in name or len(name) > 255:
            raise JobFailed(f"the job's process named an artifact {name!r} at {path} that is not one of its own "
                            "files; nothing of it was stored", code="internal_error")
        sha, size, created = self.store.put(path, keep_source=True)
        if sha != message.get("sha256"):
            if created:
                with session_scope() as db:
                    release_blob(db=db, store=self.store, sha256=sha)
            raise JobFailed(f"artifact {name} changed while it was being stored", code="internal_error")
        with session_scope() as db:
            self.owned(db)
            if db.get(Blob, sha) is None:
                db.add(Blob(sha256=sha, size_bytes=size))
                db.flush()  # the artifact row references the blob row
            db.add(Artifact(job_id=self.job_id, name=name, kind=str(message.get("kind", "model"))[:32], sha256=sha,
                            size_bytes=size, content_type=str(message.get("content_type", ""))[:100]))
        self.artifacts.append({"name": name, "sha256": sha, "size_bytes": size})


def run_job(job_id: str, *, node: str | None = None) -> None:
    """Run one job to its end. `node`: the Celery worker's name, which the job's "running" event gives."""
    settings = get_settings()
    store = get_store()
    claim = _claim_retrying(job_id, store, settings, node)
    if claim is None:
        return
    if claim.attempt > 1:
        store.clean_tmp()  # the dead attempt's scratch folder (its lock died with it; live folders stay)
    try:
        with store.workdir() as folder:
            attempt = Attempt(job_id=job_id, number=claim.attempt, store=store, folder=folder)
            result = _supervise(attempt, claim, settings)
            if result["status"] == "succeeded":
                if claim.spec.get("mlflow"):  # the run logged before the job is marked succeeded (workers.mlflow_log)
                    from workers.mlflow_log import log_succeeded

                    log_succeeded(attempt, claim, result, settings)
                _succeed(attempt, result)
            elif result["status"] == "cancelled":
                _finish(job_id, "cancelled", message="cancelled at a step boundary", attempt=claim.attempt)
            else:
                log.info("job %s failed: %s", job_id, result.get("message"))
                _finish(job_id, "failed", code=str(result.get("code") or "internal_error"),
                        message=str(result.get("message") or "the job failed"), attempt=claim.attempt)
    except Superseded as exc:
        log.warning("job %s: attempt %d stopped: %s", job_id, claim.attempt, exc)
    except ModelPressError as exc:
        log.info("job %s failed: %s", job_id, exc.message)
        _finish(job_id, "failed", code=exc.code, message=exc.message, attempt=claim.attempt)
    except Exception as exc:  # a bug or an environment problem: say what happened, keep the trace in the log
        log.error("job %s crashed:\n%s", job_id, traceback.format_exc())
        _finish(job_id, "failed", code="internal_error", message=f"{type(exc).__name__}: {exc}",
                attempt=claim.attempt)


CLAIM_TRIES = 3


def _claim_retrying(job_id: str, store: ArtifactStore, settings: Settings, node: str | None = None) -> Claim | None:
    """_claim, tried again when PostgreSQL picked its transaction as a deadlock's victim. The claim locks the job's
    row and, through its foreign key, the tenant's; a submission at the same moment (a replay, or any job: it
    locks the tenant's row for its quota) can lock them the other way round. The victim's transaction is rolled
    back whole, so trying again is safe; without it the message was spent and the job stayed queued for good."""
    from sqlalchemy.exc import OperationalError

    for attempt in range(1, CLAIM_TRIES + 1):
        try:
            return _claim(job_id, store, settings, node)
        except OperationalError as exc:
            if "deadlock detected" not in str(exc) or attempt == CLAIM_TRIES:
                raise
            log.warning("job %s: its claim was a deadlock's victim (try %d of %d); trying again", job_id, attempt,
                        CLAIM_TRIES)
            time.sleep(0.2 * attempt)
    return None


def _claim(job_id: str, store: ArtifactStore, settings: Settings, node: str | None = None) -> Claim | None:
    with session_scope() as db:
        job = db.get(Job, job_id, with_for_update=True)
        if job is None:
            log.warning("job %s does not exist; message dropped", job_id)
            return None
        if job.status in TERMINAL_STATUSES:
            log.info("job %s already %s; nothing to do", job_id, job.status)
            return None
        if job.cancel_requested:
            job.stage = "cancelled"
            set_status(db, job, "cancelled", message="cancelled before it started")
            return None
        retry = job.status == "running"
        if retry and _alive(job, settings):
            log.info("job %s is running in %s (attempt %d); duplicate message dropped", job_id, job.worker_id,
                     job.attempts)
            return None
        if job.attempts >= settings.job_max_attempts:
            job.error_code, job.stage = "worker_lost", "failed"
            job.error_message = (f"the job's worker was lost {job.attempts} time(s) (killed, or the machine went "
                                 f"away); it is not tried again (MODELPRESS_JOB_MAX_ATTEMPTS={settings.job_max_attempts})")
            set_status(db, job, "failed", message=job.error_message)
            return None
        # The claim itself: only one of two racing workers moves attempts on (SQLite has no row locks).
        seen = job.attempts
        if _rows_updated(db, update(Job).where(Job.id == job.id, Job.attempts == seen).values(attempts=seen + 1)) != 1:
            log.info("job %s was claimed by another worker at the same time", job_id)
            return None
        db.refresh(job)
        resume: dict[str, str] = {}
        if seen:
            # An earlier attempt died mid-job: drop what it left, then start over; a goal search keeps the
            # candidates it stored (workers.search.run resumes from them).
            kept = SEARCH_KINDS if job.spec.get("goal") else ()
            resume = _drop_outputs(db, store, job.id, keep_kinds=kept)
        job.progress, job.stage, job.error_code, job.error_message = 0.0, "preparing", None, None
        job.worker_id, job.heartbeat_at = worker_id(), utcnow()
        again = " again after a lost worker" if seen else ""
        where = f" on worker {node}" if node else ""
        set_status(db, job, "running", message=f"attempt {job.attempts}: started{again}{where}")
        model = db.get(Model, job.model_id) if job.model_id else None
        if model is None:
            job.error_code, job.error_message = "model_not_found", "the job's model was deleted before the job ran"
            set_status(db, job, "failed", message=job.error_message)
            return None
        linked = db.execute(
            select(Dataset.id, Dataset.sha256, Dataset.format, Dataset.name)
            .join(JobDataset, JobDataset.dataset_id == Dataset.id).where(JobDataset.job_id == job.id)
        ).all()
        others = db.execute(
            select(Model.id, Model.sha256, Model.format)
            .join(JobModel, JobModel.model_id == Model.id).where(JobModel.job_id == job.id)
        ).all()
        models = {row[0]: (row[1], row[2]) for row in others}
        # A gate's baseline may be an earlier job's model.onnx: a blob no model row names (app/gates, workers/gate).
        models.update({i["id"]: (i["sha256"], i["format"]) for i in job.spec.get("blob_inputs", [])})
        return Claim(attempt=job.attempts, model_sha=model.sha256, model_format=model.format, spec=dict(job.spec),
                     datasets={row[0]: (row[1], row[2], row[3]) for row in linked},
                     models=models, kind=job.kind or "compress",
                     resume=resume)


def _alive(job: Job, settings: Settings) -> bool:
    """Whether the attempt a `running` job records may still be running somewhere."""
    if job.heartbeat_at is None or (utcnow() - job.heartbeat_at).total_seconds() > settings.heartbeat_timeout_s:
        return False
    host, _, pid = (job.worker_id or "").rpartition(":")
    if host != socket.gethostname():
        return True  # another machine's process: its heartbeat says it is alive
    if not pid.isdigit() or int(pid) == os.getpid():
        return False  # this very process is here again, so the attempt it ran has ended
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


SEARCH_KINDS = ("candidate", "candidate-record")


def _drop_outputs(db, store: ArtifactStore, job_id: str, keep_kinds: tuple[str, ...] = ()) -> dict[str, str]:
    """Delete a dead attempt's artifacts and measurements, except those of `keep_kinds`: returns those kept,
    artifact name -> sha256."""
    kept: dict[str, str] = dict(db.execute(select(Artifact.name, Artifact.sha256).where(
        Artifact.job_id == job_id, Artifact.kind.in_(keep_kinds))).all()) if keep_kinds else {}
    shas = list(db.scalars(select(Artifact.sha256).where(Artifact.job_id == job_id, Artifact.kind.not_in(keep_kinds))))
    db.execute(delete(Artifact).where(Artifact.job_id == job_id, Artifact.kind.not_in(keep_kinds)))
    db.execute(delete(Measurement).where(Measurement.job_id == job_id))
    db.flush()
    for sha in shas:
        release_blob(db=db, store=store, sha256=sha)
    return kept


def _supervise(attempt: Attempt, claim: Claim, settings: Settings) -> dict:
    """Run the job's process to its end; returns its result (see workers.job_child)."""
    limits = JobLimits.from_settings(settings)
    folder, store = attempt.folder, attempt.store
    request = {
        "job_id": attempt.job_id, "attempt": attempt.number, "parent_pid": os.getpid(), "limits": limits.to_json(),
        "kind": claim.kind, "spec": claim.spec,
        "model": {"path": str(store.local_path(claim.model_sha)), "format": claim.model_format},
        "datasets": {i: [str(store.local_path(sha)), fmt, name] for i, (sha, fmt, name) in claim.datasets.items()},
        "models": {i: [str(store.local_path(sha)), fmt] for i, (sha, fmt) in claim.models.items()},
        "resume": {name: str(store.local_path(sha)) for name, sha in claim.resume.items()},
        "targets": served_targets(),
    }
    lines: queue.Queue[bytes | None] = queue.Queue()
    if not settings.job_isolated:
        return _run_in_this_process(attempt, request, settings, limits, lines)
    (folder / REQUEST).write_text(json.dumps(request))
    attempt.progress(0.01, "preparing", f"starting the job's process ({describe(limits)})")
    read_fd, write_fd = os.pipe()
    reply_read, reply_write = os.pipe()
    with open(folder / OUTPUT, "wb") as output:
        child = subprocess.Popen(
            [sys.executable, "-m", "workers.job_child", str(folder), str(write_fd), str(reply_read)],
            pass_fds=(write_fd, reply_read), stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
            cwd=folder, env=_child_env(folder), start_new_session=True)
    os.close(write_fd)
    os.close(reply_read)
    replies = os.fdopen(reply_write, "w", buffering=1)

    def read() -> None:
        with os.fdopen(read_fd, "rb") as pipe:
            for raw in pipe:
                lines.put(raw[:MAX_MESSAGE_BYTES])
        lines.put(None)

    threading.Thread(target=read, daemon=True, name=f"job-{attempt.job_id[:8]}").start()

    def reply(answer: str) -> None:
        try:
            replies.write(answer + "\n")
        except BrokenPipeError:  # it died meanwhile; its end is seen below
            pass

    try:
        timed_out = _follow(attempt, lines, settings, limits, reply=reply, kill=lambda: _kill_group(child))
        if not timed_out:
            try:  # it closed its end of the pipe: it is exiting
                child.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
    finally:
        _kill_group(child)  # whatever is left of it (a measuring process it started)
        try:
            replies.close()
        except BrokenPipeError:
            pass
    return _outcome(child.returncode, folder, limits, timed_out)


def _run_in_this_process(attempt: Attempt, request: dict, settings: Settings, limits: JobLimits,
                         lines: queue.Queue) -> dict:
    """MODELPRESS_JOB_ISOLATED=false (debugging, tests that register methods in-process): the same run in a
    thread of this process, with no limits and no fence around it."""
    from workers.job_child import run

    outcome: dict = {}
    answers: queue.Queue[str] = queue.Queue()

    def send(message: dict) -> None:
        lines.put(json.dumps(message).encode())

    def ask_cancelled() -> bool:
        send({"type": "checkpoint"})
        return answers.get() != "go"

    def work() -> None:
        try:
            outcome.update(run(attempt.folder, request, {"isolated": False}, limits, send, ask_cancelled))
        finally:
            lines.put(None)

    thread = threading.Thread(target=work, daemon=True, name=f"job-{attempt.job_id[:8]}")
    thread.start()
    if _follow(attempt, lines, settings, limits, reply=answers.put, kill=lambda: None):
        return _outcome(0, attempt.folder, limits, True)
    thread.join()
    return outcome


def _kill_group(child: subprocess.Popen) -> None:
    """The job's process and whatever it started (its measuring processes)."""
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    child.wait()


def _child_env(folder: Path) -> dict[str, str]:
    env = dict(os.environ)
    # The project root must be importable in the child even where the package is not installed.
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    # Every temporary file of the job (the measuring processes' folders, ONNX Runtime's quantization tools,
    # torch) lands in the job's own folder, which goes when the job ends, or at the next start or sweep when its
    # worker was killed: never in the system's temp folder, where nothing would remove it.
    scratch = folder / "tmp"
    scratch.mkdir(exist_ok=True)
    env["TMPDIR"] = env["TEMP"] = env["TMP"] = str(scratch)
    return env


def _follow(attempt: Attempt, lines: queue.Queue, settings: Settings, limits: JobLimits, *, reply, kill) -> bool:
    """Relay the job's messages until it is done; heartbeat and cancellation on the way.

    Returns whether the job was stopped for running past its wall-clock limit."""
    deadline = time.monotonic() + limits.wall_clock_s
    next_beat = next_look = 0.0
    stop_sent = False
    try:
        while True:
            try:
                line = lines.get(timeout=0.5)
            except queue.Empty:
                line = b""
            if line is None:
                return False
            if line.strip():
                _relay(attempt, line, reply)
            now = time.monotonic()
            # Cancellation is looked for every second, the heartbeat written every heartbeat_interval_s.
            if now >= next_look:
                beat = now >= next_beat
                next_look = now + min(1.0, settings.heartbeat_interval_s)
                if beat:
                    next_beat = now + settings.heartbeat_interval_s
                if attempt.heartbeat(beat=beat) and not stop_sent:
                    (attempt.folder / STOP).touch()  # the job stops at its next check
                    stop_sent = True
            if now > deadline:
                kill()
                return True
    except BaseException:
        kill()
        raise


def _relay(attempt: Attempt, line: bytes, reply) -> None:
    try:
        message = json.loads(line)
    except ValueError:
        log.warning("job %s: unreadable message from its process: %r", attempt.job_id, line[:200])
        return
    kind = message.get("type") if isinstance(message, dict) else None
    if kind == "progress":
        attempt.progress(message.get("value", 0.0), message.get("stage", ""), message.get("message", ""))
    elif kind == "artifact":
        attempt.store_artifact(message)
    elif kind == "checkpoint":
        reply("stop" if attempt.heartbeat(beat=False) else "go")


def _outcome(returncode: int, folder: Path, limits: JobLimits, timed_out: bool) -> dict:
    result_file = folder / RESULT
    if timed_out:
        return {"status": "failed", "code": "resource_limit",
                "message": f"the job ran longer than its wall-clock limit of {limits.wall_clock_s} s "
                           "(MODELPRESS_JOB_TIMEOUT_S) and was stopped"}
    if returncode == 0 and result_file.is_file():
        try:
            result = json.loads(result_file.read_text())
        except ValueError:
            result = None
        if isinstance(result, dict) and result.get("status") in ("succeeded", "failed", "cancelled"):
            return result
    tail = output_tail(folder / OUTPUT)
    said = (": " + " | ".join(tail))[:1500] if tail else ""
    if returncode == -signal.SIGXCPU:
        return {"status": "failed", "code": "resource_limit",
                "message": f"the job used more than its CPU-time limit of {limits.cpu_time_s} s per process "
                           "(MODELPRESS_JOB_CPU_TIME_LIMIT_S) and was stopped"}
    if returncode == -signal.SIGKILL:
        return {"status": "failed", "code": "resource_limit",
                "message": "the job's process was killed (SIGKILL), which on a worker usually means the machine ran "
                           "out of memory" + said}
    if limits.memory_bytes and looks_out_of_memory(" ".join(tail)):
        return {"status": "failed", "code": "resource_limit",
                "message": f"the job ran out of memory: it may use {limits.memory_bytes / 2**30:.1f} GiB "
                           "(MODELPRESS_JOB_MEMORY_LIMIT_BYTES)" + said}
    how = how_it_ended(returncode) + ("" if returncode < 0 else " without a result")
    return {"status": "failed", "code": "job_process_crashed", "message": f"the job's process {how}{said}"}


def _succeed(attempt: Attempt, result: dict) -> None:
    report, summary, rows = result["report"], result["summary"], result["rows"]
    with session_scope() as db:
        job = attempt.owned(db)
        model = db.get(Model, job.model_id) if job.model_id else None
        if job.kind == "convert":
            _store_converted(db, job, model, attempt, report)
        result_sha = next((a["sha256"] for a in attempt.artifacts if a["name"] == "model.onnx"), None)
        environment_ids = _store_environments(db, rows)
        for row, environment_id in zip(rows, environment_ids):
            db.add(Measurement(
                job_id=job.id, tenant_id=job.tenant_id, model_role=row["model"],
                model_sha256=row.get("sha256") or (
                    (model.sha256 if model else None) if row["model"] == "baseline" else result_sha),
                provider=row["provider"], batch_size=row.get("batch_size"), metric=row["metric"],
                value=float(row["value"]), unit=row["unit"], environment_id=environment_id,
            ))
        job.report, job.summary, job.stage = report, summary, "done"
        logged = report.get("mlflow") or {}
        failed_logging = f"; MLflow: the run was not logged ({logged['code']})" if logged.get("status") == "failed" else ""
        set_status(db, job, "succeeded", message=_headline(summary) + failed_logging)


def _store_converted(db, job: Job, source: Model | None, attempt: Attempt, report: dict) -> None:
    """A conversion's export becomes a model like an upload, linked to its source (in the job's own transaction:
    a retried attempt cannot leave two)."""
    converted = report["converted"]
    artifact = next((a for a in attempt.artifacts if a["name"] == converted["artifact"]), None)
    if source is None or artifact is None:
        raise JobFailed("the conversion finished without its model artifact, or its upload was deleted",
                        code="internal_error")
    stem = Path(source.name).stem or "model"
    suffix = ".zip" if converted["format"] == "onnx-zip" else ".onnx"
    db.add(Model(tenant_id=job.tenant_id, name=f"{stem}{suffix}"[:255], format=converted["format"],
                 sha256=artifact["sha256"], size_bytes=artifact["size_bytes"], inspection=converted["inspection"],
                 source_model_id=source.id))


def _store_environments(db, rows: list[dict]) -> list[str | None]:
    """The environments row id of each measurement row (None for a row without an "environment").

    Each distinct fingerprint is inserted once, with ON CONFLICT DO NOTHING: two workers storing the same
    environment at once both succeed. They insert in id order, so they cannot deadlock on each other's rows.
    """
    from sqlalchemy.dialects.postgresql import insert as postgresql_insert
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    from app.dbmodels import Environment
    from app.measurements.fingerprint import fingerprint, fingerprint_id

    ids: list[str | None] = []
    fingerprints: dict[str, dict] = {}
    for row in rows:
        environment = row.get("environment")
        if not environment:
            ids.append(None)
            continue
        stack = fingerprint(environment)
        environment_id = fingerprint_id(stack)
        fingerprints[environment_id] = stack
        ids.append(environment_id)
    # The two databases ModelPress runs on; both spell the upsert the same way.
    insert = postgresql_insert if db.get_bind().dialect.name == "postgresql" else sqlite_insert
    for environment_id in sorted(fingerprints):
        db.execute(insert(Environment).values(id=environment_id, fingerprint=fingerprints[environment_id],
                                              created_at=utcnow()).on_conflict_do_nothing(index_elements=["id"]))
    return ids


def _headline(summary: dict) -> str:
    parts = []
    if summary.get("size_ratio") is not None:
        parts.append(f"size x{summary['size_ratio']:.2f}")
    for batch, speedup in summary.get("speedup", {}).items():
        shown = summary.get("speedup_ci", {}).get(batch) or f"{speedup:.2f}x"
        parts.append(f"speed {shown} at batch {batch}")
    acc = summary.get("accuracy")
    if acc:
        parts.append(f"top-1 {100 * acc['original_top1']:.2f}% -> {100 * acc['compressed_top1']:.2f}%")
    cos = summary.get("fidelity", {}).get("cosine_similarity")
    if cos is not None:
        parts.append(f"cosine {cos:.4f}")
    verdict = summary.get("verdict")
    if verdict:  # the message leads with the verdict and its reason
        return f"{verdict['verdict'].replace('_', ' ')}: {verdict['reason']}" + (
            f" (measured: {', '.join(parts)})" if parts else "")
    return "done: " + ", ".join(parts) if parts else "done"


# A job's scratch folder (<data>/store/tmp/work-XXXX, its inputs under work/): a message names files relative to it.
JOB_FOLDER = re.compile(r"(?:/[^\s'\"/]+)*/store/tmp/work-[^\s'\"/]+/(?:work/)?")


def without_server_paths(message: str) -> str:
    """A message as a tenant may read it: paths inside the job's folder made relative to it, and the server's own
    folders (data folder, installation) not named."""
    message = JOB_FOLDER.sub("", message)
    settings = get_settings()
    for folder, name in ((Path(settings.data_dir).resolve(), "<data>"), (Path(sys.prefix), "<python>"),
                         (Path(__file__).resolve().parents[1], "<modelpress>")):
        if len(str(folder)) > 1:
            message = message.replace(str(folder), name)
    return message


def _finish(job_id: str, status: str, *, code: str | None = None, message: str, attempt: int | None = None) -> None:
    with session_scope() as db:
        job = db.get(Job, job_id, with_for_update=True)
        if job is None or job.status in TERMINAL_STATUSES:
            return
        if attempt is not None and (job.attempts != attempt or job.status != "running"):
            log.warning("job %s: attempt %d no longer owns it; not marking it %s", job_id, attempt, status)
            return
        message = without_server_paths(message)
        if code:
            job.error_code, job.error_message = code, message
        job.stage = status
        set_status(db, job, status, message=message)
