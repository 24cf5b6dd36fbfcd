"""Benchmark (issue 19): ModelPress's default goal job against the best a user gets by hand, side by side in one
process.

Per model, the candidates (the side-by-side harness of bench/runtimes.py: same threads, static input shapes,
batch 1, interleaved rounds, ratios to ONNX Runtime fp32 with a bootstrap 95% interval over the paired rounds;
fidelity on the model's real samples, mean and worst-sample cosine, top-1 where labels exist):
- ONNX Runtime fp32, the original: the reference;
- plain ONNX Runtime, each call a user tries from its docs, on the same model: quantize_dynamic (defaults),
  quantize_static (QDQ, per-channel, calibrated on the same samples ModelPress is given; with the steps its docs and
  messages lead to: the model upgraded to opset 13 where older, quant_pre_process, per-tensor where per-channel
  still fails; the "runs at" column names the steps taken) and fp16
  (onnxruntime.transformers.float16.convert_float_to_float16, keep_io_types so the inputs stay float32);
- by hand: OpenVINO f32, OpenVINO at its default precision (bf16 where the CPU has it) and NNCF int8, as
  bench/runtimes.py builds them;
- ModelPress: one job per model with the default goal (fastest at batch 1 within worst-sample cosine 0.99) and the
  model's datasets named (goal.datasets eval and calibration; goal.time_budget_s 300 unless --time-budget), on an
  embedded deployment over HTTP; the model it hands over (model.onnx, or model_openvino.zip compiled with its
  openvino_config.json) is downloaded and timed here, or the row says none was handed over and why.

Search time is the job's (started to finished). It is divided by one plain quantization plus its measurement as the
service runs it: a quantize.int8_static steps job (int8_dynamic where static fails) with the same evaluate settings,
queued right after the goal job on the same deployment (goal 3's yardstick). In brackets, it is divided by one plain
quantize_static call plus one measure_pair of its model against the original as the search measures a candidate
(batch 1, 3 warm-up and 30 timed calls, fidelity on at most 64 eval samples, no memory probes), both in this
process: the stricter figure, without the service's per-job costs (a process per job, intake, measuring processes).

    .venv/bin/python bench/optimize.py [--only key1,key2] [--skip key1,key2] [--quick] [--time-budget S]
                                       [--no-write] [--threads N] [--at REV]

Without --only: every model of bench/runtimes.py (the shared models, the digits CNN, the BERT-like encoder and the
zoo corpus's ONNX uploads; its Hugging Face folder and Keras entries are not ONNX files, so no plain ONNX Runtime
call applies to them).

Phase 1 runs the goal jobs one after another (nothing else runs meanwhile: they measure too); phase 2 builds the
hand-made candidates and times everything. The tables and the goals read-out are appended to bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import shutil
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.client import Client, ModelPressError  # noqa: E402
from bench import runtimes as rt  # noqa: E402
from bench import zoo  # noqa: E402
from bench.results import publish  # noqa: E402

TITLE = "Goal search: default goal vs best by hand (issue 19)"
RESULT = "ModelPress default goal"
PLAIN = {"int8_dynamic": "plain ORT: quantize_dynamic", "int8_static": "plain ORT: quantize_static QDQ per-channel",
         "fp16": "plain ORT: fp16"}
MIN_COSINE, MAX_POINTS = 0.99, 1.0  # the default goal's budget; "within 1 point" of top-1 where there are labels
GOAL_SPEEDUP, GOAL_SEARCH_RATIO = 1.3, 10.0
# The search's per-candidate measurement (workers.search.run): the yardstick of "one measurement".
CANDIDATE_WARMUP, CANDIDATE_ITERATIONS, CANDIDATE_EVAL_SAMPLES = 3, 30, 64
PER_CHANNEL_OPSET = 13  # DequantizeLinear's `axis` (per-channel scales) exists from this opset on


# --- the ModelPress half: one default-goal job per model -------------------------------------------------------

@dataclass
class GoalJob:
    status: str = "not run"  # succeeded | failed | refused | not run
    code: str | None = None
    message: str | None = None
    seconds: float | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    search: dict[str, Any] = field(default_factory=dict)
    candidates: list[dict[str, Any]] = field(default_factory=list)
    result: Path | None = None  # model.onnx, or the IR's model.xml (openvino_config.json beside it)
    load: float | None = None  # the machine's 1-minute load average as the job finished
    # One plain quantization plus its measurement as the service runs it: a steps job (quantize.int8_static on the
    # calibration dataset, else int8_dynamic) with the same evaluate settings, started to finished.
    plain_job_s: float | None = None
    plain_job: str = "not run"

    @property
    def verdict(self) -> dict[str, Any]:
        return self.summary.get("verdict") or {}


def goal_body(ids: dict[str, Any], budget_s: int) -> dict[str, Any]:
    """The default goal (every field at its default) with the model's datasets named and the time budget set: the
    keywords of Client.optimize."""
    sets = {f"{role}_dataset_id": ids[role] for role in ("eval", "calibration") if ids.get(role)}
    return {"time_budget_s": budget_s, **({"datasets": sets} if sets else {})}


def goal_jobs(todo: list[rt.Subject], folder: Path, *, quick: bool, at: str | None, budget_s: int
              ) -> tuple[dict[str, GoalJob], str]:
    jobs = {s.key: GoalJob() for s in todo}
    with rt.embedded(folder, at, needs="goal") as (mp, deployment):
        if mp is None:
            for job in jobs.values():
                job.message = deployment
            return jobs, deployment + ": no ModelPress results"
        queued: list[tuple[rt.Subject, GoalJob, str, str, dict[str, Any], dict[str, Any], str | None]] = []
        for subject in todo:
            job = jobs[subject.key]
            try:
                model = mp.upload_model(subject.path, filename=subject.path.name)
                ids, refused = zoo.upload_datasets(mp, subject.data)
                if refused:
                    subject.notes.append(refused)
                evaluate = rt.job_evaluate(subject, ids["eval"], quick)
                sent = mp.optimize(model["id"], evaluate=evaluate, name=f"optimize {subject.key}",
                                   **goal_body(ids, budget_s))
            except ModelPressError as exc:
                job.status, job.code, job.message = "refused", exc.code, f"{exc.status}: {exc.message}"
                continue
            # The worker runs one job at a time, in order: the plain job runs after the goal job, alone.
            plain = submit_plain(mp, subject, model["id"], PLAIN_JOBS[0], ids, evaluate)
            queued.append((subject, job, sent["id"], model["id"], ids, evaluate, plain))
        for subject, job, job_id, model_id, ids, evaluate, plain in queued:
            collect(mp, subject, job, job_id, folder / "results" / subject.key)
            time_plain(mp, subject, job, plain, model_id, ids, evaluate)
    return jobs, deployment


# One plain quantization plus its measurement as a user of the service gets it: a steps job with the goal job's
# evaluate settings, int8_static calibrated on the model's calibration samples, int8_dynamic where that fails.
PLAIN_JOBS = ("quantize.int8_static", "quantize.int8_dynamic")


def submit_plain(mp: Client, subject: rt.Subject, model_id: str, method: str, ids: dict[str, Any],
                 evaluate: dict[str, Any]) -> str:
    """The plain job's id, or why it was refused (a string that is not an id: 'refused: <code>')."""
    params: dict[str, Any] = {}
    if method == "quantize.int8_static":
        calibration = ids.get("calibration") or ids.get("eval")
        params = {"calibration_dataset_id": calibration} if calibration else {"allow_random_calibration": True}
    try:
        return mp.submit_job(model_id, steps=[{"method": method, "params": params}], evaluate=evaluate,
                             name=f"plain {method} {subject.key}")["id"]
    except ModelPressError as exc:
        return f"refused: {exc.code}"


