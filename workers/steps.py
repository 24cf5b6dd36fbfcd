"""One job's steps, measurements and report, as the job's own process runs them (workers.job_child).

Nothing here touches the database, the broker or the artifact store: the process may have no network at all
(workers.sandbox). It reads the job's inputs from local files the worker laid out, and tells the worker what
happens through `JobRun.send`: progress, and each artifact as soon as it is written (the worker stores it at
once, so a step that fails later keeps the models of the steps before it downloadable).
"""
from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.errors import JobFailed, ModelPressError
from app.formats.onnx_files import materialize
from app.reports import (
    REPORT_VERSION,
    ColdStartRole,
    ColdStartSummary,
    IntervalBounds,
    JobReport,
    JobSummary,
    Measurement,
    P50Pair,
    ReportArtifact,
    SpeedupInterval,
    StepRecord,
    SummaryAccuracy,
    SummaryFidelity,
    TrajectoryEntry,
)
from app.settings import get_settings
from app.store import file_sha256
from workers import methods, replay
from workers.verdict import Budget, job_points, judge, objective_batch, pareto_front

# Method families whose steps train with torch (seeded, deterministic kernels, fixed threads: workers.replay).
TRAINING_FAMILIES = ("prune", "distill", "cluster")
# Share of the progress bar each phase owns.
PREPARE, STEPS, MEASURE = 0.05, 0.40, 0.50


class Cancelled(Exception):
    pass


@dataclass
class JobRun:
    """The job as its process sees it: where its inputs lie, and the line back to the worker."""

    job_id: str
    folder: Path
    send: Callable[[dict], None]
    stop_file: Path
    # dataset id -> (path, format, name) and model id -> (path, format) of every input the job names
    datasets: dict[str, tuple[str, str, str]] = field(default_factory=dict)
    models: dict[str, tuple[str, str]] = field(default_factory=dict)
    sandbox: dict[str, Any] = field(default_factory=dict)
    # Asks the worker, and waits for its answer, whether the job was cancelled (at step boundaries).
    ask_cancelled: Callable[[], bool] | None = None
    artifacts: list[dict[str, Any]] = field(default_factory=list)
    # A goal search's stored candidates from a lost attempt: artifact name -> local path (workers.search.run).
    resume: dict[str, str] = field(default_factory=dict)
    # The targets the worker registered (workers.registry.served_targets), or None where it is not known.
    targets: list[dict[str, Any]] | None = None
    last_progress_write: float = 0.0
    _loaded: dict[str, Any] = field(default_factory=dict)
    _unpacked: dict[str, Path] = field(default_factory=dict)

    def dataset(self, dataset_id: str):
        """The named dataset, loaded once per job (a workers.datasets.Dataset)."""
        from workers.datasets import load

        if dataset_id not in self._loaded:
            if dataset_id not in self.datasets:
                raise JobFailed(f"dataset {dataset_id} was deleted before the job ran", code="dataset_not_found")
            path, fmt, name = self.datasets[dataset_id]
            self._loaded[dataset_id] = load(Path(path), fmt, name=name)
        return self._loaded[dataset_id]

    def model(self, model_id: str, workdir: Path) -> Path:
        """Another model the job names, unpacked once per job (its ONNX path)."""
        if model_id not in self._unpacked:
            if model_id not in self.models:
                raise JobFailed(f"model {model_id} was deleted before the job ran", code="model_not_found")
            path, fmt = self.models[model_id]
            self._unpacked[model_id] = materialize(Path(path), fmt, workdir / "models" / model_id,
                                                   get_settings().file_limits())
        return self._unpacked[model_id]

    def progress(self, value: float, stage: str, message: str, *, force: bool = False) -> None:
        """Report progress; throttled to a few messages per second unless forced."""
        now = time.monotonic()
        if not force and now - self.last_progress_write < 0.5:
            return
        self.last_progress_write = now
        self.send({"type": "progress", "value": value, "stage": stage, "message": message})

    def cancel_requested(self) -> bool:
        return self.stop_file.exists()

    # A file check is cheap: no throttle needed inside a step's loops.
    cancel_requested_throttled = cancel_requested

    def check_cancel(self) -> None:
        """At a step boundary: stop if the job was cancelled, as the database says now (the stop file may lag
        the cancellation by up to a second)."""
        if self.cancel_requested() or (self.ask_cancelled is not None and self.ask_cancelled()):
            raise Cancelled()

    def store_artifact(self, path: Path, *, name: str, kind: str, content_type: str) -> dict:
        """Hand a finished file to the worker, which stores it now; it stays where it is (the next step and
        the measurement read it)."""
        record = {"name": name, "kind": kind, "sha256": file_sha256(path), "size_bytes": path.stat().st_size}
        self.send({"type": "artifact", "path": str(path), "content_type": content_type, **record})
        self.artifacts.append(record)
        return record


