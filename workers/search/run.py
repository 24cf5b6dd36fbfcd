"""The goal search: a job that states what it needs (app.jobs.schemas.GoalSpec) gets the best model that meets
it, or the evidence that none does.

Candidates are built by the methods' own code (workers.steps.run_method) and the targets' lowering, each measured
against the original with the job's harness (workers.measure, interleaved, with its interval) and judged against
the goal's budget (workers.verdict). The plan starts with what is cheap and often enough (a runtime switch, the
int8 schemes), then reacts to what it measured: an int8 model that broke the outputs comes back with its most
sensitive nodes in float (mixed precision, the nodes ranked by workers.search.sensitivity), one that runs slower
comes back without the ops that slow it (ConvInteger on x86), the best faithful model is chained into the next
family (pruned -> int8, QDQ -> OpenVINO). Pruning and distillation run only with a train dataset.

Every candidate is stored as it finishes (its model, kind `candidate`, and its record, kind `candidate-record`):
a worker lost mid-search resumes from them (workers.supervise keeps them on a retry and lays them out in
request["resume"]). The time budget holds: a candidate starts only while its expected cost fits, and the final
measurement is reserved. Cancel stops at the next candidate.
"""
from __future__ import annotations

import functools
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from app.errors import JobFailed, ModelPressError
from app.reports import (
    REPORT_VERSION,
    Candidate,
    JobReport,
    Measurement,
    ReportArtifact,
    SensitivityReport,
    StepRecord,
)
from app.settings import get_settings

# Share of the progress bar: the search, then the final measurement and the report.
SEARCH, FINAL = 0.80, 0.15
# A candidate's measurement: short (the final one is the job's evaluate settings).
CANDIDATE_WARMUP, CANDIDATE_ITERATIONS, CANDIDATE_EVAL_SAMPLES = 3, 30, 64
# ... on at most this many session sets (MeasureSpec.session_sets; the final measurement takes the usual 6).
CANDIDATE_SESSION_SETS = 3
CANDIDATE_PROVIDER = "CPUExecutionProvider"
MIXED_COUNTS = (1, 2, 4, 8, 16)
# The per-node sensitivity: its samples and its share of the time budget. A quarter of 300 s on 16 samples was 83 s
# of ppocr-det's 190 s search, the deadline reached; the nodes are measured most costly first, so a shorter table
# keeps those that matter for speed.
SENSITIVITY_FEEDS, SENSITIVITY_SHARE = 8, 0.12
# ... and at most this many times the quantized candidate's own time (quantization and measurement), or
# SENSITIVITY_FLOOR_S where that is longer: a search takes at most 10x one plain quantization plus measurement, and
# on ppocr-rec the 12% share alone was 36 s, 3.7x the plain job.
SENSITIVITY_ROUNDS, SENSITIVITY_FLOOR_S = 3, 5.0
PRUNE_RATIOS = (0.25, 0.5)
RECORD_KIND, MODEL_KIND = "candidate-record", "candidate"


@dataclass
class Plan:
    """One candidate to build: its steps on the intake model (or on another candidate's model: `base`), then
    optionally a target's lowering."""

    name: str
    family: str
    steps: list[dict[str, Any]] = field(default_factory=list)
    target: dict[str, Any] | None = None
    base: str | None = None  # the candidate whose model the steps start from
    why: str = ""
    # "fp16_nodes": the base's float nodes (a mixed candidate's) in float16 (workers.search.fp16)
    transform: str | None = None


@dataclass
class Tried:
    plan: Plan
    status: str  # measured | failed | skipped
    seconds: float = 0.0
    summary: dict[str, Any] | None = None
    verdict: dict[str, Any] | None = None
    artifact: str | None = None
    error: dict[str, str] | None = None
    path: Path | None = None
    measurement: dict[str, Any] | None = None
    details: list[dict[str, Any]] = field(default_factory=list)

    def record(self) -> dict[str, Any]:
        return {"plan": asdict(self.plan), "status": self.status, "seconds": round(self.seconds, 3),
                "summary": self.summary, "verdict": self.verdict, "artifact": self.artifact, "error": self.error,
                "details": self.details}

    @classmethod
    def from_record(cls, data: dict[str, Any], path: Path | None) -> Tried:
        return cls(plan=Plan(**data["plan"]), status=data["status"], seconds=data.get("seconds", 0.0),
                   summary=data.get("summary"), verdict=data.get("verdict"), artifact=data.get("artifact"),
                   error=data.get("error"), path=path, details=data.get("details") or [])

    @property
    def beneficial(self) -> bool:
        return bool(self.verdict and self.verdict.get("verdict") == "beneficial")


@dataclass
class Search:
    run: Any
    workdir: Path
    original: Path
    intake: Any
    spec: dict[str, Any]
    input_shapes: Any
    started: float = field(default_factory=time.monotonic)
    tried: dict[str, Tried] = field(default_factory=dict)
    queue: list[Plan] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    measure_seconds: list[float] = field(default_factory=list)
    sensitivity: Any = None
    openvino_floor: dict[str, Any] | None = None  # _openvino_floor's timing, once measured
    # One measuring process for all the candidates (workers.measure.isolated.MeasuringProcess), where measurements
    # are isolated: a process of its own per candidate cost 0.8-1.6 s on opt-mnist, more than the measurement.
    measurer: Any = None

    @property
    def goal(self) -> dict[str, Any]:
        return self.spec["goal"]

    @property
    def deadline(self) -> float:
        return self.started + float(self.goal["time_budget_s"])

    def allowed(self, family: str) -> bool:
        families = self.goal.get("families")
        return families is None or family in families


def search(run, workdir: Path, *, original: Path, intake, spec: dict[str, Any], input_shapes):
    """Run the goal search; returns (report, summary, measurement rows) like workers.steps.execute."""
    state = Search(run=run, workdir=workdir, original=original, intake=intake, spec=spec, input_shapes=input_shapes)
    if state.goal["objective"] == "energy":
        from workers.measure.energy import open_counter

        counter, why = open_counter("CPUExecutionProvider")
        if counter is None:
            raise JobFailed(f"the goal's objective is energy, which this worker cannot measure: {why}; choose "
                            "latency or size, or run on a host whose RAPL counters are readable",
                            code="energy_unmeasurable")
    _resume(state)
    state.queue = _first_plans(state)
    if get_settings().measure_isolated:
        from workers.measure.isolated import MeasuringProcess

        state.measurer = MeasuringProcess(get_settings().measure_threads or None)
    try:
        _candidates(state)
    finally:
        measurer, state.measurer = state.measurer, None
        if measurer is not None:
            measurer.close()  # the handed-over candidate's final measurement runs in a fresh process
            if measurer.served:
                state.notes.append(f"the candidates' {measurer.served} measurement(s) ran in one measuring process "
                                   "kept for the search" + (f" ({measurer.started} started: one ended early)"
                                                            if measurer.started > 1 else "") +
                                   ", without memory probes; the final measurement ran in a process of its own")
    return _finish(state)