def time_plain(mp: Client, subject: rt.Subject, job: GoalJob, first: str, model_id: str, ids: dict[str, Any],
               evaluate: dict[str, Any]) -> None:
    """Waits for the plain job queued beside the goal job (`first`) and records its seconds; where it fails, the
    next of PLAIN_JOBS is run and timed."""
    tried = []
    for method in PLAIN_JOBS:
        job_id = first if method == PLAIN_JOBS[0] else submit_plain(mp, subject, model_id, method, ids, evaluate)
        if job_id.startswith("refused: "):
            tried.append(f"{method} {job_id}")
            continue
        done = mp.wait(job_id, poll_s=0.5, timeout_s=3600)
        if done["status"] == "succeeded":
            job.plain_job_s = rt.job_seconds(done)
            job.plain_job = f"a {method} job, {job.plain_job_s:.1f} s" + (f" ({'; '.join(tried)})" if tried else "")
            return
        tried.append(f"{method} {done['status']}: {(done.get('error') or {}).get('code')}")
    job.plain_job = "no plain job succeeded: " + "; ".join(tried)


def collect(mp: Client, subject: rt.Subject, job: GoalJob, job_id: str, out: Path) -> None:
    """The finished job's figures, its report's search and candidates, and the model it handed over."""
    done = mp.wait(job_id, poll_s=1.0, timeout_s=3600)
    job.status, job.seconds, job.load = done["status"], rt.job_seconds(done), os.getloadavg()[0]
    if done.get("error"):
        job.code, job.message = done["error"]["code"], done["error"]["message"]
    job.summary = done.get("summary") or {}
    verdict = job.verdict.get("verdict", "no verdict")
    if job.status == "succeeded":
        report = mp.report(job_id)
        job.search = report.get("search") or {}
        job.candidates = [c for c in report.get("candidates") or [] if isinstance(c, dict)]
        name = job.search.get("result_artifact")
        if name:
            try:
                path = mp.download(job_id, name, dest=out / name)
                if name.endswith(".zip"):
                    with zipfile.ZipFile(path) as archive:
                        archive.extractall(out)
                    path = out / "model.xml"
                job.result = path
            except (ModelPressError, zipfile.BadZipFile, OSError) as exc:
                job.message = f"download of {name}: {exc}"
    print(f"  {subject.key}: {job.status} {job.code or ''} {verdict} "
          f"{job.search.get('chosen') or job.search.get('closest') or ''} ({job.seconds or 0:.0f} s)", flush=True)


