"""Benchmark (issue 18): OpenVINO / NNCF done by hand, as a user would, against ModelPress's OpenVINO target, both
beside ONNX Runtime fp32, all timed side by side in one process.

Per model, the candidates:
- ONNX Runtime fp32, the original: the reference of every ratio and of fidelity;
- by hand: OpenVINO f32 (core.read_model(onnx), compiled with INFERENCE_PRECISION_HINT f32), OpenVINO at its default
  precision (no hint: bf16 on a CPU with AVX512-BF16 or AMX), and NNCF int8 (nncf.quantize(model,
  nncf.Dataset(samples)), model_type=TRANSFORMER for the transformers, compiled with defaults) on the calibration
  samples ModelPress is given;
- ModelPress: one job per precision (f32, bf16, int8) with `target: {runtime: openvino, device: cpu, precision}`
  on an embedded deployment (`modelpress run`), over HTTP with app.client; the job's IR (model_openvino.zip) is
  downloaded and compiled here as the README says to run it (compile_model(xml, "CPU", openvino_config.json's
  settings), the threads set as for every candidate). The jobs' own reported speedups
  (total, runtime's, compression's) are kept as a second, independent measurement.

Every candidate runs with the same threads (ONNX Runtime intra-op threads with spinning off, as the worker's
sessions; OpenVINO INFERENCE_NUM_THREADS, NUM_STREAMS 1, PERFORMANCE_HINT LATENCY, CPU pinning off) at the
model's input shapes, batch 1 (or the model's fixed batch); every OpenVINO model is reshaped to those static shapes
before it is compiled, as ModelPress's harness does, so the candidates differ in the model and its precision, not
in the compile mode.
Latency: interleaved rounds (the order rotates every round), a short block of calls per candidate per round,
per-call times, over session sets (every session opened anew for each); p50 and the ratio to ONNX Runtime fp32 with
a bootstrap 95% interval over the paired rounds, two-level over the session sets
(workers.measure.stats.speedup_interval). Fidelity against ONNX Runtime fp32 on the model's real samples (random
inputs where the corpus has none): mean and worst-sample cosine over all float outputs (padded positions,
attention_mask 0, left out, as the worker does), top-1 where labels exist.

Models: ../shared/models (opt-mnist, ultraface, yolox-nano), the digits CNN and the BERT-like encoder of
bench/quantize.py, and the ONNX uploads of bench/zoo.py's corpus (fetched into bench/.zoo-cache/).

    .venv/bin/python bench/runtimes.py [--only key1,key2] [--quick] [--no-modelpress] [--no-write] [--threads N]
                                [--at REV]

Phase 1 runs the ModelPress jobs (nothing else runs meanwhile: the jobs measure too); phase 2 builds the hand-made
candidates and times everything. The tables and the goals read-out are appended to bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shutil
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.client import Client, ModelPressError  # noqa: E402
from bench import zoo  # noqa: E402
from bench.common import snapshot  # noqa: E402
from bench.quantize import bert_case, digits_case  # noqa: E402
from bench.results import publish  # noqa: E402

TITLE = "Runtimes: OpenVINO / NNCF by hand vs ModelPress's OpenVINO target (issue 18)"
PRECISIONS = ("f32", "bf16", "int8", "int8_bf16")
REFERENCE = "ONNX Runtime fp32"
HAND = ("by hand: OpenVINO f32", "by hand: OpenVINO default", "by hand: NNCF int8")
FIDELITY_SLACK = 0.001  # goal A: "equal worst-case fidelity" within this much cosine
SPEED_SLACK = 0.97      # goal A: "at least as fast" within 3% noise (or an interval that reaches 1)
GOAL_B_COSINE, GOAL_B_SPEEDUP = 0.99, 2.0
MAX_EVAL, MAX_CALIBRATION = 64, 300
BLOCK_S = 0.025         # the length of one candidate's block of calls in a round
IR = "model_openvino.zip"


# --- the models ---------------------------------------------------------------------------------------------

@dataclass
class Subject:
    key: str
    title: str
    path: Path
    data: zoo.Data | None
    transformer: bool = False
    input_shapes: dict[str, Any] | None = None
    input_values: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    # filled by prepare()
    kind: str = ""                      # "CNN" (goal B applies), "transformer", "recurrent", ...
    feeds: list[dict[str, np.ndarray]] = field(default_factory=list)   # eval samples, one run each
    labels: list[np.ndarray] | None = None
    calibration: list[dict[str, np.ndarray]] = field(default_factory=list)
    shapes: dict[str, list[int]] = field(default_factory=dict)
    samples_what: str = ""


def case_subject(key: str, case) -> Subject:
    """A bench/quantize.py case (workers.datasets.Dataset eval and calibration) as a subject."""
    evl = dict(case.eval.inputs)
    if case.eval.labels is not None:
        evl["labels"] = case.eval.labels
    return Subject(key, case.name, case.path, zoo.Data(eval=evl, what=case.eval.name or "",
                                                       calibration=dict(case.calibration.inputs)),
                   transformer=key == "bert", notes=list(case.notes))


def subjects(tmp: Path, only: set[str] | None) -> list[Subject]:
    """The shared models first, then the digits CNN and the BERT-like encoder, then the rest of the zoo corpus
    (its ONNX uploads: the Hugging Face folder and Keras entries have ONNX twins or none)."""
    corpus = [e for e in zoo.CORPUS if e.upload == "onnx"]
    order = [e for e in corpus if isinstance(e.source, zoo.Shared)]
    makers: list[tuple[str, Callable[[], Subject]]] = [(e.key, lambda e=e: zoo_subject(e)) for e in order]
    makers += [("digits-cnn", lambda: case_subject("digits-cnn", digits_case(tmp))),
               ("bert", lambda: case_subject("bert", bert_case(tmp)))]
    makers += [(e.key, lambda e=e: zoo_subject(e)) for e in corpus if e not in order]
    if only:
        unknown = only - {key for key, _ in makers}
        if unknown:
            raise SystemExit(f"unknown keys {sorted(unknown)}; known: {', '.join(k for k, _ in makers)}")
    out = []
    for key, make in makers:
        if only and key not in only:
            continue
        try:
            out.append(make())
        except Exception as exc:  # a model that cannot be fetched or built is a row, not a crash
            out.append(Subject(key, key, Path("/nonexistent"), None,
                               notes=[f"not available: {type(exc).__name__}: {str(exc)[:200]}"]))
    return out


def zoo_subject(entry: zoo.Entry) -> Subject:
    return Subject(entry.key, entry.title, zoo.resolve(entry), entry.data() if entry.data else None,
                   transformer="transformer" in entry.category, input_shapes=entry.input_shapes,
                   input_values=entry.input_values, notes=list(entry.notes))


def prepare(subject: Subject) -> None:
    """The model's kind, its static input shapes and its eval and calibration feeds, as ModelPress plans them
    (workers.onnx_tools.inputs.plan_inputs over the given shapes and the datasets' sample shapes)."""
    import onnx
    import onnxruntime as ort

    from app.formats.input_shapes import InputShapes
    from workers.onnx_tools.inputs import ORT_DTYPES, plan_inputs

    info = zoo.inspect(subject.path)
    if info["quantized"]:
        subject.kind = "already quantized"
    elif subject.transformer:
        subject.kind = "transformer"
    elif info["recurrent"]:
        subject.kind = "recurrent (LSTM/GRU)"
    elif info["conv"]:
        subject.kind = "CNN"
    else:
        subject.kind = "other"
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(subject.path), options, providers=["CPUExecutionProvider"])
    structure = onnx.load(str(subject.path), load_external_data=False)
    shapes = InputShapes.parse(subject.input_shapes, subject.input_values)
    if subject.data is not None:
        shapes = shapes.with_dataset("eval", {k: v.shape for k, v in subject.data.eval.items()})
    plan = plan_inputs({"baseline": session, "result": session}, {"baseline": structure, "result": structure},
                       shapes=shapes)
    batch = plan.fixed_batch or 1
    dtypes = {i.name: np.dtype(ORT_DTYPES[i.type]) for i in session.get_inputs() if i.type in ORT_DTYPES}

    def per_sample(arrays: dict[str, np.ndarray], limit: int, seed: int) -> list[dict[str, np.ndarray]]:
        count = min(len(v) for k, v in arrays.items() if k != "labels")
        feeds = []
        for n, start in enumerate(range(0, count - batch + 1, batch)):
            if n >= limit:
                break
            feed = plan.feeds(batch, np.random.default_rng(seed + n))["baseline"]  # inputs the data lacks
            feed.update({k: np.ascontiguousarray(v[start:start + batch].astype(dtypes.get(k, v.dtype)))
                         for k, v in arrays.items() if k in feed})
            feeds.append(feed)
        return feeds

    if subject.data is not None:
        subject.feeds = per_sample(subject.data.eval, MAX_EVAL, 0)
        if "labels" in subject.data.eval:
            labels = subject.data.eval["labels"]
            subject.labels = [labels[i * batch:(i + 1) * batch] for i in range(len(subject.feeds))]
        calibration = subject.data.calibration or {k: v for k, v in subject.data.eval.items() if k != "labels"}
        subject.calibration = per_sample(calibration, MAX_CALIBRATION, 10_000)
        subject.samples_what = subject.data.what
    else:
        # No real samples: random draws as ModelPress makes them, for fidelity and for calibration alike.
        subject.feeds = [plan.feeds(batch, np.random.default_rng(i))["baseline"] for i in range(16)]
        subject.calibration = [plan.feeds(batch, np.random.default_rng(10_000 + i))["baseline"]
                               for i in range(MAX_CALIBRATION)]
        subject.samples_what = "random inputs (the corpus has no samples for this model)"
    subject.shapes = {k: list(v.shape) for k, v in subject.feeds[0].items()}


