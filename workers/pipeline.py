"""The pipeline runner: one job = load the model, run its steps, measure, store the results.

Postgres (or SQLite) holds the job's state; this module is the only writer while a
job runs. Running it twice for one job id yields one result: a finished job is left
alone, and a job found `running` (its worker died) is started over cleanly.
"""
from __future__ import annotations

import contextlib
import json
import logging
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import delete, select

from app.db import session_scope
from app.dbmodels import (
    TERMINAL_STATUSES, Artifact, Blob, Dataset, Job, JobDataset, JobModel, Measurement, Model, utcnow,
)
from app.errors import JobFailed, ModelPressError
from app.jobs.state import add_event, set_status
from app.models.onnx_files import materialize
from app.blobs import release_blob
from app.models.service import limits
from app.settings import get_settings
from app.store import LocalStore, get_store
from workers import methods

log = logging.getLogger("modelpress.worker")

# Share of the progress bar each phase owns.
PREPARE, STEPS, MEASURE = 0.05, 0.40, 0.50


class Cancelled(Exception):
    pass


@dataclass
class Run:
    job_id: str
    store: LocalStore
    last_progress_write: float = 0.0
    last_cancel_check: float = 0.0
    artifacts: list[dict[str, Any]] = field(default_factory=list)
    # dataset id -> (sha256, format, name) of every dataset the job names
    datasets: dict[str, tuple[str, str, str]] = field(default_factory=dict)
    # model id -> (sha256, format) of every other model the job names (a distillation student)
    models: dict[str, tuple[str, str]] = field(default_factory=dict)
    _loaded: dict[str, Any] = field(default_factory=dict)
    _unpacked: dict[str, Path] = field(default_factory=dict)

    def dataset(self, dataset_id: str):
        """The named dataset, loaded once per job (a workers.datasets.Dataset)."""
        from workers.datasets import load

        if dataset_id not in self._loaded:
            if dataset_id not in self.datasets:
                raise JobFailed(f"dataset {dataset_id} was deleted before the job ran", code="dataset_not_found")
            sha, fmt, name = self.datasets[dataset_id]
            self._loaded[dataset_id] = load(self.store.local_path(sha), fmt, name=name)
        return self._loaded[dataset_id]

    def model(self, model_id: str, workdir: Path) -> Path:
        """Another model the job names, unpacked once per job (its ONNX path)."""
        if model_id not in self._unpacked:
            if model_id not in self.models:
                raise JobFailed(f"model {model_id} was deleted before the job ran", code="model_not_found")
            sha, fmt = self.models[model_id]
            self._unpacked[model_id] = materialize(self.store.local_path(sha), fmt, workdir / "models" / model_id,
                                                   limits(get_settings()))
        return self._unpacked[model_id]

    def progress(self, value: float, stage: str, message: str, *, force: bool = False) -> None:
        """Record progress; throttled to a few writes per second unless forced."""
        now = time.monotonic()
        if not force and now - self.last_progress_write < 0.5:
            return
        self.last_progress_write = now
        with session_scope() as db:
            job = db.get(Job, self.job_id)
            job.progress = max(job.progress, min(value, 0.99))
            job.stage, job.message, job.updated_at = stage, message, utcnow()
            add_event(db, job, kind="progress")

    def cancel_requested(self) -> bool:
        with session_scope() as db:
            return bool(db.scalar(select(Job.cancel_requested).where(Job.id == self.job_id)))

    def cancel_requested_throttled(self) -> bool:
        """cancel_requested, asked of the database at most once a second (for loops inside a step)."""
        now = time.monotonic()
        if now - self.last_cancel_check < 1.0:
            return False
        self.last_cancel_check = now
        return self.cancel_requested()

    def check_cancel(self) -> None:
        if self.cancel_requested():
            raise Cancelled()


def run_job(job_id: str) -> None:
    store = get_store()
    claimed = _claim(job_id, store)
    if claimed is None:
        return
    model_sha, model_format, spec, datasets, models = claimed
    run = Run(job_id=job_id, store=store, datasets=datasets, models=models)
    try:
        with store.workdir() as workdir:
            report, summary, rows = _execute(run, workdir, model_sha, model_format, spec)
        _succeed(run, report, summary, rows)
    except Cancelled:
        _finish(job_id, "cancelled", message="cancelled at a step boundary")
    except ModelPressError as exc:
        log.info("job %s failed: %s", job_id, exc.message)
        _finish(job_id, "failed", code=exc.code, message=exc.message)
    except Exception as exc:  # a bug or an environment problem: say what happened, keep the trace in the log
        log.error("job %s crashed:\n%s", job_id, traceback.format_exc())
        _finish(job_id, "failed", code="internal_error", message=f"{type(exc).__name__}: {exc}")