# --- the candidates made by hand --------------------------------------------------------------------------------

class Samples:
    """The CalibrationDataReader a user writes over their samples: one feed per call."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self.rows = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.rows, None)


def plain_call(scheme: str, subject: rt.Subject, out: Path) -> str:
    """One plain ONNX Runtime call, as its documentation shows it. Returns what was done beyond the call itself
    ("" where nothing was), for the table."""
    import onnx

    if scheme == "int8_dynamic":
        from onnxruntime.quantization import quantize_dynamic

        quantize_dynamic(str(subject.path), str(out))
    elif scheme == "int8_static":
        return plain_static(subject, out)
    else:
        from onnxruntime.transformers import float16

        onnx.save(float16.convert_float_to_float16(onnx.load(str(subject.path)), keep_io_types=True), str(out))
    return ""


def plain_static(subject: rt.Subject, out: Path) -> str:
    """quantize_static (QDQ, per-channel, on the calibration samples) with the steps ONNX Runtime's documentation and
    messages lead a user to: the model upgraded to opset 13 where it is older (DequantizeLinear has its per-channel
    `axis` only from opset 13; below it, ONNX Runtime writes a model that it then refuses to load, INVALID_GRAPH),
    then quant_pre_process (shape inference and graph optimization, which its quantizer asks for), then the call;
    per-tensor where per-channel still fails or its model does not load (ONNX Runtime's per-channel bias check
    breaks on a Gemm bias of shape [1, N], as opt-mnist's). Returns the steps taken, for the table."""
    import onnx
    import onnxruntime as ort
    from onnx import version_converter
    from onnxruntime.quantization import QuantFormat, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    steps, source = [], subject.path
    opset = next((o.version for o in onnx.load(str(source), load_external_data=False).opset_import
                  if o.domain in ("", "ai.onnx")), None)
    if opset is not None and opset < PER_CHANNEL_OPSET:
        try:
            upgraded = out.with_name(f"{out.stem}-opset{PER_CHANNEL_OPSET}.onnx")
            onnx.save(version_converter.convert_version(onnx.load(str(source)), PER_CHANNEL_OPSET), str(upgraded))
            source = upgraded
            steps.append(f"opset {opset} -> {PER_CHANNEL_OPSET} first")
        except Exception as exc:
            steps.append(f"opset {opset} kept (version_converter failed: {rt.short(exc, 80)})")
    prepared = out.with_name(f"{out.stem}-pre.onnx")
    try:
        quant_pre_process(str(source), str(prepared))
        source = prepared
        steps.append("quant_pre_process")
    except Exception as exc:
        steps.append(f"no pre-processing (quant_pre_process failed: {rt.short(exc, 80)})")

    def quantize(per_channel: bool) -> None:
        quantize_static(str(source), str(out), Samples(subject.calibration), quant_format=QuantFormat.QDQ,
                        per_channel=per_channel)
        ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])  # a model that does not load is a failure

    try:
        quantize(per_channel=True)
    except Exception as exc:
        steps.append(f"per-tensor (per-channel failed: {rt.short(exc, 120)})")
        try:
            quantize(per_channel=False)
        except Exception as again:
            raise RuntimeError("; ".join([*steps, f"per-tensor failed: {rt.short(again, 120)}"])) from again
    return "; ".join(steps)


def plain_candidates(subject: rt.Subject, folder: Path, threads: int, sizes: dict[str, int]) -> list[rt.Candidate]:
    out = []
    for scheme, name in PLAIN.items():
        path = folder / f"{subject.key}-{scheme}.onnx"
        started = time.perf_counter()
        try:
            with contextlib.chdir(folder):  # ONNX Runtime's quantizers leave temporary files in the working folder
                steps = plain_call(scheme, subject, path)
            candidate, _ = rt.ort_candidate(dataclasses.replace(subject, path=path), threads)
        except Exception as exc:  # a plain call that fails on a real model is a finding
            out.append(rt.Candidate(name, "plain", error=rt.short(exc)))
            continue
        candidate.name, candidate.group = name, "plain"
        candidate.runs_at = scheme + (f" ({steps})" if steps else "")
        candidate.build_s = time.perf_counter() - started
        sizes[name] = path.stat().st_size
        out.append(candidate)
    return out