# --- the ModelPress half: jobs on an embedded deployment ---------------------------------------------------

@dataclass
class Job:
    precision: str
    status: str = "not run"  # succeeded | failed | refused | not run
    code: str | None = None
    message: str | None = None
    seconds: float | None = None
    xml: Path | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    lowering: dict[str, Any] = field(default_factory=dict)


def job_evaluate(subject: Subject, eval_id: str | None, quick: bool) -> dict[str, Any]:
    spec: dict[str, Any] = {"batch_sizes": [1], "warmup": 3 if quick else 5, "iterations": 12 if quick else 30}
    if eval_id:
        spec.update(eval_dataset_id=eval_id, eval_max_samples=MAX_EVAL)
    if subject.input_shapes:
        spec["input_shapes"] = subject.input_shapes
    if subject.input_values:
        spec["input_values"] = subject.input_values
    return spec


def modelpress_half(todo: list[Subject], folder: Path, *, quick: bool, at: str | None
                    ) -> tuple[dict[str, dict[str, Job]], str]:
    """One job per subject x precision, all queued, then awaited; each succeeded job's IR downloaded and unzipped.
    The service runs this working tree, or a snapshot of commit `at`. Returns the jobs and a line on the deployment
    (its code and targets, or why there are no ModelPress candidates)."""
    jobs: dict[str, dict[str, Job]] = {s.key: {p: Job(p) for p in PRECISIONS} for s in todo}
    with embedded(folder, at, needs="target") as (mp, deployment):
        if mp is None:
            for per in jobs.values():
                for job in per.values():
                    job.message = deployment
            return jobs, deployment + ": no ModelPress candidates"
        queued: list[tuple[Subject, Job, str]] = []
        for subject in todo:
            try:
                model = mp.upload_model(subject.path, filename=subject.path.name)
            except ModelPressError as exc:
                for job in jobs[subject.key].values():
                    job.status, job.code, job.message = "refused", exc.code, f"upload: {exc.message}"
                continue
            ids, refused = zoo.upload_datasets(mp, subject.data)
            if refused:
                subject.notes.append(refused)
            for job in jobs[subject.key].values():
                target = {"runtime": "openvino", "device": "cpu", "precision": job.precision}
                if job.precision.startswith("int8") and ids.get("calibration"):
                    target["calibration_dataset_id"] = ids["calibration"]
                try:
                    sent = mp.submit_job(model["id"], target=target, evaluate=job_evaluate(subject, ids["eval"], quick),
                                         name=f"runtimes {subject.key} {job.precision}")
                except ModelPressError as exc:
                    job.status, job.code, job.message = "refused", exc.code, f"{exc.status}: {exc.message}"
                    continue
                queued.append((subject, job, sent["id"]))
        for subject, job, job_id in queued:
            done = mp.wait(job_id, poll_s=1.0, timeout_s=3600)
            job.status = done["status"]
            job.seconds = job_seconds(done)
            if done.get("error"):
                job.code, job.message = done["error"]["code"], done["error"]["message"]
            job.summary = done.get("summary") or {}
            print(f"  {subject.key} {job.precision}: {job.status} {job.code or ''} ({job.seconds or 0:.0f} s)",
                  flush=True)
            if job.status != "succeeded":
                continue
            with contextlib.suppress(ModelPressError, KeyError):
                job.lowering = (mp.report(job_id).get("target") or {}).get("lowering") or {}
            out = folder / "ir" / subject.key / job.precision
            try:
                with zipfile.ZipFile(mp.download(job_id, IR, dest=out / IR)) as archive:
                    archive.extractall(out)
                job.xml = out / "model.xml"
            except (ModelPressError, zipfile.BadZipFile, OSError) as exc:
                job.message = f"IR download: {exc}"
    return jobs, deployment