def execute(run: JobRun, workdir: Path, model_path: Path, model_format: str, spec: dict):
    settings = get_settings()
    recipe = _record_recipe(run, workdir, spec, settings)
    run.progress(0.01, "loading", "unpacking the uploaded model", force=True)
    original = materialize(model_path, model_format, workdir / "input", settings.file_limits())
    steps_report = []
    step_paths: list[Path] = []
    current = original
    steps = spec["steps"]
    input_shapes = _input_shapes(run, spec)
    from workers.onnx_tools.inputs import check_original_runs

    run.progress(0.03, "loading", "checking that the model runs at the job's input shapes", force=True)
    check_original_runs(original, input_shapes)  # input_shape_required now, not after the steps
    from workers.intake import normalize

    run.progress(0.04, "loading", "normalizing the model for the methods (opset, Constant weights, shapes)",
                 force=True)
    # The steps take the normalized model; the measurement still compares the upload itself with the result.
    intake = normalize(original, batch=min(spec["evaluate"].get("batch_sizes") or [1]), input_shapes=input_shapes)
    current = intake.path
    if spec.get("goal"):
        from workers.search.run import search

        written, summary, rows = search(run, workdir, original=original, intake=intake, spec=spec,
                                        input_shapes=input_shapes)
        # The search wrote its report.json already; the job's report (and recipe.json) carry the recipe.
        written["recipe"] = recipe
        if spec.get("replay_of"):
            written["replay"] = replay.compare(spec["replay_of"], recipe, summary, run.artifacts)
        return written, summary, rows
    for index, step in enumerate(steps, start=1):
        run.check_cancel()
        base = PREPARE + STEPS * (index - 1) / len(steps)
        run.progress(base, f"step {index}/{len(steps)}", f"running {step['method']}", force=True)
        out_dir = workdir / f"step-{index}"
        out_dir.mkdir()
        started = time.perf_counter()
        output, method = run_method(
            run, step, current, out_dir, workdir, input_shapes, seed=index, label=f"step {index}",
            progress=lambda fraction, message, milestone=False, base=base, index=index: run.progress(
                base + STEPS / len(steps) * fraction, f"step {index}/{len(steps)}", message, force=milestone))
        duration = time.perf_counter() - started
        name = "model.onnx" if index == len(steps) else f"step-{index}-{method.id}.onnx"
        artifact = run.store_artifact(output.model_path, name=name, kind="model", content_type="application/octet-stream")
        for suffix, path in output.packed.items():
            run.store_artifact(path, name=name + suffix, kind="packed-model", content_type="application/zstd"
                            if suffix == ".zst" else "application/octet-stream")
        steps_report.append({
            "index": index, "method": method.id, "version": method.version, "params": step["params"],
            "duration_s": round(duration, 3), "details": output.details, "artifact": artifact,
        })
        current = output.model_path
        step_paths.append(current)

    run.check_cancel()
    evaluate = spec["evaluate"]
    target = spec.get("target")
    if target is not None and target.get("runtime", "onnxruntime") == "onnxruntime" and target.get("device") == "cuda":
        # ONNX Runtime on CUDA: nothing to lower; the steps' model and the original on the CUDA provider, beside the
        # original on the CPU provider (workers.measure.targets.load_gpu_target).
        target_report = {"spec": dict(target), "label": "ONNX Runtime CUDA",
                         "how_to_run": "onnxruntime.InferenceSession(path, providers=['CUDAExecutionProvider', "
                                       "'CPUExecutionProvider']) with onnxruntime-gpu"}
    elif target is not None and target.get("runtime", "onnxruntime") != "onnxruntime":
        # A target runtime: the steps' model is lowered to it and measured there, beside the original on ONNX
        # Runtime and on the target at f32 (the runtime's gain and the compression's).
        from workers.lowering import lower_for_target

        # No steps: the upload as it came (OpenVINO's frontend fuses more of it than of the normalized model).
        lowered = lower_for_target(run, target, current if steps else original, workdir, evaluate, input_shapes,
                                   share=(PREPARE + STEPS * (0.8 if steps else 0.0), PREPARE + STEPS))
        steps_report.append(lowered.record)
        step_paths = [lowered.path]
        run.progress(PREPARE + STEPS, "measuring", f"measuring the original on ONNX Runtime and on {lowered.label}, "
                     "and the result on it, side by side", force=True)
        target_report = lowered.report
    else:
        target, target_report = None, None
    # Every step's model is measured against the original, so the report shows the trajectory; the last
    # step's measurement is the job's result.
    rows = []
    trajectory = []
    for position, (entry, path) in enumerate(zip(steps_report[-len(step_paths):], step_paths)):
        last = position == len(step_paths) - 1
        share = (position / len(step_paths), (position + 1) / len(step_paths))
        what = "the result" if last else f"step {entry['index']}'s model ({entry['method']})"
        run.progress(PREPARE + STEPS + MEASURE * share[0], "measuring",
                     f"measuring the original and {what} side by side", force=True)
        measured_step = _measure(run, settings, evaluate, original, path, share, input_shapes, target=target)
        # Raw per-call times go to an artifact of their own; the report and the job row keep the statistics.
        samples_path = workdir / ("latency-samples.json" if last else f"step-{entry['index']}-latency-samples.json")
        samples_path.write_text(json.dumps(measured_step.pop("samples", {})))
        samples = run.store_artifact(samples_path, name=samples_path.name, kind="samples",
                                  content_type="application/json")
        measured_step["latency"]["samples_artifact"] = samples["name"]
        environment = measured_step.get("environment")
        step_rows = [r | {"environment": environment} for r in measured_step.pop("measurements", [])]
        if target is not None:  # the figures of the IR (result) and of the upload on the target runtime (runtime)
            shas = {"result": entry["artifact"]["sha256"], "runtime": file_sha256(model_path)}
            step_rows = [r | {"sha256": shas[r["model"]]} if r["model"] in shas else r for r in step_rows]
        if last:
            measured = measured_step
            rows += step_rows
        else:
            rows += [r | {"model": f"step-{entry['index']}", "sha256": entry["artifact"]["sha256"]}
                     for r in step_rows if r["model"] == "result"]
        trajectory.append(_trajectory_entry(entry, _summary(Measurement.model_validate(measured_step), [])))
    measurement = Measurement.model_validate(measured)
    summary = _summary(measurement, steps_report)
    summary.notes = [intake.note()] + summary.notes
    if len(trajectory) > 1:
        summary.trajectory = trajectory
    # Every job is judged against its budget; a not_beneficial one still hands over the steps' models (the user
    # asked for them), and its summary, message and dashboard lead with why.
    budget = Budget.from_evaluate(evaluate)
    summary.verdict = judge(summary, budget)
    pareto = pareto_front(job_points(summary, objective_batch(summary, budget)))
    report = JobReport(
        report_version=REPORT_VERSION, job_id=run.job_id, sandbox=run.sandbox, intake=intake.record,
        steps=[StepRecord.model_validate(s) for s in steps_report], evaluate=evaluate, measurement=measurement,
        summary=summary, artifacts=[ReportArtifact.model_validate(a) for a in run.artifacts]
        + [ReportArtifact(name="report.json", kind="report")], verdict=summary.verdict, pareto=pareto,
        recipe=recipe,
    )
    if spec.get("replay_of"):
        report.replay = replay.compare(spec["replay_of"], recipe, summary.model_dump(mode="json"), run.artifacts)
    if target_report is not None:
        report.target = target_report
    run.progress(0.97, "storing", "storing the report", force=True)
    report_path = workdir / "report.json"
    written = report.model_dump(mode="json", fallback=str)  # as json.dumps(default=str) wrote it before
    report_path.write_text(json.dumps(written, indent=2, default=str))
    run.store_artifact(report_path, name="report.json", kind="report", content_type="application/json")
    return written, written["summary"], rows