def _candidates(state: Search) -> None:
    """Each planned candidate in turn: skipped (cannot win, or the budget would not hold it), or built and
    measured; each one's outcome may plan more (_react)."""
    run = state.run
    while state.queue:
        plan = state.queue.pop(0)
        if plan.name in state.tried:
            _react(state, state.tried[plan.name])
            continue
        run.check_cancel()
        done = sum(1 for t in state.tried.values() if t.status != "skipped")
        best = _best(state)
        run.progress(_fraction(state), "searching", f"candidate {done + 1} ({plan.name}); {len(state.queue)} more "
                     "planned; best so far: " + (_short(best) if best else "none beneficial yet"), force=True)
        hopeless = _cannot_win(state, plan)
        if hopeless is not None:
            state.tried[plan.name] = Tried(plan=plan, status="skipped", error={"code": "cannot_win",
                                                                                "message": hopeless})
            continue
        if not _fits(state, plan):
            tried = Tried(plan=plan, status="skipped", error={
                "code": "time_budget", "message": f"not started: the time budget ({state.goal['time_budget_s']} s) "
                "would not hold it and the final measurement"})
            state.tried[plan.name] = tried
            continue
        tried = _try(state, plan)
        state.tried[plan.name] = tried
        _store_record(state, tried)
        _react(state, tried)


def _fraction(state: Search) -> float:
    """Where the search stands on the progress bar: the share of its time budget spent."""
    return 0.05 + SEARCH * min(0.99, (time.monotonic() - state.started) / state.goal["time_budget_s"])


# --- planning --------------------------------------------------------------------------------------------------

def _datasets(state: Search) -> dict[str, str | None]:
    goal_sets = state.goal.get("datasets") or {}
    evaluation = state.spec["evaluate"].get("eval_dataset_id")
    return {"eval": evaluation, "calibration": goal_sets.get("calibration_dataset_id") or evaluation,
            "train": goal_sets.get("train_dataset_id")}


def _served_targets(state: Search) -> list[dict[str, Any]]:
    """The targets besides ONNX Runtime on the CPU this worker serves (OpenVINO, and on a GPU worker ONNX Runtime's
    CUDA provider and TensorRT): those it registered, passed to the job's process; probed here only where the job
    runs without a registered worker."""
    chosen = state.run.targets if getattr(state.run, "targets", None) is not None else _probed_targets()
    return [t for t in chosen if not (t.get("runtime") == "onnxruntime" and t.get("device") == "cpu")]


@functools.lru_cache(maxsize=1)
def _probed_targets() -> list[dict[str, Any]]:
    """The choice a registration makes (workers.targets.worker_targets), probed in this process, once."""
    try:
        from workers.targets import probe, worker_targets

        return worker_targets(probe(), get_settings().worker_targets, [])
    except Exception:  # no OpenVINO here: the targets family has nothing to offer
        return []


def _first_plans(state: Search) -> list[Plan]:
    sets = _datasets(state)
    objective = state.goal["objective"]
    calibration = ({"calibration_dataset_id": sets["calibration"]} if sets["calibration"]
                   else {"allow_random_calibration": True})
    if not sets["calibration"]:
        state.notes.append("no calibration or eval dataset: the int8 candidates calibrate on random inputs, which "
                           "rarely match real activations; give goal.datasets.calibration_dataset_id")
    plans: list[Plan] = []
    if state.allowed("targets"):
        served = _served_targets(state)
        precisions = [t["precision"] for t in served if t.get("runtime") == "openvino" and t.get("device") == "cpu"]
        # int8_bf16 (int8 with its float remainder in bf16) follows a faithful int8 (_react): bf16 only moves
        # outputs further.
        for precision in ("f32", "bf16", "int8"):
            if precision in precisions:
                target: dict[str, Any] = {"runtime": "openvino", "device": "cpu", "precision": precision}
                if precision.startswith("int8") and sets["calibration"]:
                    target["calibration_dataset_id"] = sets["calibration"]
                plans.append(Plan(f"openvino-{precision}", "targets", target=target,
                                  why="a runtime switch is a candidate like any other"))
        plans += _gpu_plans(state, served, sets["calibration"])
        if not served:
            state.notes.append("this worker serves no target besides ONNX Runtime on the CPU: no runtime switch "
                               "was tried (GET /v1/targets)")
    if state.allowed("quantize"):
        plans.append(Plan("int8_static", "quantize", steps=[_step("quantize.int8_static", per_channel=True,
                                                                  **calibration)]))
        plans.append(Plan("int8_dynamic", "quantize", steps=[_step("quantize.int8_dynamic")]))
        slow16 = _no_float16_kernels(state.intake.path)
        if objective == "size" or not slow16:
            plans.append(Plan("fp16", "quantize", steps=[_step("quantize.fp16")]))
        else:
            state.notes.append(f"fp16 was not tried for {objective}: ONNX Runtime's {CANDIDATE_PROVIDER} has no "
                               f"float16 kernel for this model's compute ops ({', '.join(slow16)}) in this build, so a "
                               "float16 model runs them in float32 between Casts: never faster")
        if objective == "size":
            plans.append(Plan("int4_weight_only", "quantize", steps=[_step("quantize.int4_weight_only")]))
    if state.allowed("cluster") and objective == "size":
        plans.append(Plan("cluster", "cluster", steps=[_step("cluster.kmeans")]))
    if state.allowed("prune"):
        if sets["train"]:
            for ratio in PRUNE_RATIOS:
                plans.append(Plan(f"prune-{ratio:g}", "prune", steps=[_step(
                    "prune.channels", ratio=ratio, train_dataset_id=sets["train"], eval_dataset_id=sets["eval"],
                    epochs=3)]))
        else:
            state.notes.append("channel pruning was not tried: it needs goal.datasets.train_dataset_id to fine-tune "
                               "(pruned without fine-tuning, a model rarely keeps its outputs)")
    if state.allowed("distill"):
        if sets["train"]:
            plans.append(Plan("distill-width-0.5", "distill", steps=[_step(
                "distill.kd", train_dataset_id=sets["train"], eval_dataset_id=sets["eval"], epochs=5)]))
        elif state.goal.get("families") and "distill" in state.goal["families"]:
            state.notes.append("distillation was not tried: it needs goal.datasets.train_dataset_id")
    return plans


def _gpu_plans(state: Search, served: list[dict[str, Any]], calibration: str | None) -> list[Plan]:
    """A GPU worker's candidates: the model on ONNX Runtime's CUDA provider, in float16 there (tensor cores), and
    TensorRT engines at f16 and int8 (calibrated on the calibration dataset, else on random inputs)."""
    plans: list[Plan] = []
    keys = {(t.get("runtime"), t.get("device"), t.get("precision")) for t in served}
    if ("onnxruntime", "cuda", None) in keys:
        cuda: dict[str, Any] = {"runtime": "onnxruntime", "device": "cuda", "precision": None}
        plans.append(Plan("cuda", "targets", target=cuda, why="ONNX Runtime's CUDA provider: a runtime switch"))
        if state.allowed("quantize"):
            plans.append(Plan("cuda-fp16", "targets", steps=[_step("quantize.fp16")], target=dict(cuda),
                              why="float16 on the GPU, whose tensor cores run it faster than float32"))
    for precision in ("f16", "int8"):
        if ("tensorrt", "cuda", precision) in keys:
            target: dict[str, Any] = {"runtime": "tensorrt", "device": "cuda", "precision": precision}
            if precision == "int8" and calibration:
                target["calibration_dataset_id"] = calibration
            plans.append(Plan(f"tensorrt-{precision}", "targets", target=target,
                              why="a TensorRT engine built for this worker's GPU"))
    return plans


def _step(method: str, **params: Any) -> dict[str, Any]:
    """A step with its params validated and defaults filled, as the job would store it."""
    from workers import methods

    model = methods.get(method).params_model.model_validate({k: v for k, v in params.items() if v is not None})
    return {"method": method, "params": model.model_dump(mode="json")}