def openvino_by_hand(subject: rt.Subject, folder: Path, outputs: list[str], threads: int,
                     sizes: dict[str, int]) -> list[rt.Candidate]:
    """bench/runtimes.py's hand-made OpenVINO candidates; NNCF's model is saved once so that its size is known."""
    import openvino as ov

    candidates = rt.hand_candidates(subject, outputs, threads)
    sizes[rt.HAND[0]] = sizes[rt.HAND[1]] = subject.path.stat().st_size  # compiled from the ONNX file itself
    with contextlib.suppress(Exception):  # no size where NNCF fails: its row says why
        import nncf

        options = {"model_type": nncf.ModelType.TRANSFORMER} if subject.transformer else {}
        xml = folder / f"{subject.key}-nncf.xml"
        ov.save_model(nncf.quantize(ov.Core().read_model(str(subject.path)), nncf.Dataset(subject.calibration),
                                    **options), str(xml))
        sizes[rt.HAND[2]] = xml.stat().st_size + xml.with_suffix(".bin").stat().st_size
    return candidates


def result_candidate(subject: rt.Subject, job: GoalJob, outputs: list[str], threads: int,
                     sizes: dict[str, int]) -> rt.Candidate:
    if job.result is None:
        why = (f"none handed over: {job.verdict.get('verdict', job.status)}: {job.verdict.get('reason', '')}"
               if job.status == "succeeded" else f"job {job.status}: {job.code or ''} {job.message or ''}")
        return rt.Candidate(RESULT, "modelpress", error=why.replace("\n", " "))
    if job.result.suffix == ".xml":
        # As the README says to run it: compiled with the artifact's openvino_config.json (runtimes does so).
        candidate = rt.modelpress_candidates(subject, {"result": rt.Job("result", xml=job.result)}, outputs,
                                             threads)[0]
        sizes[RESULT] = job.result.stat().st_size + job.result.with_suffix(".bin").stat().st_size
    else:
        try:
            candidate, _ = rt.ort_candidate(dataclasses.replace(subject, path=job.result), threads)
        except Exception as exc:
            candidate = rt.Candidate(RESULT, "modelpress", error=rt.short(exc))
        candidate.runs_at = "ONNX Runtime"
        sizes[RESULT] = job.result.stat().st_size
    candidate.name, candidate.group = RESULT, "modelpress"
    return candidate


def one_plain_round(subject: rt.Subject, folder: Path, threads: int) -> tuple[float | None, str]:
    """Seconds of one plain quantization (quantize_static; quantize_dynamic where it fails) plus one measurement of
    its model as the search measures a candidate, and what was timed."""
    from app.formats.input_shapes import InputShapes
    from workers.datasets import Dataset
    from workers.measure import measure_pair

    dataset = None
    if subject.data is not None:
        evl = subject.data.eval
        dataset = Dataset({k: v for k, v in evl.items() if k != "labels"}, labels=evl.get("labels"))
    shapes = InputShapes.parse(subject.input_shapes, subject.input_values)
    failed = []
    for scheme in ("int8_static", "int8_dynamic"):
        path = folder / f"{subject.key}-{scheme}-timed.onnx"
        started = time.perf_counter()
        try:
            with contextlib.chdir(folder):
                steps = plain_call(scheme, subject, path)
            quantized = time.perf_counter() - started
            measure_pair(subject.path, path, batch_sizes=[1], warmup=CANDIDATE_WARMUP, iterations=CANDIDATE_ITERATIONS,
                         threads=threads, dataset=dataset, dataset_max_samples=CANDIDATE_EVAL_SAMPLES,
                         input_shapes=shapes, memory=False)
        except Exception as exc:
            failed.append(f"{scheme} failed: {rt.short(exc, 90)}")
            continue
        total = time.perf_counter() - started
        what = scheme + (f" ({steps})" if steps else "")
        return total, f"{what} {quantized:.1f} s + measurement {total - quantized:.1f} s" + (
            f" ({'; '.join(failed)})" if failed else "")
    return None, "no plain quantization could be made and measured: " + "; ".join(failed)


# --- measuring --------------------------------------------------------------------------------------------------

@dataclass
class Compared:
    measured: rt.Measured
    job: GoalJob
    sizes: dict[str, int] = field(default_factory=dict)
    plain_round_s: float | None = None
    plain_round: str = ""

    @property
    def subject(self) -> rt.Subject:
        return self.measured.subject

    def named(self, name: str) -> rt.Candidate | None:
        return next((c for c in self.measured.candidates if c.name == name), None)