def _record_recipe(run: JobRun, workdir: Path, spec: dict, settings) -> dict:
    """The job's recipe (workers.replay), stored as recipe.json before any step runs: it says what the job was
    asked to do and on what, even where the job fails."""
    recipe = replay.build(spec, threads=settings.measure_threads or None)
    path = workdir / "recipe.json"
    path.write_text(json.dumps(recipe, indent=2, sort_keys=True, default=str))
    run.store_artifact(path, name="recipe.json", kind="recipe", content_type="application/json")
    return recipe


def run_method(run: JobRun, step: dict, current: Path, out_dir: Path, workdir: Path, input_shapes, *, seed: int,
               label: str, progress: Callable[..., None]) -> tuple[Any, Any]:
    """One method on `current`, writing into out_dir: (its StepOutput, the method). `step` is {"method", "params"}
    with the params as the job stores them (dataset and model ids resolved here). Errors name `label` ("step 2",
    "candidate int8_static"); a library error no specific code covers is step_failed, said to be the last resort."""
    method = methods.get(step["method"])
    params = method.params_model.model_validate(step["params"])
    try:
        step_datasets = {name: run.dataset(value) for name in method.dataset_params if (value := step["params"].get(name))}
        step_models = {name: run.model(value, workdir) for name in method.model_params if (value := step["params"].get(name))}
        ctx = methods.StepContext(
            calibration=step_datasets.get("calibration_dataset_id"), datasets=step_datasets, seed=seed,
            progress=progress, cancelled=run.cancel_requested_throttled, models=step_models, input_shapes=input_shapes,
        )
        # The step's seed also seeds the global generators (and torch's kernels for a method that trains), so a
        # replay of the job repeats the step byte for byte.
        replay.seed_everything(seed, trains=method.id.split(".")[0] in TRAINING_FAMILIES)
        # ONNX Runtime's tools drop temp files in the working directory (sym_shape_infer_temp.onnx
        # and its external data): keep them inside the job's folder.
        with contextlib.chdir(out_dir):
            return method.run(current, params, out_dir, ctx), method
    except ModelPressError as exc:
        exc.message = f"{label} ({method.id}) failed: {exc.message}"
        raise
    except Exception as exc:
        # The last resort: no specific code covers what the library raised. Say so, so that the user knows
        # this is ModelPress's gap, not a verdict on the model.
        raise JobFailed(f"{label} ({method.id}) failed with an error ModelPress has no specific code for "
                        f"(step_failed; please report it): {type(exc).__name__}: {exc}", code="step_failed") from exc