def _react(state: Search, tried: Tried) -> None:
    """New plans from what a candidate measured: mixed precision, leaner int8, chains."""
    plan = tried.plan
    planned = {p.name for p in state.queue} | set(state.tried)

    def add(new: Plan, *, first: bool = False) -> None:
        if new.name not in planned:
            planned.add(new.name)
            state.queue.insert(0, new) if first else state.queue.append(new)

    if tried.status != "measured":
        return
    fidelity_ok, faster = _fidelity_holds(tried), _faster(tried)
    if plan.name == "openvino-int8" and plan.target is not None:
        if fidelity_ok and any(t["precision"] == "int8_bf16" for t in _served_targets(state)):
            add(Plan("openvino-int8_bf16", "targets", target=dict(plan.target, precision="int8_bf16"),
                     why="OpenVINO's int8 kept the outputs: its float remainder in bf16"))
        elif not fidelity_ok:
            state.notes.append("openvino-int8_bf16 was not tried: openvino-int8 already moved the outputs beyond the "
                               "budget, and bf16 for its float remainder only moves them further")
    if plan.family == "quantize" and plan.name in ("int8_static", "int8_dynamic") and state.allowed("mixed_precision"):
        if not fidelity_ok:
            # The most sensitive node first; more are planned as each count is measured (below).
            add(Plan(f"{plan.name}-float{MIXED_COUNTS[0]}", "mixed_precision",
                     why=f"{plan.name} broke the outputs: its most sensitive node stays float"))
        if plan.name == "int8_dynamic" and not faster and _has_conv(state.intake.path):
            add(Plan("int8_dynamic-matmul", "mixed_precision", steps=[_step(
                "quantize.int8_dynamic", op_types=["MatMul", "Gemm"])],
                why="int8_dynamic was not faster: ConvInteger is slower than float Conv on x86, so Conv stays float"))
    if plan.family == "mixed_precision" and "-float" in plan.name and not fidelity_ok and plan.transform is None:
        scheme, kept_float = plan.name.split("-float")
        larger = [c for c in MIXED_COUNTS if c > int(kept_float)]
        if larger:
            add(Plan(f"{scheme}-float{larger[0]}", "mixed_precision",
                     why=f"{plan.name} still broke the outputs: {larger[0]} node(s) stay float"), first=True)
    # Nodes kept out of int8 run in float16 where the runtime measured float16 faster than float32.
    half = state.tried.get("fp16")
    if fidelity_ok and plan.family == "mixed_precision" and plan.transform is None and plan.steps \
            and plan.steps[0]["params"].get("nodes_to_exclude") and half is not None \
            and (_bound(half, "low") or 0.0) > 1.0:
        add(Plan(f"{plan.name}+fp16", "mixed_precision", base=plan.name, transform="fp16_nodes",
                 why=f"fp16 ran faster than float32 here ({_short(half)}): {plan.name}'s float nodes in float16"))
    # Chains: a faithful ONNX model goes on to the next family.
    if fidelity_ok and plan.target is None and plan.transform is None:
        if plan.family == "prune" and state.allowed("quantize"):
            add(Plan(f"{plan.name}+int8_static", "prune", steps=[_step(
                "quantize.int8_static", per_channel=True, **(
                    {"calibration_dataset_id": _datasets(state)["calibration"]} if _datasets(state)["calibration"]
                    else {"allow_random_calibration": True}))], base=plan.name, why="a faithful pruned model, quantized"))
        # A QDQ model on OpenVINO's int8 kernels: where NNCF's own int8 (openvino-int8) did not keep the outputs
        # and this one did. Dynamic int8 is not chained: OpenVINO runs DynamicQuantizeLinear graphs slower than its
        # float ones (0.26-0.80x on three CNNs, bench/RESULTS.md).
        if plan.family in ("quantize", "mixed_precision", "prune") and "int8" in plan.name \
                and _chained_to_openvino(state, plan.name):
            add(Plan(f"{plan.name}+openvino", "targets", base=plan.name,
                     target={"runtime": "openvino", "device": "cpu", "precision": "int8"},
                     why="a faithful int8 (QDQ) model, run by OpenVINO's int8 kernels"))


COMPUTE_OPS = {"Conv", "ConvTranspose", "MatMul", "Gemm", "Attention", "LSTM", "GRU", "RNN"}


@functools.lru_cache(maxsize=4)
def _op_types(path: Path) -> frozenset[str]:
    """The op types of the model's main graph (read once per file: the planning asks several times)."""
    import onnx

    return frozenset(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)


def _no_float16_kernels(path: Path) -> list[str]:
    """The model's compute ops (COMPUTE_OPS) when the candidates' provider runs none of them in float16, else []."""
    from workers.search.fp16 import float16_ops

    ops = _op_types(path) & COMPUTE_OPS
    return [] if not ops or ops & float16_ops(CANDIDATE_PROVIDER) else sorted(ops)


def _chained_to_openvino(state: Search, name: str) -> bool:
    """Whether a faithful candidate of this int8 scheme goes on to OpenVINO's int8 kernels (`name+openvino`): a
    static QDQ model, where OpenVINO int8 is served and NNCF's own int8 (openvino-int8) did not keep the outputs."""
    nncf = state.tried.get("openvino-int8")
    return "int8_dynamic" not in name and state.allowed("targets") \
        and any(t["precision"] == "int8" for t in _served_targets(state)) \
        and not (nncf is not None and nncf.status == "measured" and _fidelity_holds(nncf))


def _has_conv(path: Path) -> bool:
    return "Conv" in _op_types(path)


# --- one candidate -------------------------------------------------------------------------------------------

def _try(state: Search, plan: Plan) -> Tried:
    from workers.steps import run_method

    started = time.monotonic()
    out = state.workdir / "candidates" / plan.name
    out.mkdir(parents=True, exist_ok=True)
    tried = Tried(plan=plan, status="failed")
    try:
        # A runtime switch alone reads the upload as it came (OpenVINO's frontend fuses more of it than of the
        # normalized model: an LSTM export ran 0.72x as fast after intake); the methods take the normalized one.
        current = state.original if plan.target is not None and not plan.steps and not plan.base \
            else state.intake.path
        if plan.base:
            base = state.tried.get(plan.base)
            if base is None or base.path is None:
                raise JobFailed(f"its base candidate {plan.base} has no model", code="candidate_missing")
            current = base.path
        steps = list(plan.steps)
        if plan.family == "mixed_precision" and "-float" in plan.name and not steps and plan.transform is None:
            steps = [_mixed_step(state, plan)]
            plan.steps = steps
        for index, step in enumerate(steps, start=1):
            step_dir = out / f"step-{index}"
            step_dir.mkdir(exist_ok=True)
            step_started = time.monotonic()
            output, method = run_method(state.run, step, current, step_dir, state.workdir, state.input_shapes,
                                        seed=index, label=f"candidate {plan.name}",
                                        progress=lambda *_args, **_kw: None)
            tried.details.append({"method": method.id, "details": output.details,
                                  "seconds": round(time.monotonic() - step_started, 3)})
            current = output.model_path
        if plan.transform == "fp16_nodes":
            from workers.search.fp16 import to_fp16

            nodes = state.tried[plan.base].plan.steps[0]["params"]["nodes_to_exclude"] if plan.base else []
            transform_started = time.monotonic()
            current, converted = to_fp16(current, nodes, out / "mixed-fp16.onnx", provider=CANDIDATE_PROVIDER)
            if not converted:
                raise JobFailed(f"none of the {len(nodes)} float node(s) has a float16 kernel on {CANDIDATE_PROVIDER}",
                                code="nothing_to_convert")
            tried.details.append({"method": "fp16_nodes", "details": {"converted": converted},
                                  "seconds": round(time.monotonic() - transform_started, 3)})
        if plan.family == "mixed_precision" and steps and steps[0]["params"].get("nodes_to_exclude") \
                and steps[0]["method"] == "quantize.int8_static":
            current, rewired = keep_inputs_float(current, steps[0]["params"]["nodes_to_exclude"], out / "mixed.onnx")
            tried.details[0]["details"] = {**(tried.details[0]["details"] or {}), "rewired_inputs": rewired}
        measured_path = current
        if plan.target is not None and plan.target.get("runtime") != "onnxruntime":
            from workers.lowering import lower_for_target

            here, lowering_started = _fraction(state), time.monotonic()
            lowered = lower_for_target(state.run, plan.target, current, out, state.spec["evaluate"],
                                       state.input_shapes, share=(here, here), store=False)
            tried.details.append({"method": lowered.record["method"], "details": lowered.record["details"],
                                  "seconds": round(time.monotonic() - lowering_started, 3)})
            measured_path = lowered.path
        tried.path = measured_path
        measure_started = time.monotonic()
        measured = _measure_candidate(state, measured_path, plan.target)
        state.measure_seconds.append(time.monotonic() - measure_started)
        tried.measurement = measured
        tried.summary, tried.verdict = _judge(state, measured)
        tried.status = "measured"
        tried.artifact = _store_model(state, plan, measured_path)
    except ModelPressError as exc:
        if exc.code == "cancelled":
            raise
        tried.error = {"code": exc.code, "message": exc.message}
    except Exception as exc:  # a candidate that fails is evidence, not the end of the search
        from workers.steps import Cancelled

        if isinstance(exc, Cancelled):
            raise
        tried.error = {"code": "candidate_failed", "message": f"{type(exc).__name__}: {exc}"[:1500]}
    tried.seconds = time.monotonic() - started
    return tried