def compare(subject: rt.Subject, job: GoalJob, folder: Path, *, threads: int, timing: tuple[float, int, int]
            ) -> Compared:
    out = Compared(rt.Measured(subject, [], {}), job)
    m = out.measured
    try:
        reference, session = rt.ort_candidate(subject, threads)
    except Exception as exc:
        m.error = f"ONNX Runtime cannot load it: {rt.short(exc)}"
        return out
    out.sizes[rt.REFERENCE] = subject.path.stat().st_size
    outputs = [o.name for o in session.get_outputs()]
    m.candidates = [reference, *plain_candidates(subject, folder, threads, out.sizes),
                    *openvino_by_hand(subject, folder, outputs, threads, out.sizes),
                    result_candidate(subject, job, outputs, threads, out.sizes)]
    budget_s, max_rounds, sets = timing
    rt.side_by_side(m, reference, session, budget_s=budget_s, max_rounds=max_rounds, sets=sets)
    out.plain_round_s, out.plain_round = one_plain_round(subject, folder, threads)
    return out


# --- tables and goals -------------------------------------------------------------------------------------------

def faithful(c: rt.Candidate, reference: rt.Candidate | None, *, points: bool) -> bool:
    """Worst-sample cosine >= 0.99; with `points`, top-1 within 1 point of the original's also counts."""
    if c.worst_cos is not None and c.worst_cos >= MIN_COSINE:
        return True
    return bool(points and c.top1 is not None and reference and reference.top1 is not None
                and 100 * (reference.top1 - c.top1) <= MAX_POINTS)


def best_faithful(x: Compared, groups: tuple[str, ...]) -> rt.Candidate | None:
    """The fastest candidate of these groups at the default goal's worst-case fidelity (worst cos >= 0.99)."""
    fit = [c for c in x.measured.candidates if c.group in groups and c.vs_reference and faithful(c, None, points=False)]
    return max(fit, key=lambda c: c.vs_reference["speedup"], default=None)


def megabytes(x: Compared, name: str) -> str:
    size, original = x.sizes.get(name), x.sizes.get(rt.REFERENCE)
    if size is None:
        return "—"
    return f"{size / 1e6:.2f} MB" + (f" ({size / original:.2f}x)" if original and name != rt.REFERENCE else "")


def peer_text(x: Compared, c: rt.Candidate | None) -> str:
    from workers.measure.stats import show_speedup

    if c is None:
        return "none faithful"
    return f"{c.name.split(': ', 1)[1]} {show_speedup(c.vs_reference)}, worst cos {rt.cos_text(c.worst_cos)}"


def search_ratio(x: Compared) -> float | None:
    """The goal job's time over one plain job's on the same deployment (goal 3's yardstick)."""
    return x.job.seconds / x.job.plain_job_s if x.job.seconds and x.job.plain_job_s else None


def round_ratio(x: Compared) -> float | None:
    """The goal job's time over one plain quantization plus one measurement in this process, without the service's
    fixed costs (a process per job, intake, a measuring process): the stricter figure, for reference."""
    return x.job.seconds / x.plain_round_s if x.job.seconds and x.plain_round_s else None