def _input_shapes(run: JobRun, spec: dict):
    """evaluate.input_shapes, then the sample shapes of the job's datasets: the eval dataset's, then each step's."""
    from workers.onnx_tools.inputs import job_input_shapes

    evaluate = spec["evaluate"]
    ids = [evaluate.get("eval_dataset_id")] + [step["params"].get(name) for step in spec["steps"]
                                               for name in methods.get(step["method"]).dataset_params] + [
        (spec.get("target") or {}).get("calibration_dataset_id")]
    return job_input_shapes(evaluate.get("input_shapes"), [run.dataset(i) for i in dict.fromkeys(ids) if i],
                            evaluate.get("input_values"))


def _measure(run: JobRun, settings, evaluate: dict, original: Path, candidate: Path, share: tuple[float, float],
             input_shapes=None, target: dict | None = None, *, at: tuple[float, float] | None = None,
             stage: str = "measuring", measurer=None, memory: bool = True, brief_below: float | None = None,
             session_sets: int | None = None) -> dict:
    """`share`: the part of the measuring phase this measurement is; `at`: instead, the part of the whole progress
    bar (a goal search's candidates). `measurer`: a workers.measure.isolated.MeasuringProcess to measure in (a goal
    search's, kept for all its candidates) instead of a process of its own; `memory`: whether peak memory is
    measured; `brief_below`, `session_sets`: MeasureSpec's (a search's candidate)."""
    from workers.measure import MeasureSpec, Stopped, measure_pair
    from workers.measure.isolated import measure_isolated

    low, high = at or (PREPARE + STEPS + MEASURE * share[0], PREPARE + STEPS + MEASURE * share[1])

    def on_progress(fraction: float, message: str) -> None:
        run.progress(low + (high - low) * fraction, stage, message)

    spec = MeasureSpec(
        batch_sizes=evaluate["batch_sizes"], warmup=evaluate["warmup"], iterations=evaluate["iterations"],
        providers=evaluate.get("providers"), threads=settings.measure_threads or None, on_progress=on_progress,
        should_stop=run.cancel_requested_throttled,
        dataset=run.dataset(evaluate["eval_dataset_id"]) if evaluate.get("eval_dataset_id") else None,
        dataset_max_samples=evaluate.get("eval_max_samples"), include_io=bool(evaluate.get("include_io")),
        energy_estimate_tdp_watts=evaluate.get("tdp_watts") if evaluate.get("energy_estimate") else None,
        input_shapes=input_shapes, target=target, memory=memory, brief_below=brief_below,
        session_sets=session_sets,
    )
    try:
        if measurer is not None:
            return measurer.measure(original, candidate, spec, timeout_s=settings.measure_timeout_s)
        if settings.measure_isolated:
            return measure_isolated(original, candidate, spec, timeout_s=settings.measure_timeout_s)
        return measure_pair(original, candidate, spec)
    except Stopped:
        raise Cancelled() from None