@contextlib.contextmanager
def embedded(folder: Path, at: str | None, *, needs: str) -> Iterator[tuple[Client | None, str]]:
    """A client of an embedded deployment of this working tree (or of a snapshot of commit `at`), and a line on it:
    its code and the targets it serves; no client, and the line says why, where its jobs take no field `needs`."""
    source, code = ROOT, "the working tree"
    if at:
        source, commit = snapshot(at, folder, ROOT)
        code = f"commit {commit}"
    with zoo.Embedded(folder, source) as service, Client(service.url, service.key, timeout=300) as mp:
        schema = mp._json("GET", "/openapi.json")["components"]["schemas"]
        if needs not in schema.get("JobCreate", {}).get("properties", {}):
            yield None, f"the service ({code}) takes no job {needs} yet (JobCreate.{needs}): nothing submitted"
            return
        listed = served_targets(mp)
        line = f"an embedded deployment of {code} serving {', '.join(listed) or 'no targets'}"
        print(line, flush=True)
        yield mp, line


def served_targets(mp: Client, wait_s: float = 180) -> list[str]:
    """runtime/device/precision of what the live workers serve, once the worker has registered its OpenVINO
    targets (it does so when it is ready, which takes a while after the API answers) or after wait_s."""
    deadline = time.monotonic() + wait_s
    while True:
        listed = ["/".join(str(t[k]) for k in ("runtime", "device", "precision") if t.get(k))
                  for t in mp.targets().get("targets", []) if t.get("workers", 1)]
        if any(t.startswith("openvino/") for t in listed) or time.monotonic() > deadline:
            return listed
        time.sleep(2)


def job_seconds(job: dict[str, Any]) -> float | None:
    """Started to finished, from the job's own timestamps (the queue wait left out)."""
    import datetime as dt

    try:
        start, end = (dt.datetime.fromisoformat(job[k]) for k in ("started_at", "finished_at"))
    except (KeyError, TypeError, ValueError):
        return None
    return (end - start).total_seconds()


# --- the candidates -----------------------------------------------------------------------------------------