def _claim(job_id: str, store: LocalStore) -> tuple[str, str, dict, dict, dict] | None:
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
        if retry:
            # The previous attempt died mid-job: drop what it left, then start over.
            _drop_outputs(db, store, job.id)
        job.attempts += 1
        job.progress, job.stage, job.error_code, job.error_message = 0.0, "preparing", None, None
        set_status(db, job, "running", message=f"attempt {job.attempts}: started" + (" again after a lost worker" if retry else ""))
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
        return (model.sha256, model.format, dict(job.spec), {row[0]: tuple(row[1:]) for row in linked},
                {row[0]: tuple(row[1:]) for row in others})


def _drop_outputs(db, store: LocalStore, job_id: str) -> None:
    shas = list(db.scalars(select(Artifact.sha256).where(Artifact.job_id == job_id)))
    db.execute(delete(Artifact).where(Artifact.job_id == job_id))
    db.execute(delete(Measurement).where(Measurement.job_id == job_id))
    db.flush()
    for sha in shas:
        release_blob(db=db, store=store, sha256=sha)


def _execute(run: Run, workdir: Path, model_sha: str, model_format: str, spec: dict):
    settings = get_settings()
    run.progress(0.01, "loading", "unpacking the uploaded model", force=True)
    original = materialize(run.store.local_path(model_sha), model_format, workdir / "input", limits(settings))
    steps_report = []
    step_paths: list[Path] = []
    current = original
    steps = spec["steps"]
    for index, step in enumerate(steps, start=1):
        run.check_cancel()
        method = methods.get(step["method"])
        base = PREPARE + STEPS * (index - 1) / len(steps)
        run.progress(base, f"step {index}/{len(steps)}", f"running {method.id}", force=True)
        params = method.params_model.model_validate(step["params"])
        out_dir = workdir / f"step-{index}"
        out_dir.mkdir()
        started = time.perf_counter()
        try:
            step_datasets = {name: run.dataset(value) for name in method.dataset_params
                             if (value := step["params"].get(name))}
            step_models = {name: run.model(value, workdir) for name in method.model_params
                           if (value := step["params"].get(name))}
            ctx = methods.StepContext(
                calibration=step_datasets.get("calibration_dataset_id"), datasets=step_datasets, seed=index,
                progress=lambda fraction, message, milestone=False, base=base, index=index: run.progress(
                    base + STEPS / len(steps) * fraction, f"step {index}/{len(steps)}", message, force=milestone),
                cancelled=run.cancel_requested_throttled, models=step_models,
            )
            # ONNX Runtime's tools drop temp files in the working directory (sym_shape_infer_temp.onnx
            # and its external data): keep them inside the job's folder.
            with contextlib.chdir(out_dir):
                output = method.run(current, params, out_dir, ctx)
        except ModelPressError as exc:
            exc.message = f"step {index} ({method.id}) failed: {exc.message}"
            raise
        except Exception as exc:
            raise JobFailed(f"step {index} ({method.id}) failed: {type(exc).__name__}: {exc}", code="step_failed") from exc
        duration = time.perf_counter() - started
        name = "model.onnx" if index == len(steps) else f"step-{index}-{method.id}.onnx"
        artifact = _store_artifact(run, output.model_path, name=name, kind="model", content_type="application/octet-stream")
        for suffix, path in output.packed.items():
            _store_artifact(run, path, name=name + suffix, kind="packed-model", content_type="application/zstd"
                            if suffix == ".zst" else "application/octet-stream")
        steps_report.append({
            "index": index, "method": method.id, "version": method.version, "params": step["params"],
            "duration_s": round(duration, 3), "details": output.details, "artifact": artifact,
        })
        current = output.model_path
        step_paths.append(current)

    run.check_cancel()
    evaluate = spec["evaluate"]
    # Every step's model is measured against the original, so the report shows the trajectory; the last
    # step's measurement is the job's result.
    rows: list[dict] = []
    trajectory = []
    for position, (entry, path) in enumerate(zip(steps_report, step_paths)):
        last = position == len(steps) - 1
        share = (position / len(steps), (position + 1) / len(steps))
        what = "the result" if last else f"step {entry['index']}'s model ({entry['method']})"
        run.progress(PREPARE + STEPS + MEASURE * share[0], "measuring",
                     f"measuring the original and {what} side by side", force=True)
        measured_step = _measure(run, settings, evaluate, original, path, share)
        # Raw per-call times go to an artifact of their own; the report and the job row keep the statistics.
        samples_path = workdir / ("latency-samples.json" if last else f"step-{entry['index']}-latency-samples.json")
        samples_path.write_text(json.dumps(measured_step.pop("samples", {})))
        samples = _store_artifact(run, samples_path, name=samples_path.name, kind="samples",
                                  content_type="application/json")
        measured_step["latency"]["samples_artifact"] = samples["name"]
        environment = measured_step.get("environment")
        step_rows = [r | {"environment": environment} for r in measured_step.pop("measurements", [])]
        if last:
            measured = measured_step
            rows += step_rows
        else:
            rows += [r | {"model": f"step-{entry['index']}", "sha256": entry["artifact"]["sha256"]}
                     for r in step_rows if r["model"] == "result"]
        trajectory.append(_trajectory_entry(entry, _summary(measured_step, [])))
    summary = _summary(measured, steps_report)
    if len(trajectory) > 1:
        summary["trajectory"] = trajectory
    report = {
        "job_id": run.job_id,
        "steps": steps_report,
        "evaluate": evaluate,
        "measurement": measured,
        "summary": summary,
    }
    run.progress(0.97, "storing", "storing the report", force=True)
    report_path = workdir / "report.json"
    report["artifacts"] = run.artifacts + [{"name": "report.json", "kind": "report"}]
    report_path.write_text(json.dumps(report, indent=2, default=str))
    _store_artifact(run, report_path, name="report.json", kind="report", content_type="application/json")
    return report, summary, rows