def _trajectory_entry(step: dict, summary: JobSummary) -> TrajectoryEntry:
    """One step's model against the original, in the summary's terms (size, p50, accuracy or fidelity)."""
    accuracy = summary.accuracy
    return TrajectoryEntry(
        step=step["index"], method=step["method"], artifact=step["artifact"]["name"],
        size_bytes=summary.compressed_size_bytes, size_ratio=summary.size_ratio,
        latency_p50_ms={b: v.compressed for b, v in summary.latency_p50_ms.items()},
        speedup=summary.speedup,
        top1=accuracy.compressed_top1 if accuracy else None,
        top1_drop_points=accuracy.top1_drop_points if accuracy else None,
        cosine=summary.fidelity.cosine_similarity if summary.fidelity else None,
        worst_cosine=summary.fidelity.worst_cosine if summary.fidelity else None,
        energy_j=(summary.energy_j_per_inference or {}).get("result"),
    )


def _summary(measured: Measurement, steps_report: list[dict]) -> JobSummary:
    latency, fidelity = measured.latency, measured.fidelity
    per_batch = latency.batch_sizes
    top1 = [o.top1_agreement for o in fidelity.outputs if o.top1_agreement is not None]
    figures: dict[str, Any] = dict(
        original_size_bytes=measured.size.baseline.file_bytes,
        compressed_size_bytes=measured.size.result.file_bytes,
        size_ratio=measured.size.ratio,
        latency_p50_ms={str(b.batch_size): P50Pair(original=b.baseline.p50_ms, compressed=b.result.p50_ms)
                        for b in per_batch},
        latency_p50_ratio={str(b.batch_size): b.p50_ratio for b in per_batch},
        speedup={str(b.batch_size): b.speedup for b in per_batch},
        speedup_ci={str(b.batch_size): b.speedup_text for b in per_batch if b.speedup_text is not None},
        speedup_interval={str(b.batch_size): _bounds(b.speedup_ci) for b in per_batch},
        noisy_batch_sizes=[b.batch_size for b in per_batch if b.noisy],
        provider=latency.provider,
        providers={p.provider: ({str(b.batch_size): b.speedup_text for b in p.latency.batch_sizes}
                                if p.available and p.latency else {"unavailable": p.reason or ""})
                   for p in measured.providers},
        cold_start_ms={role: ColdStartSummary(load=c.load_ms, first_run=c.first_run_ms)
                       for role, c in measured.cold_start.items() if isinstance(c, ColdStartRole)},
        energy_j_per_inference=measured.energy.value,
        energy_note=measured.energy.reason,
        fidelity=SummaryFidelity(cosine_similarity=fidelity.cosine_similarity, max_abs_diff=fidelity.max_abs_diff,
                                 top1_agreement=min(top1) if top1 else None),
        skipped_batch_sizes=latency.skipped,
        # What a step warns about (a slower int8 kernel, zeros that dense runtimes do not skip) is as
        # much a result as the figures.
        notes=measured.notes + [
            f"step {s['index']} ({s['method']}): {warning}"
            for s in steps_report for warning in s["details"].get("warnings", [])
        ],
        steps=[s["method"] for s in steps_report],
        # What was measured (at the smallest batch size) and where each size came from, per axis.
        input_shapes=measured.input_shapes,
        input_shapes_source=measured.input_shapes_source,
    )
    if fidelity.model_extra and fidelity.model_extra.get("worst_sample_cosine") is not None:
        figures["fidelity"].worst_cosine = fidelity.model_extra["worst_sample_cosine"]
    if fidelity.model_extra and fidelity.model_extra.get("not_compared"):
        figures["fidelity"].not_compared = fidelity.model_extra["not_compared"]
    target = measured.environment.get("target")
    if target:
        extra = [b.model_extra or {} for b in per_batch]
        figures.update(
            target=target,
            runtime_speedup={str(b.batch_size): e["runtime_speedup"] for b, e in zip(per_batch, extra)},
            runtime_speedup_ci={str(b.batch_size): e["runtime_speedup_text"] for b, e in zip(per_batch, extra)
                                if e.get("runtime_speedup_text")},
            compression_speedup={str(b.batch_size): e["compression_speedup"] for b, e in zip(per_batch, extra)},
            compression_speedup_ci={str(b.batch_size): e["compression_speedup_text"] for b, e in zip(per_batch, extra)
                                    if e.get("compression_speedup_text")},
        )
    return JobSummary(**(figures | _dataset_summary(measured.dataset)))