def _mixed_step(state: Search, plan: Plan) -> dict[str, Any]:
    """The scheme again with the `count` nodes that cost it the most fidelity left in float."""
    scheme, count = plan.name.split("-float")
    ranking = _sensitivity_ranking(state, scheme)
    chosen = [row["node"] for row in ranking[: int(count)]]
    if not chosen:
        raise JobFailed("the sensitivity ranking found no node that int8 moves", code="nothing_to_exclude")
    excluded = _with_float_inputs(state.intake.path, chosen)
    if len(excluded) > len(chosen):
        plan.why += (f"; with the {len(excluded) - len(chosen)} node(s) between them and the nearest compute node "
                     f"({', '.join(n for n in excluded if n not in chosen)}), so that their inputs stay float too")
    base = state.tried[scheme].plan.steps[0]
    return {"method": base["method"], "params": base["params"] | {"nodes_to_exclude": excluded}}


def keep_inputs_float(path: Path, names: list[str], out: Path) -> tuple[Path, list[str]]:
    """The QDQ model with the nodes `names` reading float tensors: ONNX Runtime's QDQ quantizer leaves an excluded
    node in float but still feeds it QuantizeLinear -> DequantizeLinear when the tensor's producer is quantized
    (it quantizes a quantized node's outputs too), so the error the node was excluded for stays. Each such input
    is wired to the float tensor before the pair; pairs nobody reads any more are removed. Returns (the model, the
    inputs rewired as node:tensor)."""
    import onnx

    model = onnx.load(str(path))
    graph = model.graph
    producers = {output: node for node in graph.node for output in node.output}
    wanted = set(names)
    rewired: list[str] = []
    for node in graph.node:
        if node.name not in wanted:
            continue
        for index, tensor in enumerate(node.input):
            dq = producers.get(tensor)
            q = producers.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
            if q is not None and q.op_type == "QuantizeLinear":
                node.input[index] = q.input[0]
                rewired.append(f"{node.name}:{q.input[0]}")
    outputs = {o.name for o in graph.output}
    while True:  # drop the Q/DQ nodes whose outputs no one reads now
        read = {name for node in graph.node for name in node.input} | outputs
        dead = [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                and not any(o in read for o in n.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    used = {name for node in graph.node for name in node.input}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)
    onnx.save(model, str(out))
    return out, rewired


# Ops the quantizers quantize around without computing anything a sensitive node's input depends on: leaving a
# node in float keeps its input quantized as long as one of these in front of it is (ONNX Runtime shares a tensor's
# quantize/dequantize pair among its readers), so they stay float with it.
PASS_THROUGH = frozenset({"Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "MaxPool",
                          "AveragePool", "GlobalAveragePool", "Reshape", "Transpose", "Flatten", "Squeeze",
                          "Unsqueeze", "Resize", "Split", "Slice", "Gather", "Concat", "Pad", "Identity"})


def _with_float_inputs(model_path: Path, names: list[str]) -> list[str]:
    """`names` plus the pass-through nodes that produce their inputs, walking up to the nearest compute node; the
    names as the quantizers give them (workers.search.sensitivity prepares the model the same way)."""
    import onnx

    from workers.search.sensitivity import _quantizable

    model, _notes = _quantizable(onnx.load(str(model_path)))
    producers = {out: node for node in model.graph.node for out in node.output}
    by_name = {node.name: node for node in model.graph.node}
    excluded = list(dict.fromkeys(names))
    stack = [by_name[n] for n in excluded if n in by_name]
    while stack:
        for tensor in stack.pop().input:
            producer = producers.get(tensor)
            if producer is not None and producer.op_type in PASS_THROUGH and producer.name not in excluded:
                excluded.append(producer.name)
                stack.append(producer)
    return excluded


def _sensitivity_ranking(state: Search, scheme: str) -> list[dict[str, Any]]:
    """Nodes ranked by the output error their int8 version costs (workers.search.sensitivity), computed once."""
    if state.sensitivity is None:
        state.sensitivity = _compute_sensitivity(state, scheme)
    return state.sensitivity["ranking"]


def _compute_sensitivity(state: Search, scheme: str) -> dict[str, Any]:
    """Each quantizable node's output error when it alone is int8, and its time share in float and in the
    candidate (workers.search.sensitivity), on SENSITIVITY_FEEDS samples; at most SENSITIVITY_SHARE of the time
    budget (the nodes that cost the most time are measured first), the mixed candidates need the rest. The ranking
    keeps the nodes int8 moves at all, worst first."""
    from workers.measure.environment import default_threads
    from workers.search.sensitivity import DEADLINE_REASON, node_sensitivity

    started = time.monotonic()
    feeds, source = _sample_feeds(state, SENSITIVITY_FEEDS)
    calibration, _ = _sample_feeds(state, 32, calibration=True)
    share = min(SENSITIVITY_SHARE * state.goal["time_budget_s"],
                max(SENSITIVITY_FLOOR_S, SENSITIVITY_ROUNDS * state.tried[scheme].seconds))
    # fp16 where it applies: where the candidates' provider runs the model's compute ops in float16.
    table = node_sensitivity(state.intake.path, feeds=feeds, calibration=calibration,
                             quantized_path=state.tried[scheme].path, fp16=not _no_float16_kernels(state.intake.path),
                             deadline=min(state.deadline, started + share),
                             threads=get_settings().measure_threads or default_threads(), source=source)
    data = table.to_json()
    if any(row.reason == DEADLINE_REASON for row in table.skipped):
        state.notes.append(
            f"the sensitivity table measured {len(table.rows)} of {len(table.rows) + len(table.skipped)} nodes, the "
            f"costliest in float first, in its share of the search ({share:.0f} s: at most {SENSITIVITY_SHARE:.0%} "
            f"of the time budget, and {SENSITIVITY_ROUNDS}x the {scheme} candidate's {state.tried[scheme].seconds:.1f} "
            f"s or {SENSITIVITY_FLOOR_S:g} s); the mixed-precision rungs rank those measured")
    ranking = [{"node": row["node"]} for row in data["rows"] if row.get("int8") and row["int8"]["worst_cosine"] < 0.99999]
    return {"ranking": ranking, "table": data, "source": source}


def _sample_feeds(state: Search, count: int, *, calibration: bool = False) -> tuple[list[dict[str, Any]], str]:
    """Feeds of one sample each (the fixed batch where the model has one): the eval (or calibration) dataset's
    first samples, else random ones at the job's input shapes."""
    from workers.quantize.int8_static import calibration_source

    sets = _datasets(state)
    dataset_id = sets["calibration" if calibration else "eval"]
    dataset = state.run.dataset(dataset_id) if dataset_id else None
    source = calibration_source(state.intake.path, dataset, samples=count, seed=7, allow_random=dataset is None,
                                shapes=state.input_shapes)
    return [source.feed(i) for i in range(source.count)], source.described


def _measure_candidate(state: Search, path: Path, target: dict[str, Any] | None) -> dict[str, Any]:
    from workers.steps import _measure

    evaluate = dict(state.spec["evaluate"])
    evaluate.update(batch_sizes=[state.goal["batch_size"]], warmup=min(CANDIDATE_WARMUP, evaluate["warmup"]),
                    iterations=min(CANDIDATE_ITERATIONS, evaluate["iterations"]),
                    eval_max_samples=min(CANDIDATE_EVAL_SAMPLES, evaluate.get("eval_max_samples") or
                                         CANDIDATE_EVAL_SAMPLES), providers=[CANDIDATE_PROVIDER])
    here = _fraction(state)
    measured = _measure(state.run, get_settings(), evaluate, state.original, path, (0.0, 0.0), state.input_shapes,
                        target=target, at=(here, here), stage="searching", measurer=state.measurer, memory=False,
                        brief_below=state.goal.get("min_cosine"), session_sets=CANDIDATE_SESSION_SETS)
    measured.pop("samples", None)
    measured.pop("measurements", None)
    return measured


def _judge(state: Search, measured: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    from workers.steps import _summary
    from workers.verdict import Budget, judge

    summary = _summary(Measurement.model_validate(measured), [])
    verdict = judge(summary, Budget.from_goal(state.goal))
    summary.verdict = verdict
    return summary.model_dump(mode="json"), verdict.model_dump(mode="json")


def _store_model(state: Search, plan: Plan, path: Path) -> str:
    """The candidate's model as a downloadable artifact (an IR is zipped with its config)."""
    index = len([t for t in state.tried.values() if t.artifact]) + 1
    if path.suffix == ".xml":
        from workers.openvino.lower import Lowered

        config = json.loads((path.parent / "compile_config.json").read_text()) \
            if (path.parent / "compile_config.json").is_file() else {}
        archive = Lowered(xml=path, bin=path.with_suffix(".bin"), precision=plan.target["precision"] if plan.target
                          else "f32", details={"compile_config": config}).zip(path.parent / "candidate.zip")
        name = f"candidate-{index:02d}-{plan.name}.zip"
        state.run.store_artifact(archive, name=name, kind=MODEL_KIND, content_type="application/zip")
        return name
    # An engine keeps its own name (the TensorRT version and the GPU it is bound to) after the candidate's.
    name = f"candidate-{index:02d}-{plan.name}" + (f"-{path.name}" if path.suffix == ".engine" else ".onnx")
    state.run.store_artifact(path, name=name, kind=MODEL_KIND, content_type="application/octet-stream")
    return name


def _store_record(state: Search, tried: Tried) -> None:
    folder = state.workdir / "records"
    folder.mkdir(exist_ok=True)
    path = folder / f"{tried.plan.name}.json"
    path.write_text(json.dumps(tried.record(), default=str))
    state.run.store_artifact(path, name=f"candidate-record-{tried.plan.name}.json", kind=RECORD_KIND,
                             content_type="application/json")


def _resume(state: Search) -> None:
    """Candidates a lost attempt finished: their records and models, laid out by the worker (request["resume"])."""
    resume: dict[str, str] = getattr(state.run, "resume", {}) or {}
    records = {name: path for name, path in resume.items() if name.startswith("candidate-record-")}
    for name, path in sorted(records.items()):
        data = json.loads(Path(path).read_text())
        model = resume.get(data.get("artifact") or "")
        local = None
        if model:
            local = state.workdir / "resumed" / Path(data["artifact"]).name
            local.parent.mkdir(parents=True, exist_ok=True)
            if data["artifact"].endswith(".zip"):
                import zipfile

                target = local.with_suffix("")
                with zipfile.ZipFile(model) as archive:
                    archive.extractall(target)
                local = target / "model.xml"
            else:
                shutil.copyfile(model, local)
        tried = Tried.from_record(data, local)
        state.tried[tried.plan.name] = tried
        state.run.artifacts.append({"name": name, "kind": RECORD_KIND})
        if tried.artifact:
            state.run.artifacts.append({"name": tried.artifact, "kind": MODEL_KIND})
    if records:
        state.notes.append(f"resumed after a lost worker: {len(records)} candidate(s) measured by the earlier "
                           "attempt were kept, not built again")


# --- the time budget, the best, the end ------------------------------------------------------------------------

def _fits(state: Search, upcoming: Plan) -> bool:
    """Whether another candidate, and then the final measurement, still fit in the time budget."""
    now = time.monotonic()
    spent = [t.seconds for t in state.tried.values() if t.status != "skipped"]
    typical = (sorted(spent)[len(spent) // 2] if spent else 0.0)
    if upcoming.family in ("prune", "distill"):
        # Training candidates take several times a quantization; the first one of its family is a guess.
        same = [t.seconds for t in state.tried.values() if t.plan.family == upcoming.family and t.status == "measured"]
        typical = max(same) if same else 4 * typical
    final = 2.5 * max(state.measure_seconds, default=0.0)
    return now + typical + final <= state.deadline


def _bound(tried: Tried | None, side: str) -> float | None:
    """A measured candidate's speedup interval bound ("low" or "high") at the goal's batch size."""
    if tried is None or tried.status != "measured":
        return None
    return ((tried.verdict or {}).get("improvement") or {}).get(side)


def _cannot_win(state: Search, plan: Plan) -> str | None:
    """Why a mixed-precision rung cannot beat what the search already has, or None. Keeping nodes of an int8
    model in float does not make it faster than the model with every node int8 (its float nodes run at float
    speed, its Q/DQ pairs stay), so a rung's speed is bounded by its scheme's: when the upper bound of the scheme's
    interval (and of OpenVINO's int8, which the rung may be chained onto) does not reach the original's speed or
    the lower bound of the best beneficial candidate, the rung is not built (latency objective only)."""
    if plan.target is not None and plan.target.get("runtime") == "openvino":
        return _openvino_cannot_win(state)
    if state.goal["objective"] != "latency" or plan.family != "mixed_precision" or "-float" not in plan.name:
        return None
    scheme = plan.name.split("-float")[0]
    reach: dict[str, float] = {}
    for name in (scheme, "openvino-int8") if _chained_to_openvino(state, scheme) else (scheme,):
        high = _bound(state.tried.get(name), "high")
        if high is not None:
            reach[name] = high
    if scheme not in reach:
        return None
    best = _best(state)
    floor, what = (max(1.0, _bound(best, "low") or 1.0), f"{best.plan.name}, the best so far (its lower bound)") \
        if best is not None and (_bound(best, "low") or 0) > 1.0 else (1.0, "the original")
    if max(reach.values()) > floor:
        return None
    reached = " and ".join(f"{name} at most {high:.2f}x" for name, high in reach.items())
    return (f"not built: with every node int8, {reached} (the upper bounds of their intervals); keeping nodes in "
            f"float does not make an int8 model faster, so this cannot beat {what} at {floor:.2f}x")


FLOOR_ROUNDS, FLOOR_SECONDS, FLOOR_BLOCK = 300, 1.0, 10
# The floor is a median under the machine's noise, not a strict bound: OpenVINO's candidates go only where the bare
# call is clearly slower than the whole original (silero-vad-fw: 148 us against 149 us, and OpenVINO f32 ran it at
# 1.09x).
FLOOR_MARGIN = 1.2


def _openvino_cannot_win(state: Search) -> str | None:
    """Why no OpenVINO candidate can be faster than the original, or None. An OpenVINO call costs a fixed time
    whatever the model computes (the request, the input and output copies, the plugin's scheduling: about 60-80 us
    on a 2-core EPYC), and on a tiny model that alone outlasts the whole original on ONNX Runtime (opt-mnist: 53 us).
    The floor is OpenVINO's call on a model that only passes the original's inputs through, timed interleaved with
    the original on ONNX Runtime in this process at the candidates' threads; when its median is above the
    original's by FLOOR_MARGIN, every OpenVINO candidate is skipped before its conversion and compilation (1-2 s
    each). Latency at batch 1 only: at a larger batch the model's own work grows and the call's cost does not."""
    if state.goal["objective"] != "latency" or state.goal.get("batch_size", 1) != 1:
        return None
    if state.openvino_floor is None:
        try:
            state.openvino_floor = _openvino_floor(state)
        except Exception as exc:  # a model OpenVINO or this check cannot feed: the candidates decide for themselves
            state.openvino_floor = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        floor = state.openvino_floor
        if "error" not in floor:
            state.notes.append(
                f"OpenVINO's call alone (a model that only passes the inputs through) took {floor['floor_us']:.0f} us "
                f"(median of {floor['rounds']} calls) against the original's {floor['original_us']:.0f} us on ONNX "
                "Runtime, timed interleaved" + (": no OpenVINO candidate can be faster, none was built"
                                                if _outlasts(floor) else ""))
    floor = state.openvino_floor
    if not _outlasts(floor):
        return None
    return (f"an OpenVINO call costs {floor['floor_us']:.0f} us here before any of the model's work (a model that "
            f"only passes its inputs through), more than the whole original on ONNX Runtime "
            f"({floor['original_us']:.0f} us, medians of {floor['rounds']} interleaved calls)")


def _outlasts(floor: dict[str, Any]) -> bool:
    """Whether OpenVINO's bare call is clearly slower (FLOOR_MARGIN) than the whole original."""
    return "error" not in floor and floor["floor_us"] > FLOOR_MARGIN * floor["original_us"]


def _openvino_floor(state: Search) -> dict[str, Any]:
    import numpy as np
    import onnx
    from onnx import helper

    from workers.measure.environment import default_threads
    from workers.measure.latency import Turns, round_order, time_calls
    from workers.measure.runtime import open_session
    from workers.openvino.session import OpenVINOSession

    feeds, _ = _sample_feeds(state, 1)
    feed = {name: np.ascontiguousarray(value) for name, value in feeds[0].items()}
    threads = get_settings().measure_threads or default_threads()
    inputs = [helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(a.dtype), list(a.shape))
              for name, a in feed.items()]
    outputs = [helper.make_tensor_value_info(f"{name}__out", helper.np_dtype_to_tensor_dtype(a.dtype), list(a.shape))
               for name, a in feed.items()]
    passing = helper.make_model(helper.make_graph(
        [helper.make_node("Identity", [name], [f"{name}__out"]) for name in feed], "pass_through", inputs, outputs),
        opset_imports=[helper.make_opsetid("", 13)])
    path = state.workdir / "openvino-floor.onnx"
    onnx.save(passing, str(path))
    openvino = OpenVINOSession(path, precision="f32", threads=threads)
    original = open_session(state.original, role="baseline", providers=[CANDIDATE_PROVIDER], threads=threads)
    calls = {"floor": functools.partial(openvino.run, None, feed),
             "original": functools.partial(original.run, None, feed)}
    for call in calls.values():
        time_calls(call, 5)
    # Blocks of FLOOR_BLOCK calls taking turns, each settled first (Turns): OpenVINO's threads spin on after its last
    # call and, timed call by call in turns, charged the original 30-40 us of OpenVINO's own cost.
    timed: dict[str, list[int]] = {"floor": [], "original": []}
    turns = Turns({"floor": "openvino", "original": "onnxruntime"})
    stop = time.perf_counter() + FLOOR_SECONDS
    index = 0
    while len(timed["floor"]) < FLOOR_ROUNDS and time.perf_counter() < stop:
        for role in round_order(index, ("floor", "original")):
            turns.take(role, calls[role])
            time_calls(calls[role], FLOOR_BLOCK, timed[role])
        index += 1
    return {"floor_us": float(np.median(timed["floor"])) / 1e3, "original_us": float(np.median(timed["original"])) / 1e3,
            "rounds": len(timed["floor"])}


def _fidelity_holds(tried: Tried) -> bool:
    checks = (tried.verdict or {}).get("checks") or []
    fidelity = [c for c in checks if c.get("name") in ("min_cosine", "max_accuracy_drop")]
    return bool(fidelity) and all(c.get("passed") for c in fidelity)


def _faster(tried: Tried) -> bool:
    speedup = (tried.summary or {}).get("speedup") or {}
    return any(v > 1.0 for v in speedup.values())


def _objective_key(state: Search, tried: Tried) -> tuple:
    summary = tried.summary or {}
    objective = state.goal["objective"]
    batch = str(state.goal["batch_size"])
    if objective == "size":
        return (-(summary.get("size_ratio") or math.inf),)
    if objective == "energy":
        energy = summary.get("energy_j_per_inference") or {}
        return (-(energy.get(batch) or math.inf),)
    # Among candidates that are all beneficial (their lower bounds above 1.00, or min_speedup), the fastest is the
    # one with the best point estimate: ranked by lower bound, a narrow 2.9x beat a wide 3.3x that measured 3.9x by
    # hand (ultraface, OpenVINO int8 against bf16); the lower bound breaks ties.
    improvement = (tried.verdict or {}).get("improvement") or {}
    return ((summary.get("speedup") or {}).get(batch) or 0.0, improvement.get("low") or 0.0)


def _best(state: Search) -> Tried | None:
    good = [t for t in state.tried.values() if t.status == "measured" and t.beneficial]
    return max(good, key=lambda t: _objective_key(state, t), default=None)


def _closest(state: Search) -> Tried | None:
    """What came closest when nothing was beneficial: the best objective among the faithful, else the most
    faithful."""
    measured = [t for t in state.tried.values() if t.status == "measured"]
    faithful = [t for t in measured if _fidelity_holds(t)]
    if faithful:
        return max(faithful, key=lambda t: _objective_key(state, t))
    return max(measured, key=lambda t: ((t.summary or {}).get("fidelity") or {}).get("worst_cosine") or 0.0,
               default=None)


def _short(tried: Tried) -> str:
    speedup = ((tried.summary or {}).get("speedup_ci") or {})
    text = next(iter(speedup.values()), None)
    return f"{tried.plan.name} {text}" if text else tried.plan.name


# At most this many final measurements: the best candidate, a second try when it is contradicted, then the
# next-best ones while the time budget holds.
FINAL_TRIES = 4
# Candidates ranked below the confirmed one whose intervals overlap its own that are measured again (_challenged).
MAX_CHALLENGERS = 1


@dataclass
class Final:
    """One final measurement of a candidate with the job's evaluate settings."""

    tried: Tried
    measurement: dict[str, Any]
    rows: list[dict[str, Any]]
    samples: dict[str, Any]
    summary: Any
    verdict: Any
    seconds: float


def _measure_final(state: Search, tried: Tried, budget: Any) -> Final:
    from workers.steps import _measure, _summary
    from workers.verdict import judge

    assert tried.path is not None  # only measured candidates with a model are measured again
    started = time.monotonic()
    state.run.progress(0.05 + SEARCH, "measuring", f"measuring {tried.plan.name} with the job's evaluate settings",
                       force=True)
    final = _measure(state.run, get_settings(), state.spec["evaluate"], state.original, tried.path, (0.0, 1.0),
                     state.input_shapes, target=tried.plan.target, at=(0.05 + SEARCH, 0.05 + SEARCH + FINAL))
    samples = final.pop("samples", {})
    environment = final.get("environment")
    rows = [r | {"environment": environment} for r in final.pop("measurements", [])]
    summary = _summary(Measurement.model_validate(final), [])
    return Final(tried=tried, measurement=final, rows=rows, samples=samples, summary=summary,
                 verdict=judge(summary, budget), seconds=time.monotonic() - started)


def _confirm(state: Search, budget: Any) -> tuple[Final | None, list[Final]]:
    """The beneficial candidates, best first, each measured again with the job's evaluate settings until one holds.
    A final measurement that contradicts the search gets a second one (two of the three then decide); a candidate
    contradicted twice gives way to the next best while the time budget holds. Returns the one confirmed (or None)
    and the final measurements that contradicted the search."""
    ranked = sorted((t for t in state.tried.values() if t.status == "measured" and t.beneficial and t.path),
                    key=lambda t: _objective_key(state, t), reverse=True)
    contradicted: list[Final] = []
    tries = 0
    last = 0.0
    for candidate in ranked:
        for attempt in (1, 2):
            if tries and _finals_spent(state, tries, last):
                state.notes.append(f"{candidate.plan.name} was not measured again"
                                   f"{' a second time' if attempt == 2 else ''}: the time budget "
                                   f"({state.goal['time_budget_s']} s) or the limit of {FINAL_TRIES} final "
                                   "measurements was reached")
                return None, contradicted
            final = _measure_final(state, candidate, budget)
            tries, last = tries + 1, final.seconds
            if final.verdict.verdict == "beneficial":
                if attempt == 2:
                    state.notes.append(f"{candidate.plan.name}: its first final measurement contradicted the search "
                                       f"({contradicted[-1].verdict.reason}); a second one agreed with the search, "
                                       "two measurements of three")
                return _challenged(state, budget, final, ranked, tries, last, contradicted), contradicted
            contradicted.append(final)
    return None, contradicted


def _finals_spent(state: Search, tries: int, last: float) -> bool:
    """Whether no other final measurement may start: FINAL_TRIES taken, or one more as long as the last would end
    past the time budget."""
    return tries >= FINAL_TRIES or time.monotonic() + last > state.deadline


def _challenged(state: Search, budget: Any, held: Final, ranked: list[Tried], tries: int, last: float,
                contradicted: list[Final]) -> Final:
    """The confirmed candidate against those ranked below it that the search could not tell apart from it (latency:
    their speedup intervals overlap its own): each is measured again with the job's evaluate settings while the
    limit of final measurements and the time budget allow, and the fastest of those that hold is handed over. The
    search's 30 calls ranked OpenVINO bf16 at 1.65x (1.57-1.91) under f32 at 2.01x (1.88-2.35) on ppocr-cls, where
    a longer measurement put bf16 at 2.26x and f32 at 1.96x. One challenger is measured, the search's next fastest
    (MAX_CHALLENGERS): on ddddocr-det two more final measurements of OpenVINO models took 23 s of a 92 s search."""
    if state.goal["objective"] != "latency":
        return held
    batch = str(state.goal["batch_size"])

    def speed(final: Final) -> float:
        return float(((getattr(final.summary, "speedup", None) or {}).get(batch)) or 0.0)

    low, best, heard, challenged = _bound(held.tried, "low"), held, [], 0
    if low is None:
        return held
    for other in ranked[ranked.index(held.tried) + 1:]:
        high = _bound(other, "high")
        if high is None or high < low:
            continue
        if challenged >= MAX_CHALLENGERS:
            state.notes.append(f"{other.plan.name}'s search interval reached {held.tried.plan.name}'s as well; it was "
                               f"not measured again: {MAX_CHALLENGERS} challenger(s) at most, the search's fastest")
            continue
        challenged += 1
        if _finals_spent(state, tries, last):
            state.notes.append(f"{other.plan.name}'s search interval reached {held.tried.plan.name}'s, but it was not "
                               f"measured again: the time budget ({state.goal['time_budget_s']} s) or the limit of "
                               f"{FINAL_TRIES} final measurements was reached")
            break
        final = _measure_final(state, other, budget)
        tries, last = tries + 1, final.seconds
        if final.verdict.verdict != "beneficial":
            contradicted.append(final)
            continue
        heard.append(final)
        if speed(final) > speed(best):
            best = final
    if heard:
        state.notes.append(
            "the search could not tell " + ", ".join(f.tried.plan.name for f in heard) + f" apart from "
            f"{held.tried.plan.name} (their speedup intervals overlap): measured again with the job's evaluate "
            "settings, " + "; ".join(f"{f.tried.plan.name} {speed(f):.2f}x" for f in [held, *heard]) +
            f"; {best.tried.plan.name} is handed over")
    return best


def _finish(state: Search):
    from workers.steps import _summary
    from workers.verdict import Budget, judge

    run = state.run
    evaluate = state.spec["evaluate"]
    budget = Budget.from_goal(state.goal)
    confirmed, contradicted = _confirm(state, budget)
    best = confirmed.tried if confirmed else None
    chosen = best or (contradicted[0].tried if contradicted else _closest(state))
    shown = confirmed or (contradicted[0] if contradicted else None)
    rows: list[dict[str, Any]] = []
    if shown is not None:
        samples = state.workdir / "latency-samples.json"
        samples.write_text(json.dumps(shown.samples))
        stored = run.store_artifact(samples, name=samples.name, kind="samples", content_type="application/json")
        shown.measurement["latency"]["samples_artifact"] = stored["name"]
        measurement: dict[str, Any] | None = shown.measurement
        rows = shown.rows
    else:
        measurement = chosen.measurement if chosen is not None else None
    if measurement is None:
        raise JobFailed("no candidate could be built and measured: " + "; ".join(
            f"{t.plan.name}: {t.error['message'] if t.error else t.status}" for t in state.tried.values())[:3000],
            code="search_failed")
    summary = _summary(Measurement.model_validate(measurement), [])
    verdict = judge(summary, budget)
    if best is None and not contradicted:
        reason = "no candidate met the goal" + (f"; the closest was {chosen.plan.name}: "
                                               f"{(chosen.verdict or {}).get('reason', '')}" if chosen else "")
        verdict = verdict.model_copy(update={"verdict": "not_beneficial", "reason": reason})
    elif best is None:
        names = ", ".join(dict.fromkeys(f.tried.plan.name for f in contradicted))
        verdict = verdict.model_copy(update={"verdict": "not_beneficial", "reason": (
            f"{names} met the goal in the search but not when measured again with the job's evaluate settings "
            f"(each twice where time allowed); {contradicted[0].tried.plan.name}: {contradicted[0].verdict.reason}")})
    elif contradicted:
        others = [f for f in contradicted if f.tried is not best]
        if others:
            state.notes.append("measured again with the job's evaluate settings, " + "; ".join(
                f"{f.tried.plan.name} did not hold: {f.verdict.reason}" for f in others) + f"; {best.plan.name} held")
    summary.verdict = verdict
    handed = _hand_over(state, best) if best is not None and verdict.verdict == "beneficial" else None
    # The figures of the final measurement name the model they are of: the one handed over (or the candidate
    # measured again, when it was not), and the upload on a target runtime.
    result_sha = handed["sha256"] if handed else None
    rows = [r | {"sha256": result_sha} if r["model"] == "result" and result_sha else r for r in rows]
    summary.notes = [state.intake.note()] + state.notes + summary.notes + (
        [] if handed else ["nothing is handed over as the result: no candidate met the goal; every candidate is "
                           "downloadable (candidate-*) and the report says what came closest"])
    summary.steps = [s["method"] for s in (best.plan.steps if best else [])] + (
        _lowering(best.plan.target) if best else [])
    candidates = [_candidate(t) for t in state.tried.values()]
    report = JobReport(
        report_version=REPORT_VERSION, job_id=run.job_id, sandbox=run.sandbox, intake=state.intake.record,
        steps=[StepRecord.model_validate(s) for s in _steps_record(best, handed)] if best and handed else [],
        evaluate=evaluate, measurement=Measurement.model_validate(measurement), summary=summary,
        candidates=candidates, verdict=verdict,
        artifacts=[ReportArtifact.model_validate(a) for a in run.artifacts] + [ReportArtifact(name="report.json",
                                                                                                kind="report")],
    )
    report.search = _search_record(state, best, chosen, handed, contradicted)
    pareto = _pareto(state)
    if pareto is not None:
        report.pareto = pareto
    if state.sensitivity and state.sensitivity.get("table"):
        report.sensitivity = SensitivityReport.model_validate(state.sensitivity["table"])
    run.progress(0.97, "storing", "storing the report", force=True)
    written = report.model_dump(mode="json", fallback=str)
    path = state.workdir / "report.json"
    path.write_text(json.dumps(written, indent=2, default=str))
    run.store_artifact(path, name="report.json", kind="report", content_type="application/json")
    return written, written["summary"], rows


def _hand_over(state: Search, best: Tried) -> dict[str, Any]:
    """The chosen candidate under the result's name: model.onnx, or model_openvino.zip for an IR."""
    if best.path is not None and best.path.suffix == ".xml":
        archive = best.path.parent / "candidate.zip"
        return state.run.store_artifact(archive, name="model_openvino.zip", kind="model", content_type="application/zip")
    name = best.path.name if best.path is not None and best.path.suffix == ".engine" else "model.onnx"
    return state.run.store_artifact(best.path, name=name, kind="model", content_type="application/octet-stream")


def _steps_record(best: Tried, handed: dict[str, Any]) -> list[dict[str, Any]]:
    """The chosen candidate's steps as a steps job records them; the model handed over is the last one's artifact."""
    from workers import methods

    records = []
    steps = list(best.plan.steps) + [{"method": method, "params": best.plan.target}
                                     for method in _lowering(best.plan.target)]
    for index, step in enumerate(steps, start=1):
        version = methods.get(step["method"]).version if not step["method"].startswith("lower.") else 1
        done = best.details[index - 1] if index - 1 < len(best.details) else {}
        records.append({"index": index, "method": step["method"], "version": version, "params": step["params"],
                        "duration_s": done.get("seconds", 0.0), "details": done.get("details", {}),
                        "artifact": handed})
    return records


def _lowering(target: dict[str, Any] | None) -> list[str]:
    """The lowering step a candidate's target adds ([] for none, and for ONNX Runtime, which runs the model as is)."""
    from workers.lowering import lowering_method

    return [] if target is None or target.get("runtime") == "onnxruntime" else [lowering_method(target)]


def _candidate(tried: Tried) -> Candidate:
    from app.reports import JobSummary

    steps = [s["method"] for s in tried.plan.steps] + ([tried.plan.transform] if tried.plan.transform else []) + (
        _lowering(tried.plan.target))
    data: dict[str, Any] = {"name": tried.plan.name, "steps": steps, "family": tried.plan.family,
                            "status": tried.status, "seconds": round(tried.seconds, 2), "artifact": tried.artifact,
                            "verdict": tried.verdict, "error": tried.error, "why": tried.plan.why or None,
                            "base": tried.plan.base, "target": tried.plan.target,
                            "params": [s["params"] for s in tried.plan.steps]}
    if tried.summary is not None:
        data["summary"] = JobSummary.model_validate(tried.summary)
    return Candidate.model_validate(data)


def _pareto(state: Search) -> Any:
    try:
        from workers.verdict import pareto_front
    except ImportError:
        return None
    batch = str(state.goal["batch_size"])
    points = []
    for tried in state.tried.values():
        if tried.status != "measured" or not tried.summary:
            continue
        summary = tried.summary
        p50 = (summary.get("latency_p50_ms") or {}).get(batch) or {}
        fidelity = summary.get("fidelity") or {}
        points.append({"name": tried.plan.name, "p50_ms": p50.get("compressed"),
                       "size_bytes": summary.get("compressed_size_bytes"),
                       "worst_cosine": fidelity.get("worst_cosine") or fidelity.get("cosine_similarity"),
                       "energy_j": (summary.get("energy_j_per_inference") or {}).get(batch)})
    return pareto_front(points) if points else None


def _search_record(state: Search, best: Tried | None, chosen: Tried | None, handed: dict | None,
                   contradicted: list[Final]) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for tried in state.tried.values():
        counts[tried.status] = counts.get(tried.status, 0) + 1
    return {
        "goal": state.goal, "elapsed_s": round(time.monotonic() - state.started, 1),
        "time_budget_s": state.goal["time_budget_s"], "candidates": counts,
        # chosen: the candidate handed over; best_in_search: the best beneficial one in the brief measurements (its
        # final measurement with the job's settings may still fail the goal); closest: what came closest otherwise.
        "chosen": best.plan.name if best and handed else None,
        "best_in_search": next((t.plan.name for t in [_best(state)] if t is not None), None),
        "closest": None if best else (chosen.plan.name if chosen else None),
        # Final measurements (the job's evaluate settings) that did not hold what the search measured.
        "contradicted": [{"candidate": f.tried.plan.name, "reason": f.verdict.reason,
                          "speedup": (f.verdict.improvement or {}).get("speedup"),
                          "seconds": round(f.seconds, 1)} for f in contradicted],
        "result_artifact": handed["name"] if handed else None,
        "candidate_measurement": {"batch_size": state.goal["batch_size"], "warmup": CANDIDATE_WARMUP,
                                  "iterations": CANDIDATE_ITERATIONS, "eval_max_samples": CANDIDATE_EVAL_SAMPLES,
                                  "note": "each candidate is measured briefly against the original; the one handed "
                                          "over is measured again with the job's evaluate settings"},
        "notes": state.notes,
    }