def _measure(run: Run, settings, evaluate: dict, original: Path, candidate: Path, share: tuple[float, float]) -> dict:
    from workers.measure import Stopped, measure_pair
    from workers.measure.isolated import measure_isolated

    def on_progress(fraction: float, message: str) -> None:
        run.progress(PREPARE + STEPS + MEASURE * (share[0] + (share[1] - share[0]) * fraction), "measuring", message)

    options = dict(
        batch_sizes=evaluate["batch_sizes"], warmup=evaluate["warmup"], iterations=evaluate["iterations"],
        providers=evaluate.get("providers"), threads=settings.measure_threads or None, on_progress=on_progress,
        should_stop=run.cancel_requested_throttled,
        dataset=run.dataset(evaluate["eval_dataset_id"]) if evaluate.get("eval_dataset_id") else None,
        dataset_max_samples=evaluate.get("eval_max_samples"), include_io=bool(evaluate.get("include_io")),
        energy_estimate_tdp_watts=evaluate.get("tdp_watts") if evaluate.get("energy_estimate") else None,
    )
    try:
        if settings.measure_isolated:
            return measure_isolated(original, candidate, timeout_s=settings.measure_timeout_s, **options)
        return measure_pair(original, candidate, **options)
    except Stopped:
        raise Cancelled() from None


def _trajectory_entry(step: dict, summary: dict) -> dict:
    """One step's model against the original, in the summary's terms (size, p50, accuracy or fidelity)."""
    accuracy = summary.get("accuracy") or {}
    return {
        "step": step["index"], "method": step["method"], "artifact": step["artifact"]["name"],
        "size_bytes": summary.get("compressed_size_bytes"), "size_ratio": summary.get("size_ratio"),
        "latency_p50_ms": {b: v["compressed"] for b, v in summary.get("latency_p50_ms", {}).items()},
        "speedup": summary.get("speedup"),
        "top1": accuracy.get("compressed_top1"), "top1_drop_points": accuracy.get("top1_drop_points"),
        "cosine": (summary.get("fidelity") or {}).get("cosine_similarity"),
    }