def _bounds(interval: SpeedupInterval) -> IntervalBounds:
    """A speedup's interval as numbers, with the reason where there is none (one round)."""
    reason = (interval.model_extra or {}).get("reason")
    return IntervalBounds(low=interval.low, high=interval.high, **({"reason": reason} if reason else {}))


def _dataset_summary(on: dict | None) -> dict[str, Any]:
    """With an eval dataset, fidelity is taken on it and accuracy is shown; random-input fidelity moves aside."""
    if not on:
        return {"fidelity_on": "synthetic random inputs (no eval dataset)", "accuracy": None}
    fid = on["fidelity"]
    acc = on["accuracy"]
    return {
        "fidelity_on": f"dataset {on['dataset'] or ''}".strip() + f" ({on['samples']} samples)",
        "fidelity": SummaryFidelity(cosine_similarity=fid["mean_cosine"], worst_cosine=fid["worst_cosine"],
                                    max_abs_diff=fid["max_abs_diff"], top1_agreement=fid["top1_agreement"],
                                    **({"not_compared": fid["not_compared"]} if fid.get("not_compared") else {})),
        "accuracy": None if acc is None else SummaryAccuracy(
            samples=acc["samples"],
            original_top1=acc["original"]["top1"], compressed_top1=acc["compressed"]["top1"],
            top1_drop_points=acc["top1_drop_points"],
            original_top5=acc["original"]["top5"], compressed_top5=acc["compressed"]["top5"],
        ),
        "accuracy_note": on["accuracy_note"],
    }