@dataclass
class Candidate:
    name: str
    group: str  # reference | hand | modelpress
    call: Callable[[dict[str, np.ndarray]], list[np.ndarray]] | None = None
    renew: Callable[[], Callable[[dict[str, np.ndarray]], list[np.ndarray]]] | None = None  # a fresh session's call
    runs_at: str = ""   # the inference precision the compiled model reports
    runtime: str = "onnxruntime"  # whose threads run it: a block after another runtime's settles first
    error: str | None = None
    build_s: float | None = None
    rounds: list[list[int]] = field(default_factory=list)
    p50_ms: float | None = None
    vs_reference: dict[str, Any] | None = None
    mean_cos: float | None = None
    worst_cos: float | None = None
    top1: float | None = None


def short(exc: BaseException, limit: int = 240) -> str:
    """One line of an error; of OpenVINO's conversion report, its summary (which ops failed), not its preamble."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if "Conversion is failed for:" in text:
        text = "OpenVINO cannot convert the ONNX model: " + text.split("Summary:", 1)[-1].strip(" -")
    return text if len(text) <= limit else text[:limit - 3] + "..."


def ort_candidate(subject: Subject, threads: int) -> tuple[Candidate, Any]:
    import onnxruntime as ort

    from workers.measure.runtime import session_options

    def open_session():
        session = ort.InferenceSession(str(subject.path), session_options(threads), providers=["CPUExecutionProvider"])
        return session, lambda feed: session.run(None, feed)

    session, call = open_session()
    return Candidate(REFERENCE, "reference", call=call, renew=lambda: open_session()[1], runs_at="fp32"), session


def openvino_config(threads: int, hint: str | None) -> dict[str, Any]:
    """What every OpenVINO candidate is compiled with. CPU pinning off: on a machine others load too, a compiled
    model whose threads are pinned to the busier core stays slow for the whole run while its neighbours are not
    (two identical IRs measured 10-40% apart here with pinning; within 3% without)."""
    config: dict[str, Any] = {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY",
                              "ENABLE_CPU_PINNING": False}
    if hint:
        config["INFERENCE_PRECISION_HINT"] = hint
    return config


def openvino_candidate(name: str, group: str, build: Callable[[], Any], subject: Subject, outputs: list[str],
                       config: dict[str, Any]) -> Candidate:
    """A candidate from build() -> ov.Model, reshaped to the subject's static shapes and compiled for the CPU; its
    outputs in ONNX Runtime's order (by tensor name, else by position). Any failure is the candidate's error."""
    import openvino as ov

    candidate = Candidate(name, group, runtime="openvino")
    started = time.perf_counter()
    try:
        model = build()
        ports = {}
        for port in model.inputs:
            feed_name = next((n for n in port.get_names() if n in subject.shapes), None)
            if feed_name is None:
                raise RuntimeError(f"no sample for OpenVINO input {port.get_any_name()!r}")
            ports[port.get_any_name()] = feed_name
        if any(p.get_partial_shape().is_dynamic for p in model.inputs):
            model.reshape({port: ov.PartialShape(subject.shapes[feed]) for port, feed in ports.items()})

        def open_compiled():
            compiled = ov.Core().compile_model(model, "CPU", config)
            request = compiled.create_infer_request()
            feed_names = [ports[p.get_any_name()] for p in compiled.inputs]
            by_name = {n: port for port in compiled.outputs for n in port.get_names()}
            out_ports = [by_name.get(n, compiled.outputs[i] if i < len(compiled.outputs) else None)
                         for i, n in enumerate(outputs)]

            def call(feed: dict[str, np.ndarray]) -> list[np.ndarray]:
                result = request.infer([feed[n] for n in feed_names], share_inputs=True)
                return [result[p] for p in out_ports]

            return compiled, call

        compiled, candidate.call = open_compiled()
    except Exception as exc:
        candidate.error = short(exc)
        return candidate
    candidate.build_s = time.perf_counter() - started
    candidate.renew = lambda: open_compiled()[1]
    hint = compiled.get_property("INFERENCE_PRECISION_HINT")
    candidate.runs_at = hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)
    return candidate


def hand_candidates(subject: Subject, outputs: list[str], threads: int) -> list[Candidate]:
    """What a user writes from OpenVINO's and NNCF's docs."""
    import nncf
    import openvino as ov

    core = ov.Core()

    def read():
        return core.read_model(str(subject.path))

    def nncf_int8():
        options = {"model_type": nncf.ModelType.TRANSFORMER} if subject.transformer else {}
        return nncf.quantize(read(), nncf.Dataset(subject.calibration), **options)

    return [openvino_candidate(HAND[0], "hand", read, subject, outputs, openvino_config(threads, "f32")),
            openvino_candidate(HAND[1], "hand", read, subject, outputs, openvino_config(threads, None)),
            openvino_candidate(HAND[2], "hand", nncf_int8, subject, outputs, openvino_config(threads, None))]


def modelpress_candidates(subject: Subject, jobs: dict[str, Job], outputs: list[str], threads: int) -> list[Candidate]:
    import openvino as ov

    out = []
    for precision, job in jobs.items():
        name = f"ModelPress {precision}"
        if job.xml is None:
            why = f"job {job.status}" + (f": {job.code}" if job.code else "") + (f": {job.message}" if job.message
                                                                                 else "")
            out.append(Candidate(name, "modelpress", error=short(Exception(why), 300)))
            continue
        xml = job.xml
        # As the README says to run it: compile_model with the artifact's openvino_config.json (the settings it was
        # measured with), threads ours; an artifact without one gets no precision hint (the hint its rt_info holds).
        shipped = xml.with_name("openvino_config.json")
        config = {**(json.loads(shipped.read_text()) if shipped.is_file() else {}), **openvino_config(threads, None)}
        out.append(openvino_candidate(name, "modelpress", lambda xml=xml: ov.Core().read_model(str(xml)), subject,
                                      outputs, config))
    return out


# --- measuring ----------------------------------------------------------------------------------------------

def fidelity(subject: Subject, reference: list[list[np.ndarray]], candidate: Candidate, outputs: list[str],
             types: list[str]) -> None:
    """Mean and worst-sample cosine over the float outputs (as the worker's OutputComparison counts them: padded
    positions, attention_mask 0, left out; an output with one value per sample by its cosine over samples), and
    top-1 accuracy of the first float output where there are labels."""
    from workers.measure.fidelity import OutputComparison, padding_mask

    floats = [i for i, t in enumerate(types) if t in ("tensor(float)", "tensor(float16)", "tensor(double)")]
    comparisons = {i: OutputComparison(outputs[i], outputs[i], types[i]) for i in floats}
    right = total = 0
    for n, feed in enumerate(subject.feeds):
        got = candidate.call(feed) if candidate.call else []
        batch = len(next(iter(feed.values()))) if feed else 1
        keep = padding_mask(feed, batch)
        for i in floats:
            comparisons[i].add(reference[n][i], got[i], batch, keep)
        if subject.labels is not None and floats:
            scores = np.asarray(got[floats[0]]).reshape(len(subject.labels[n]), -1)
            right += int((scores.argmax(axis=1) == subject.labels[n]).sum())
            total += len(subject.labels[n])
    # An output with one value per sample (a probability) counts by its cosine over samples, as in a job's report;
    # where a float output has none (one such value seen), the figures stay None: the others' alone would overstate it.
    figures = [c.cosine_figures() for c in comparisons.values()]
    if figures and all(f is not None for f in figures):
        candidate.mean_cos = float(np.mean([f[0] for f in figures if f]))
        candidate.worst_cos = float(min(f[1] for f in figures if f))
    candidate.top1 = right / total if total else None


def time_side_by_side(candidates: list[Candidate], feed: dict[str, np.ndarray], *, budget_s: float,
                      max_rounds: int, sets: int) -> tuple[list[int], int]:
    """Interleaved rounds: each round every candidate runs a block of `calls` back to back, in an order rotated
    by one each round. Short blocks (about BLOCK_S) and many rounds, so that a burst of load from elsewhere on the
    machine falls on every candidate alike rather than on one candidate's block; the rounds fill about budget_s.
    They are split over `sets` session sets: before each set after the first, every candidate's session is opened
    (compiled) anew, in the reverse order of the last time, so where a session's placement (threads, memory) makes it
    faster or slower for as long as it lives, that shows in the spread, not as a difference between candidates.
    A block that follows another runtime's block starts with untimed calls for workers.measure.latency.SETTLE_S
    (OpenVINO's threads go on spinning after its last call: the reference after an OpenVINO block ran 20-30%
    slower on opt-mnist, and every candidate's ratio to it looked that much better).
    Returns the session set of each round (the strata of speedup_interval) and the calls per block."""
    from workers.measure.latency import Turns

    live = [c for c in candidates if c.call is not None]
    turns = Turns({c.name: c.runtime for c in live})

    def warm() -> list[float]:  # the first calls of a session allocate and pick kernels
        typical = []
        for c in live:
            times = []
            for _ in range(4):
                started = time.perf_counter()
                c.call(feed)  # type: ignore[misc]
                times.append(time.perf_counter() - started)
            typical.append(float(np.median(times[1:])))
        return typical

    pilot = warm()
    calls = int(np.clip(BLOCK_S / max(float(np.median(pilot)), 1e-6), 1, 30))
    rounds = int(np.clip(budget_s / (sum(pilot) * calls), 10 * sets, max_rounds))
    strata: list[int] = []
    turns.last = live[-1].name if live else None  # warm() ran them in order
    for index in range(sets):
        if index:
            for c in (live if index % 2 == 0 else live[::-1]):
                c.call = None  # the old session goes before the new one is made
                gc.collect()
                c.call = c.renew()  # type: ignore[misc]
            warm()
            turns.last = live[-1].name
        gc.collect()
        gc.disable()
        try:
            for r in range(len(strata), rounds * (index + 1) // sets):
                shift = r % len(live)
                for c in live[shift:] + live[:shift]:
                    turns.take(c.name, lambda c=c: c.call(feed))  # type: ignore[misc]
                    block = []
                    for _ in range(calls):
                        started = time.perf_counter_ns()
                        c.call(feed)  # type: ignore[misc]
                        block.append(time.perf_counter_ns() - started)
                    c.rounds.append(block)
                strata.append(index)
        finally:
            gc.enable()
    return strata, calls


@dataclass
class Measured:
    subject: Subject
    candidates: list[Candidate]
    jobs: dict[str, Job]
    strata: list[int] = field(default_factory=list)  # the session set of each round
    calls: int = 0
    error: str | None = None
    mismatched: list[str] = field(default_factory=list)  # ModelPress IRs not compiled at the hint they carry
    load: float | None = None  # the machine's 1-minute load average as the timing began (this process included)


def measure(subject: Subject, jobs: dict[str, Job], *, threads: int, budget_s: float, max_rounds: int,
            sets: int) -> Measured:
    out = Measured(subject, [], jobs)
    try:
        reference, session = ort_candidate(subject, threads)
    except Exception as exc:
        out.error = f"ONNX Runtime cannot load it: {short(exc)}"
        return out
    outputs = [o.name for o in session.get_outputs()]
    out.candidates = [reference, *hand_candidates(subject, outputs, threads),
                      *modelpress_candidates(subject, jobs, outputs, threads)]
    for c in out.candidates:
        job = jobs.get(c.name.rsplit(" ", 1)[-1]) if c.group == "modelpress" else None
        asked = job.lowering.get("inference_precision_hint") if job else None
        if asked and c.runs_at and asked != c.runs_at:
            out.mismatched.append(f"{c.name} (asks {asked}, runs {c.runs_at})")
    side_by_side(out, reference, session, budget_s=budget_s, max_rounds=max_rounds, sets=sets)
    return out


def side_by_side(out: Measured, reference: Candidate, session: Any, *, budget_s: float, max_rounds: int,
                 sets: int) -> None:
    """Every candidate of `out` against `reference` (its ONNX Runtime session gives the outputs' names and types):
    fidelity on the subject's samples, then the interleaved timing, each one's p50 and ratio with its interval."""
    from workers.measure.stats import speedup_interval

    subject = out.subject
    outputs, types = [o.name for o in session.get_outputs()], [o.type for o in session.get_outputs()]
    assert reference.call is not None
    expected = [reference.call(feed) for feed in subject.feeds]
    for c in out.candidates:
        if c.call is None:
            continue
        try:
            fidelity(subject, expected, c, outputs, types)
        except Exception as exc:
            c.error, c.call = f"runs but its outputs do not compare: {short(exc)}", None
    out.load = os.getloadavg()[0]
    out.strata, out.calls = time_side_by_side(out.candidates, subject.feeds[0], budget_s=budget_s,
                                              max_rounds=max_rounds, sets=sets)
    for c in out.candidates:
        if c.rounds:
            c.p50_ms = float(np.median(np.concatenate(c.rounds))) / 1e6
            c.vs_reference = speedup_interval(reference.rounds, c.rounds, strata=out.strata)


# --- tables and goals ----------------------------------------------------------------------------------------

def fmt(value: float | None, pattern: str) -> str:
    return "—" if value is None else pattern.format(value)


def cos_text(value: float | None) -> str:
    return "—" if value is None else f"{value:.5f}" if value > 0.999 else f"{value:.4f}"


def model_table(m: Measured) -> list[str]:
    from workers.measure.stats import show_speedup

    s = m.subject
    lines = [f"**{s.key}** — {s.title}; {s.kind}; inputs {s.shapes}; fidelity on {len(s.feeds)} runs of "
             f"{s.samples_what}; NNCF calibration on {len(s.calibration)} samples; timing: {len(m.strata)} rounds "
             f"over {len(set(m.strata))} session sets x {m.calls} calls per candidate, load average "
             f"{fmt(m.load, '{:.1f}')} as it began"
             + "".join(f"; {n}" for n in s.notes), "",
             "| candidate | runs at | p50 ms | vs ORT fp32 (95% interval) | mean cos | worst cos | top-1 |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for c in m.candidates:
        if c.error:
            lines.append(f"| {c.name} | — | — | not run: {c.error.replace('|', '/')} | | | |")
            continue
        ratio = show_speedup(c.vs_reference) if c.vs_reference and c.group != "reference" else "1 (reference)"
        lines.append(f"| {c.name} | {c.runs_at} | {fmt(c.p50_ms, '{:.3g}')} | {ratio} | {cos_text(c.mean_cos)} | "
                     f"{cos_text(c.worst_cos)} | {fmt(None if c.top1 is None else 100 * c.top1, '{:.1f}%')} |")
    return lines


def goal_a(m: Measured) -> tuple[str, str]:
    """(outcome, detail): for each hand-made candidate, a ModelPress candidate with worst cos >= its worst cos
    (less FIDELITY_SLACK) and a p50 at most its p50 (within SPEED_SLACK, or an interval reaching 1)?"""
    from workers.measure.stats import show_speedup, speedup_interval

    hand = [c for c in m.candidates if c.group == "hand" and c.p50_ms is not None and c.worst_cos is not None]
    ours = [c for c in m.candidates if c.group == "modelpress" and c.p50_ms is not None and c.worst_cos is not None]
    if not hand:
        errors = {c.error for c in m.candidates if c.group == "hand" and c.error}
        return "n/a", "nothing by hand ran: " + ("; ".join(sorted(errors)) or "no fidelity figures")
    if not ours:
        failed = "; ".join(f"{c.name}: {c.error}" for c in m.candidates if c.group == "modelpress")
        return "**not met**", f"no ModelPress candidate ran ({failed})"
    parts, met = [], True
    for h in hand:
        fit = [c for c in ours if c.worst_cos >= h.worst_cos - FIDELITY_SLACK]
        if not fit:
            met = False
            best = max(ours, key=lambda c: c.worst_cos)
            parts.append(f"vs {h.name.split(': ')[1]} (worst cos {cos_text(h.worst_cos)}): no ModelPress result that "
                         f"faithful (best {best.name}, running at {best.runs_at}: {cos_text(best.worst_cos)})")
            continue
        pick = min(fit, key=lambda c: c.p50_ms)
        ratio = speedup_interval(h.rounds, pick.rounds, strata=m.strata)
        ok = ratio["speedup"] >= SPEED_SLACK or (ratio["high"] is not None and ratio["high"] >= 1.0)
        met &= ok
        parts.append(f"vs {h.name.split(': ')[1]} ({h.runs_at}, {h.p50_ms:.3g} ms, worst cos {cos_text(h.worst_cos)}): "
                     f"{pick.name} ({pick.runs_at}, {pick.p50_ms:.3g} ms, worst cos {cos_text(pick.worst_cos)}) is "
                     f"{show_speedup(ratio)} its speed{'' if ok else ' — slower'}")
    return ("met" if met else "**not met**"), "; ".join(parts)


def goal_b(m: Measured) -> tuple[str, str]:
    from workers.measure.stats import show_speedup

    def faithful(group: str) -> list[Candidate]:
        return [c for c in m.candidates if c.group == group and c.vs_reference is not None
                and c.worst_cos is not None and c.worst_cos >= GOAL_B_COSINE]

    ours, hand = faithful("modelpress"), faithful("hand")
    best_hand = max(hand, key=lambda c: c.vs_reference["speedup"], default=None)
    by_hand = (f"; best by hand at that fidelity: {best_hand.name.split(': ')[1]} "
               f"{show_speedup(best_hand.vs_reference)}" if best_hand else "; nothing by hand reaches it either")
    if not ours:
        worst = ", ".join(f"{c.name} {cos_text(c.worst_cos)}" for c in m.candidates
                          if c.group == "modelpress" and c.worst_cos is not None) or "no ModelPress candidate ran"
        return "**not met**", f"no ModelPress result with worst cos >= {GOAL_B_COSINE} ({worst}){by_hand}"
    best = max(ours, key=lambda c: c.vs_reference["speedup"])
    ratio = best.vs_reference
    met = ratio["speedup"] >= GOAL_B_SPEEDUP
    sure = "" if not met or (ratio["low"] or 0) >= GOAL_B_SPEEDUP else " (its interval reaches below 2x)"
    return ("met" + sure if met else "**not met**"), (
        f"{best.name} ({best.runs_at}) {show_speedup(ratio)} at worst cos {cos_text(best.worst_cos)}{by_hand}")


def job_rows(measured: list[Measured]) -> list[str]:
    lines = ["| model | precision | job | time | total speedup | runtime's | compression's | mean cos | worst cos | "
             "int8: NNCF | notes |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for m in measured:
        for job in m.jobs.values():
            s = job.summary
            one = {k: (s.get(k) or {}).get("1") for k in ("speedup_ci", "runtime_speedup_ci", "compression_speedup_ci",
                                                         "speedup", "runtime_speedup", "compression_speedup")}
            fid = s.get("fidelity") or {}
            nncf = job.lowering.get("nncf") or {}
            how = nncf.get("skipped") or (f"{nncf.get('mode')}, {nncf.get('model_type')}, {nncf.get('preset')}, "
                                          f"{nncf.get('calibration_samples')} samples" if nncf else "")
            outcome = "ok" if job.status == "succeeded" else f"{job.status}" + (f": **{job.code}**" if job.code else "")
            note = "" if job.status == "succeeded" else (job.message or "").replace("|", "/").replace("\n", " ")[:200]
            lines.append(
                f"| {m.subject.key} | {job.precision} | {outcome} | {fmt(job.seconds, '{:.0f} s')} | "
                f"{one['speedup_ci'] or fmt(one['speedup'], '{:.2f}x')} | "
                f"{one['runtime_speedup_ci'] or fmt(one['runtime_speedup'], '{:.2f}x')} | "
                f"{one['compression_speedup_ci'] or fmt(one['compression_speedup'], '{:.2f}x')} | "
                f"{cos_text(fid.get('cosine_similarity'))} | {cos_text(fid.get('worst_cosine'))} | {how} | {note} |")
    return lines


def cpu_flags() -> set[str]:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


def readout(measured: list[Measured]) -> list[str]:
    flags = cpu_flags()
    isa = [f for f in ("avx512_bf16", "amx_bf16", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    lines = ["Goal A — ModelPress's OpenVINO target at least as fast as the hand-made OpenVINO/NNCF result at equal "
             f"worst-case fidelity (worst cos within {FIDELITY_SLACK}; p50 within {100 * (1 - SPEED_SLACK):.0f}% or "
             "an interval reaching 1x; the ratio is the hand-made p50 over ModelPress's), on every model:", ""]
    a_missed = []
    for m in measured:
        outcome, detail = ("n/a", m.error) if m.error else goal_a(m)
        if "not met" in outcome:
            a_missed.append(m.subject.key)
        lines.append(f"- {m.subject.key}: {outcome} — {detail}")
    lines += ["", f"Goal A over {len(measured)} models: " + (f"**not met** on {', '.join(a_missed)}" if a_missed
                                                             else "met on every model"), ""]
    has_isa = bool({"avx512_bf16", "amx_bf16", "avx512_vnni", "avx_vnni"} & flags)
    lines += [f"Goal B — >= {GOAL_B_SPEEDUP:g}x faster than ONNX Runtime fp32 at worst-case cosine >= {GOAL_B_COSINE} "
              f"on every CNN (this CPU: {', '.join(isa) or 'neither bf16 nor VNNI'}; a CNN here: Conv layers, no "
              "LSTM/GRU, not a transformer, not already quantized), with ModelPress's best faithful result:", ""]
    b_missed, cnns = [], [m for m in measured if m.subject.kind == "CNN" and not m.error]
    for m in cnns if has_isa else []:
        outcome, detail = goal_b(m)
        if "not met" in outcome:
            b_missed.append(m.subject.key)
        lines.append(f"- {m.subject.key}: {outcome} — {detail}")
    lines += ["", f"Goal B over {len(cnns)} CNNs: " + (f"**not met** on {', '.join(b_missed)}" if b_missed else
                                                       "met on every CNN" if has_isa else "n/a on this CPU")]
    mismatched = [f"{m.subject.key}: {', '.join(m.mismatched)}" for m in measured if m.mismatched]
    if mismatched:
        lines += ["", "ModelPress IRs that, compiled as the job's how_to_run says, do not run at the precision the "
                  "job measured them at: " + "; ".join(mismatched) + "."]
    return lines


# --- main ----------------------------------------------------------------------------------------------------

def bench_options(parser: argparse.ArgumentParser, *, quick: str) -> None:
    """The options of a side-by-side benchmark: which models, how long, where its figures go, which code serves."""
    parser.add_argument("--only", help="comma-separated model keys (default: all)")
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--no-write", action="store_true", help="print only; do not append to bench/RESULTS.md")
    parser.add_argument("--at", metavar="REV", help="run the service from a snapshot of this commit (git archive) "
                        "instead of the working tree, e.g. HEAD while others edit the tree")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="threads for every candidate (default: this machine's logical cores)")


def timing(quick: bool) -> tuple[float, int, int]:
    """(seconds of calls per model, most rounds, session sets) of side_by_side."""
    return (5.0, 40, 2) if quick else (15.0, 120, 3)


def prepared(folder: Path, only: str | None) -> list[Subject]:
    """The subjects (the comma-separated keys of `only`, else all), each prepared; one whose inputs cannot be planned
    keeps no feeds and a note that says why."""
    todo = subjects(folder, set(only.split(",")) if only else None)
    for s in todo:
        if s.path.is_file():
            try:
                prepare(s)
            except Exception as exc:
                s.notes.append(f"inputs could not be planned: {short(exc)}")
    return todo


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    bench_options(parser, quick="a shorter timing budget and shorter jobs")
    parser.add_argument("--no-modelpress", action="store_true", help="the hand-made half only (no deployment)")
    args = parser.parse_args()
    started = time.time()
    budget_s, max_rounds, sets = timing(args.quick)
    folder = Path(tempfile.mkdtemp(prefix="runtimes-"))
    try:
        todo = prepared(folder, args.only)
        ready = [s for s in todo if s.feeds]
        deployment = "ModelPress half not run (--no-modelpress)"
        jobs: dict[str, dict[str, Job]] = {s.key: {p: Job(p, message="not run (--no-modelpress)")
                                                   for p in PRECISIONS} for s in todo}
        if not args.no_modelpress and ready:
            print(f"phase 1: {3 * len(ready)} ModelPress jobs", flush=True)
            done, deployment = modelpress_half(ready, folder, quick=args.quick, at=args.at)
            jobs.update(done)
        measured = []
        for s in todo:
            if not s.feeds:
                measured.append(Measured(s, [], jobs[s.key], error="; ".join(s.notes) or "no inputs"))
                continue
            print(f"phase 2: {s.key} (at {time.time() - started:.0f} s)", flush=True)
            m = measure(s, jobs[s.key], threads=args.threads, budget_s=budget_s, max_rounds=max_rounds, sets=sets)
            measured.append(m)
            print("\n".join(model_table(m)), flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    body = []
    for m in measured:
        body += model_table(m) if not m.error else [f"**{m.subject.key}**: not measured — {m.error}"]
        body.append("")
    body += ["The ModelPress jobs' own figures (the worker's interleaved measurement: ONNX Runtime fp32, OpenVINO f32 "
             "on the original, the result; batch 1; fidelity on the same eval samples):", "", *job_rows(measured), "",
             *readout(measured)]
    import nncf
    import openvino as ov

    how = (f"In one process per model: ONNX Runtime fp32, OpenVINO f32 / default / NNCF int8 by hand and ModelPress's "
           f"IR per precision ({deployment}), timed interleaved ({'--quick: ' if args.quick else ''}about "
           f"{budget_s:.0f} s of calls per model, the order rotated each round, the sessions opened anew for each of "
           f"{sets} session sets), {args.threads} threads each "
           "(ORT intra-op with spinning off; OpenVINO INFERENCE_NUM_THREADS, 1 stream, LATENCY, CPU pinning off), "
           f"every OpenVINO model reshaped to the static input shapes; openvino {ov.__version__}, nncf "
           f"{nncf.__version__}. 'runs at' "
           "is the inference precision the compiled model reports. Ratios: median ORT fp32 / median candidate, "
           "bootstrap 95% interval over the paired rounds, two-level (session sets, then rounds).")
    publish(TITLE, how, "\n".join(body), started=started, write=not args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