def _summary(measured: dict, steps_report: list[dict]) -> dict:
    size = measured.get("size", {})
    latency = measured.get("latency", {})
    fidelity = measured.get("fidelity", {})
    per_batch = latency.get("batch_sizes", [])
    top1 = [o.get("top1_agreement") for o in fidelity.get("outputs", []) if o.get("top1_agreement") is not None]
    return {
        "original_size_bytes": size.get("baseline", {}).get("file_bytes"),
        "compressed_size_bytes": size.get("result", {}).get("file_bytes"),
        "size_ratio": size.get("ratio"),
        "latency_p50_ms": {
            str(b["batch_size"]): {"original": b["baseline"]["p50_ms"], "compressed": b["result"]["p50_ms"]}
            for b in per_batch
        },
        "latency_p50_ratio": {str(b["batch_size"]): b["p50_ratio"] for b in per_batch},
        "speedup": {str(b["batch_size"]): b["speedup"] for b in per_batch},
        # "1.83x (1.79-1.88)": the ratio of medians and its 95% bootstrap interval over the paired rounds.
        "speedup_ci": {str(b["batch_size"]): b["speedup_text"] for b in per_batch if "speedup_text" in b},
        "noisy_batch_sizes": [b["batch_size"] for b in per_batch if b.get("noisy")],
        "provider": latency.get("provider"),
        "providers": {p["provider"]: ({str(b["batch_size"]): b["speedup_text"] for b in p["latency"]["batch_sizes"]}
                                      if p["available"] else {"unavailable": p["reason"]})
                      for p in measured.get("providers", [])},
        "cold_start_ms": {role: {"load": c["load_ms"], "first_run": c["first_run_ms"]}
                          for role, c in (measured.get("cold_start") or {}).items() if isinstance(c, dict)},
        "energy_j_per_inference": (measured.get("energy") or {}).get("value"),
        "energy_note": (measured.get("energy") or {}).get("reason"),
        "fidelity": {
            "cosine_similarity": fidelity.get("cosine_similarity"),
            "max_abs_diff": fidelity.get("max_abs_diff"),
            "top1_agreement": min(top1) if top1 else None,
        },
        "skipped_batch_sizes": latency.get("skipped", []),
        # What a step warns about (a slower int8 kernel, zeros that dense runtimes do not skip) is as
        # much a result as the figures.
        "notes": measured.get("notes", []) + [
            f"step {s['index']} ({s['method']}): {warning}"
            for s in steps_report for warning in s["details"].get("warnings", [])
        ],
        "steps": [s["method"] for s in steps_report],
    } | _dataset_summary(measured.get("dataset"))


def _dataset_summary(on: dict | None) -> dict:
    """With an eval dataset, fidelity is taken on it and accuracy is shown; random-input fidelity moves aside."""
    if not on:
        return {"fidelity_on": "synthetic random inputs (no eval dataset)", "accuracy": None}
    fid = on["fidelity"]
    acc = on["accuracy"]
    return {
        "fidelity_on": f"dataset {on['dataset'] or ''}".strip() + f" ({on['samples']} samples)",
        "fidelity": {
            "cosine_similarity": fid["mean_cosine"], "worst_cosine": fid["worst_cosine"],
            "max_abs_diff": fid["max_abs_diff"], "top1_agreement": fid["top1_agreement"],
        },
        "accuracy": None if acc is None else {
            "samples": acc["samples"],
            "original_top1": acc["original"]["top1"], "compressed_top1": acc["compressed"]["top1"],
            "top1_drop_points": acc["top1_drop_points"],
            "original_top5": acc["original"]["top5"], "compressed_top5": acc["compressed"]["top5"],
        },
        "accuracy_note": on["accuracy_note"],
    }


def _store_artifact(run: Run, path: Path, *, name: str, kind: str, content_type: str) -> dict:
    # The step's output stays where it is: the next step and the measurement read it.
    sha, size, _ = run.store.put(path, keep_source=True)
    with session_scope() as db:
        if db.get(Blob, sha) is None:
            db.add(Blob(sha256=sha, size_bytes=size))
            db.flush()  # the artifact row references the blob row
        db.add(Artifact(job_id=run.job_id, name=name, kind=kind, sha256=sha, size_bytes=size, content_type=content_type))
    record = {"name": name, "kind": kind, "sha256": sha, "size_bytes": size}
    run.artifacts.append(record)
    return record


def _succeed(run: Run, report: dict, summary: dict, rows: list[dict]) -> None:
    with session_scope() as db:
        job = db.get(Job, run.job_id, with_for_update=True)
        model = db.get(Model, job.model_id) if job.model_id else None
        result_sha = next((a["sha256"] for a in run.artifacts if a["name"] == "model.onnx"), None)
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
        set_status(db, job, "succeeded", message=_headline(summary))


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
    return "done: " + ", ".join(parts) if parts else "done"


def _finish(job_id: str, status: str, *, code: str | None = None, message: str) -> None:
    with session_scope() as db:
        job = db.get(Job, job_id, with_for_update=True)
        if job is None or job.status in TERMINAL_STATUSES:
            return
        if code:
            job.error_code, job.error_message = code, message
        job.stage = status
        set_status(db, job, status, message=message)