def summary_rows(compared: list[Compared]) -> list[str]:
    from workers.measure.stats import show_speedup

    lines = ["| model | ModelPress result | vs ORT fp32 (95% interval) | size | mean cos | worst cos | top-1 | verdict | "
             "job time | / one plain job (/ in-process round) | best plain ORT (faithful) | best OpenVINO by hand "
             "(faithful) |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for x in compared:
        job, r = x.job, x.named(RESULT)
        handed = x.job.search.get("chosen")
        if r is not None and r.call is not None and r.vs_reference:
            what = f"{handed} ({r.runs_at})"
            figures = [show_speedup(r.vs_reference), megabytes(x, RESULT), rt.cos_text(r.mean_cos),
                       rt.cos_text(r.worst_cos), rt.fmt(None if r.top1 is None else 100 * r.top1, "{:.1f}%")]
        else:
            closest, best = job.search.get("closest"), job.search.get("best_in_search")
            why = (f" (closest: {closest})" if closest else f" ({best} met the goal in the search, not when measured "
                   "again)" if best else "")
            what = ("none handed over" + why if job.status == "succeeded"
                    else f"job {job.status}" + (f": **{job.code}**" if job.code else ""))
            if r is not None and r.error and handed:
                what = f"{handed}: not run here: {r.error}"
            figures = ["—"] * 5
        lines.append(f"| {x.subject.key} | {what.replace('|', '/')} | {' | '.join(figures)} | "
                     f"{job.verdict.get('verdict', '—')} | {rt.fmt(job.seconds, '{:.0f} s')} | "
                     f"{rt.fmt(search_ratio(x), '{:.1f}x')} ({rt.fmt(round_ratio(x), '{:.1f}x')}) | "
                     f"{peer_text(x, best_faithful(x, ('plain',)))} | "
                     f"{peer_text(x, best_faithful(x, ('hand',)))} |")
    return lines


def evidence(x: Compared) -> str:
    """The search's candidates as its report gives them: each one's own interval, worst cos and verdict."""
    parts = []
    for c in x.job.candidates:
        summary = c.get("summary") or {}
        ci = next(iter((summary.get("speedup_ci") or {}).values()), None)
        worst = (summary.get("fidelity") or {}).get("worst_cosine")
        said = (c.get("verdict") or {}).get("verdict") or c.get("status")
        error = (c.get("error") or {}).get("code")
        parts.append(f"{c.get('name')}: " + (f"{ci}, worst cos {rt.cos_text(worst)}, {said}" if ci else
                                              f"{c.get('status')}" + (f" ({error})" if error else "")))
    return "; ".join(parts) or "no candidates in the report"


def model_section(x: Compared) -> list[str]:
    lines = rt.model_table(x.measured) if not x.measured.error else [
        f"**{x.subject.key}**: not measured — {x.measured.error}"]
    if x.sizes:
        lines += ["", "Sizes: " + "; ".join(f"{name} {megabytes(x, name)}" for name in x.sizes)]
    job = x.job
    lines += ["", f"The goal job: {job.status}" + (f" ({job.code}: {job.message})" if job.code else "") +
              (f"; verdict {job.verdict.get('verdict')}: {job.verdict.get('reason')}" if job.verdict else "") +
              (f"; search {job.search.get('elapsed_s')} s of its {job.search.get('time_budget_s')} s budget, "
               f"candidates {job.search.get('candidates')}" if job.search else "") +
              f"; load average {rt.fmt(job.load, '{:.1f}')} as it finished" +
              f"; one plain job: {job.plain_job}; one plain round timed here: {x.plain_round}",
              "", f"Its candidates (the search's own measurements): {evidence(x)}"]
    return lines


def goal_result(x: Compared) -> tuple[str, str]:
    """(1) the result >= 1.3x at the fidelity budget and not behind the best faithful hand-made peer; else
    not_beneficial, every candidate's interval given as evidence."""
    from workers.measure.stats import show_speedup, speedup_interval

    reference, r, job = x.named(rt.REFERENCE), x.named(RESULT), x.job
    peer = best_faithful(x, ("plain", "hand"))
    if job.status != "succeeded":
        return "**not met**", f"the job {job.status}: {job.code}: {job.message}"
    if r is None or r.call is None or not r.vs_reference:
        if job.verdict.get("verdict") == "beneficial":
            return "**not met**", f"verdict beneficial but no result could be run here ({r.error if r else ''})"
        if peer is not None and peer.vs_reference["speedup"] >= GOAL_SPEEDUP:
            return "**not met**", (f"not_beneficial, but by hand {peer_text(x, peer)} meets {GOAL_SPEEDUP}x at worst "
                                   f"cos >= {MIN_COSINE}")
        measured = [c for c in job.candidates if c.get("status") == "measured"]
        missing = [c["name"] for c in measured if not (c.get("summary") or {}).get("speedup_ci")]
        if not measured or missing:
            return "**not met**", ("not_beneficial, but without every candidate's interval ("
                                   + (", ".join(missing) or "no candidate measured") + ")")
        return "met (not_beneficial)", (f"{job.verdict.get('reason')}; {len(measured)} candidates with their "
                                        "intervals in the report; best by hand at worst cos >= 0.99: "
                                        + peer_text(x, peer))
    ok_fidelity = faithful(r, reference, points=x.subject.labels is not None)
    ok_speed = r.vs_reference["speedup"] >= GOAL_SPEEDUP
    misses = [] if ok_speed else [f"{show_speedup(r.vs_reference)} < {GOAL_SPEEDUP}x"]
    if not ok_fidelity:
        misses.append(f"worst cos {rt.cos_text(r.worst_cos)} < {MIN_COSINE}" + (
            f" and top-1 {100 * r.top1:.1f}% vs {100 * reference.top1:.1f}%" if r.top1 is not None else ""))
    versus = "no hand-made peer at worst cos >= 0.99"
    if peer is not None:
        ratio = speedup_interval(peer.rounds, r.rounds, strata=x.measured.strata)
        level = ratio["speedup"] >= rt.SPEED_SLACK or (ratio["high"] is not None and ratio["high"] >= 1.0)
        ahead = ratio["low"] is not None and ratio["low"] > 1.0
        versus = (f"{show_speedup(ratio)} the speed of {peer_text(x, peer)} "
                  f"({'ahead' if ahead else 'level' if level else 'behind'})")
        if not level:
            misses.append(f"behind {peer.name}")
    head = f"{x.job.search.get('chosen')} {show_speedup(r.vs_reference)} at worst cos {rt.cos_text(r.worst_cos)}"
    return ("met" if not misses else "**not met**"), f"{head}; {versus}" + (
        f" — misses: {'; '.join(misses)}" if misses else "")


def goal_no_slowdown(x: Compared) -> tuple[str, str]:
    """(2) nothing slower than the original labelled beneficial: the result as timed here, each candidate as the
    search measured it."""
    from workers.measure.stats import show_speedup

    r, job = x.named(RESULT), x.job
    wrong = []
    for c in job.candidates:
        if (c.get("verdict") or {}).get("verdict") != "beneficial":
            continue
        bounds = next(iter(((c.get("summary") or {}).get("speedup_interval") or {}).values()), {}) or {}
        if (bounds.get("low") or 0.0) <= 1.0:
            wrong.append(f"candidate {c['name']} beneficial at {bounds}")
    if job.verdict.get("verdict") == "beneficial" and r is not None and r.vs_reference:
        if r.vs_reference["speedup"] < 1.0:
            wrong.append(f"the result, beneficial, runs {show_speedup(r.vs_reference)} here")
        here = f"the result runs {show_speedup(r.vs_reference)} here"
    else:
        here = f"verdict {job.verdict.get('verdict', job.status)}"
    return ("**not met**" if wrong else "met"), "; ".join([here, *wrong])


def goal_search_time(x: Compared) -> tuple[str, str]:
    ratio, strict = search_ratio(x), round_ratio(x)
    beside = (f"; {strict:.1f}x one plain round in this process ({x.plain_round})" if strict is not None
              else f"; in this process: {x.plain_round}")
    if ratio is None:
        return "n/a", f"job {rt.fmt(x.job.seconds, '{:.0f} s')}; plain job: {x.job.plain_job}" + beside
    return ("met" if ratio <= GOAL_SEARCH_RATIO else "**not met**"), (
        f"{x.job.seconds:.1f} s = {ratio:.1f}x one plain job ({x.job.plain_job})" + beside)


def goal_yolox(x: Compared) -> tuple[str, str]:
    """(4) a faithful result faster than fp32 (its interval above 1), or the evidence that none exists."""
    from workers.measure.stats import show_speedup

    r = x.named(RESULT)
    if r is not None and r.vs_reference and (r.worst_cos or 0) >= MIN_COSINE and (r.vs_reference["low"] or 0) > 1.0:
        return "met", f"{x.job.search.get('chosen')} {show_speedup(r.vs_reference)} at worst cos {rt.cos_text(r.worst_cos)}"
    faster = [c for c in x.measured.candidates if c.group in ("plain", "hand") and c.vs_reference
              and (c.worst_cos or 0) >= MIN_COSINE and (c.vs_reference["low"] or 0) > 1.0]
    mixed = [c for c in x.job.candidates if c.get("family") == "mixed_precision"]
    found = [c["name"] for c in x.job.candidates if (c.get("verdict") or {}).get("verdict") == "beneficial"]
    tried = f"the search's candidates: {evidence(x)}"
    if faster:
        return "**not met**", (f"none handed over, yet by hand {', '.join(peer_text(x, c) for c in faster)}; "
                               + tried)
    if found:
        return "**not met**", (f"the search found {', '.join(found)} faithful and faster but handed none over "
                               f"({x.job.verdict.get('reason')}); " + tried)
    return ("met (evidence none exists)" if mixed else "**not met**"), (
        ("" if mixed else "no mixed-precision candidate was tried; ") + "nothing by hand is faithful and faster "
        "either; " + tried)


def readout(compared: list[Compared]) -> list[str]:
    measured = [x for x in compared if not x.measured.error]
    goals = [
        (f"(1) the result >= {GOAL_SPEEDUP}x faster than ONNX Runtime fp32 here at worst cos >= {MIN_COSINE} (or "
         f"top-1 within {MAX_POINTS:g} point where labels exist) and not behind the fastest hand-made peer at worst cos "
         f">= {MIN_COSINE} (its p50 over ours >= {rt.SPEED_SLACK} or an interval reaching 1: 'level'; an interval "
         "above 1: 'ahead'); where not, verdict not_beneficial with every candidate's interval in the report (and "
         f"nothing by hand reaching {GOAL_SPEEDUP}x faithfully)", goal_result, measured),
        ("(2) no result slower than the original labelled beneficial (the result as timed here; every candidate "
         "labelled beneficial has its own interval above 1)", goal_no_slowdown, measured),
        (f"(3) the job takes at most {GOAL_SEARCH_RATIO:g}x one plain quantization plus one measurement of it: a "
         "quantize.int8_static steps job on the same deployment with the same evaluate settings (int8_dynamic where "
         "static fails), started to finished; beside it, one plain quantize_static call plus one measure_pair in "
         "this process, without the service's per-job costs",
         goal_search_time, measured),
        (f"(4) YOLOX-nano: a faithful (worst cos >= {MIN_COSINE}) result faster than fp32 (interval above 1), or the "
         "evidence that none exists", goal_yolox, [x for x in measured if x.subject.key == "yolox-nano"]),
    ]
    lines = []
    for text, check, over in goals:
        lines += [f"Goal {text}:", ""]
        missed = []
        for x in over:
            outcome, detail = check(x)
            if "not met" in outcome:
                missed.append(x.subject.key)
            lines.append(f"- {x.subject.key}: {outcome} — {detail}")
        lines += ["", f"Over {len(over)} model(s): " + (f"**not met** on {', '.join(missed)}" if missed
                                                        else "met on every model" if over else "not in this run"), ""]
    skipped = [x.subject.key for x in compared if x.measured.error]
    if skipped:
        lines.append(f"Not measured (no goal judged): {', '.join(skipped)}.")
    return lines


# --- main -------------------------------------------------------------------------------------------------------

def selection(only: str | None, skip: str | None) -> str | None:
    """The comma-separated keys to run (None: all) from --only and --skip. The keys are bench/runtimes.py's subjects:
    the corpus's ONNX uploads, the digits CNN and the BERT-like encoder. A corpus entry uploaded otherwise (a Hugging
    Face folder, a Keras file) is refused with the reason: a plain ONNX Runtime call needs an ONNX file."""
    known = [e.key for e in zoo.CORPUS if e.upload == "onnx"] + ["digits-cnn", "bert"]
    not_onnx = {e.key: e.upload for e in zoo.CORPUS if e.upload != "onnx"}
    wanted = [k for k in (only or "").split(",") if k]
    skipped = {k for k in (skip or "").split(",") if k}
    for key in wanted:
        if key in not_onnx:
            raise SystemExit(f"{key} is a {not_onnx[key]} upload, not in this benchmark: the plain ONNX Runtime calls "
                             "it compares with need an ONNX file (the corpus's ONNX uploads are).")
    unknown = sorted((set(wanted) | skipped) - set(known) - set(not_onnx))
    if unknown:
        raise SystemExit(f"unknown keys {unknown}; known: {', '.join(known)}")
    if not skipped:
        return only
    left = [k for k in (wanted or known) if k not in skipped]
    if not left:
        raise SystemExit("--skip leaves no model to run.")
    return ",".join(left)


def main() -> int:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    rt.bench_options(parser, quick="a shorter timing budget and shorter final measurements")
    parser.add_argument("--skip", help="comma-separated model keys to leave out (of --only's, or of all)")
    parser.add_argument("--time-budget", type=int, default=300, help="goal.time_budget_s of each job (default 300)")
    args = parser.parse_args()
    only = selection(args.only, args.skip)
    started = time.time()
    timing = rt.timing(args.quick)
    folder = Path(tempfile.mkdtemp(prefix="optimize-"))
    try:
        todo = rt.prepared(folder, only)
        ready = [s for s in todo if s.feeds]
        jobs = {s.key: GoalJob(message="not run") for s in todo}
        deployment = "no model could be prepared"
        if ready:
            print(f"phase 1: {len(ready)} goal jobs", flush=True)
            done, deployment = goal_jobs(ready, folder, quick=args.quick, at=args.at, budget_s=args.time_budget)
            jobs.update(done)
        compared = []
        for s in todo:
            if not s.feeds:
                compared.append(Compared(rt.Measured(s, [], {}, error="; ".join(s.notes) or "no inputs"), jobs[s.key]))
                continue
            print(f"phase 2: {s.key} (at {time.time() - started:.0f} s)", flush=True)
            x = compare(s, jobs[s.key], folder, threads=args.threads, timing=timing)
            compared.append(x)
            print("\n".join(model_section(x)), flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    body = [*summary_rows(compared), ""]
    for x in compared:
        body += [*model_section(x), ""]
    body += readout(compared)
    import nncf
    import onnxruntime as ort
    import openvino as ov

    how = (f"Per model, in one process: ONNX Runtime fp32, the plain ONNX Runtime calls (quantize_dynamic; "
           f"quantize_static QDQ per-channel on the calibration samples, after an opset upgrade to 13 where older and "
           f"quant_pre_process, per-tensor where per-channel fails; fp16 with keep_io_types), OpenVINO f32 / "
           f"default / NNCF int8 by hand, and the model ModelPress's default goal job handed over ({deployment}; "
           f"goal.time_budget_s {args.time_budget}, the eval and calibration datasets named, every other goal field "
           f"at its default), timed interleaved ({'--quick: ' if args.quick else ''}about {timing[0]:.0f} s of calls "
           f"per model over {timing[2]} session sets, the order rotated each round), {args.threads} threads each, "
           "batch 1 at static input shapes; "
           f"onnxruntime {ort.__version__}, openvino {ov.__version__}, nncf {nncf.__version__}. Ratios: median ORT "
           "fp32 / median candidate, bootstrap 95% interval over the paired rounds, two-level (session sets, then "
           "rounds). 'job time': the goal job, started to finished; divided by a plain quantize.int8_static steps "
           "job's (int8_dynamic where static fails) on the same deployment, run right after it with the same "
           "evaluate settings; in brackets, divided by one plain quantize_static call plus one measure_pair of its "
           "model as the search measures a candidate (no memory probes), timed in this process.")
    publish(TITLE, how, "\n".join(body), started=started, write=not args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
