"""Normalization on intake: the uploaded model made ready for the methods, each change checked on its outputs.

Exports found in the wild trip the methods before they start: weights held in `Constant` nodes (ONNX Runtime's
quantizers want initializers: "Expected ... to be an initializer"), opsets older than the quantizers need (10;
13 for per-channel QDQ), value_info annotations that contradict ONNX shape inference. Before the first step the
worker runs three passes over the upload:

1. opset: the default-domain opset raised to max(current, 13) with onnx's version converter;
2. constants: Constant nodes (main graph and If/Loop/Scan bodies) lifted into initializers of the same name with
   onnx-ir's own pass;
3. shape_inference: onnx's shape inference, strict first; where it raises, mended by dropping the value_info
   annotations that contradict it, else run with strict mode off, else skipped with the reason.

The normalized model must compute what the upload computes: both run on the same synthetic inputs, made as the
measurement makes them (workers.onnx_tools.inputs, with the job's input shapes), and each output must agree within
`TOLERANCE_TEXT`. Where the passes together disagree, each is tried alone and the ones that change outputs are
dropped, with the figures. The upload stays the reference: the measurement compares it, not this model, with the
result. Nothing here fails a job: whatever goes wrong is recorded and the steps take the upload as it came.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import onnx

log = logging.getLogger("modelpress.intake")

# ORT's quantizers want opset >= 10, QDQ per-channel >= 13; most methods are tested at 13+.
TARGET_OPSET = 13
# A normalized model's output y' agrees with the upload's y when, per output,
# max |y' - y| <= ABS_SCALE * (1 + max |y|) and cosine(y', y) >= MIN_COSINE; integer and bool outputs must be equal.
ABS_SCALE = 1e-4
MIN_COSINE = 0.99999
TOLERANCE_TEXT = (f"per output: max |normalized - uploaded| <= {ABS_SCALE:g} * (1 + max |uploaded|) and cosine "
                  f">= {MIN_COSINE}; integer and bool outputs equal")
PASSES = ("opset", "constants", "shape_inference")
CHECK_SEED = 20240516


@dataclass
class PassOutcome:
    """What one pass did to the model: `action` (a line for the report) when it changed it, else `reason`."""

    name: str
    status: str  # applied | not_needed | failed | dropped
    action: str | None = None
    reason: str | None = None

    def record(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"pass": self.name, "status": self.status}
        if self.action:
            entry["action"] = self.action
        if self.reason:
            entry["reason"] = self.reason
        return entry


@dataclass
class Intake:
    """The model the steps take (`path`) and the report's `intake` section (`record`)."""

    path: Path
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def normalized(self) -> bool:
        return self.record.get("status") == "normalized"

    def note(self) -> str:
        """One line for the summary's notes."""
        if self.record.get("status") == "skipped":
            return f"intake: the uploaded model went to the steps as it came ({self.record['reason']})"
        done = [p["action"] for p in self.record["passes"] if p["status"] == "applied"]
        left = [f"{p['pass']} {p['status']}: {p['reason']}" for p in self.record["passes"]
                if p["status"] in ("failed", "dropped")]
        if not self.normalized:
            if left:
                return "intake: the steps took the upload as it came; " + "; ".join(left)
            return "intake: nothing needed normalizing"
        check = self.record["check"]
        if check.get("passed"):
            checked = f"outputs equal to the upload's within tolerance (max abs diff {check['max_abs_diff']:.3g})"
        else:
            checked = f"outputs not checked: {check.get('skipped') or 'the upload does not load'}"
        return "intake: " + "; ".join(done + left) + f"; {checked}"


# --- the entry point -----------------------------------------------------------------------------------------

def normalize(original: Path, *, batch: int = 1, input_shapes: Any = None) -> Intake:
    """Normalize the upload at `original`; the result is written beside it (so external data files still resolve).

    `batch`: the batch size the check runs at where the model's batch axis is free; `input_shapes`: the job's
    (StepContext.input_shapes), used to make the check's inputs as the measurement makes them. Never raises:
    whatever goes wrong is recorded and the steps take the upload as it came.
    """
    from workers.quantize.onnx_prep import short_error

    started = time.perf_counter()
    present = set(original.parent.iterdir())
    try:
        intake = _normalize(original, batch=batch, input_shapes=input_shapes)
    except Exception as exc:
        log.warning("intake failed on %s", original, exc_info=True)
        for leftover in set(original.parent.glob("intake-*.onnx")) - present:  # ours only, never the upload's
            leftover.unlink(missing_ok=True)
        intake = Intake(original, {"status": "skipped", "reason": f"normalization failed: {short_error(exc)}",
                                   "passes": [], "check": {"skipped": "not run"}})
    intake.record["duration_s"] = round(time.perf_counter() - started, 3)
    return intake


def _normalize(original: Path, *, batch: int, input_shapes: Any) -> Intake:
    import onnx

    uploaded = onnx.load(str(original), load_external_data=False)
    uploaded_opset = _default_opset(uploaded)
    model, outcomes = _apply(uploaded, PASSES)
    applied = [o.name for o in outcomes if o.status == "applied"]
    result_path, result_opset = original, uploaded_opset
    described: dict[str, Any] = {"skipped": "no pass changed the model"}
    verdict: dict[str, Any] = {}
    if applied:
        # Only now: the upload's own run on the check's inputs costs a session and an inference.
        check = OutputCheck.prepare(original, uploaded, batch=batch, input_shapes=input_shapes)
        del uploaded  # the fallback reads it again; large models should not be held twice meanwhile
        described = check.describe()
        candidate = _write_beside(original, model, "intake-model")
        ok, verdict = check.compare(candidate)
        if ok:
            result_path, result_opset = candidate, _default_opset(model)
        else:
            candidate.unlink(missing_ok=True)
            del model
            result_path, result_opset, verdict = _pass_by_pass(original, outcomes, check, verdict)
    record = {
        "status": "normalized" if result_path != original else "unchanged",
        "model": ("the steps took the normalized model; the measurement compares the upload with the result"
                  if result_path != original else "the steps took the upload as it came"),
        "opset": {"uploaded": uploaded_opset, "normalized": result_opset},
        "passes": [o.record() for o in outcomes],
        "check": described | verdict,
    }
    return Intake(result_path, record)


def _apply(model: onnx.ModelProto, names: tuple[str, ...]) -> tuple[onnx.ModelProto, list[PassOutcome]]:
    """Run the named passes in order; each returns a new model (never changes its input), and one that raises
    leaves the model as it was."""
    from workers.quantize.onnx_prep import short_error

    outcomes = []
    for name in names:
        try:
            model, outcome = PASS_FUNCTIONS[name](model)
        except Exception as exc:
            log.info("intake pass %s failed: %s", name, exc)
            outcome = PassOutcome(name, "failed", reason=short_error(exc))
        outcomes.append(outcome)
    return model, outcomes


def _pass_by_pass(original: Path, outcomes: list[PassOutcome], check: OutputCheck,
                  together: dict[str, Any]) -> tuple[Path, int | None, dict[str, Any]]:
    """The passes together changed the outputs: keep, in order, each pass that leaves them equal on its own."""
    import onnx

    uploaded = onnx.load(str(original), load_external_data=False)
    kept: list[str] = []
    verdict = together
    path, opset = original, _default_opset(uploaded)
    for outcome in outcomes:
        if outcome.status != "applied":
            continue
        model, (retried,) = _apply_on_kept(uploaded, kept, outcome.name)
        outcome.action = retried.action
        if retried.status != "applied":
            outcome.status, outcome.reason = retried.status, retried.reason
            continue
        candidate = _write_beside(original, model, f"intake-{outcome.name}")
        ok, figures = check.compare(candidate)
        if ok:
            if path != original:
                path.unlink(missing_ok=True)
            path, opset, verdict = candidate, _default_opset(model), figures
            kept.append(outcome.name)
        else:
            candidate.unlink(missing_ok=True)
            outcome.status = "dropped"
            outcome.reason = f"it changed the model's outputs ({figures.get('failed') or figures})"
    if path == original:
        verdict = {"passed": None, "note": "no normalization was kept"}
    return path, opset, verdict


def _apply_on_kept(uploaded: onnx.ModelProto, kept: list[str], name: str):
    model, _ = _apply(uploaded, tuple(kept))
    return _apply(model, (name,))


# --- the passes --------------------------------------------------------------------------------------------------

def raise_opset(model: onnx.ModelProto, target: int = TARGET_OPSET) -> tuple[onnx.ModelProto, PassOutcome]:
    """The default-domain opset raised to max(current, target) with onnx's version converter (onnxscript's own
    converter covers opsets 18+ only and hands older ones to this same converter)."""
    from onnx import version_converter

    from workers.quantize.onnx_prep import _raise_ir_version, short_error

    current = _default_opset(model)
    if current is None:
        return model, PassOutcome("opset", "not_needed", reason="the model imports no default-domain opset")
    if current >= target:
        return model, PassOutcome("opset", "not_needed", reason=f"opset {current} is already >= {target}")
    try:
        converted = version_converter.convert_version(model, target)
        _raise_ir_version(converted)
    except Exception as exc:
        return model, PassOutcome("opset", "failed", reason=(
            f"kept opset {current}: onnx's version converter could not raise it to {target} ({short_error(exc)}); "
            "methods that need opset 13 (per-channel QDQ) may refuse the model"))
    return converted, PassOutcome("opset", "applied", action=f"opset {current} -> {target}")


def fold_constants(model: onnx.ModelProto) -> tuple[onnx.ModelProto, PassOutcome]:
    """Every dense Constant node (main graph and subgraphs) lifted into an initializer of its output's name,
    with onnx-ir's LiftConstantsToInitializersPass; Constants that are graph outputs or sparse stay nodes."""
    import onnx_ir as ir
    from onnx_ir.passes.common import LiftConstantsToInitializersPass

    from workers.quantize.onnx_prep import _raise_ir_version

    before = _constants_per_graph(model)
    if not sum(before.values()):
        return model, PassOutcome("constants", "not_needed", reason="no Constant nodes")

    class Lift(LiftConstantsToInitializersPass):
        def _constant_node_attribute_to_tensor(self, node, attr_name, attr_value, initializer_name):
            if attr_name == "sparse_value":  # onnx-ir raises on it; a sparse constant is no weight to quantize
                return None
            return super()._constant_node_attribute_to_tensor(node, attr_name, attr_value, initializer_name)

    ir_model = ir.from_proto(model)
    # All of them, whatever their size: a Constant and an initializer compute the same; the check proves it.
    Lift(lift_all_constants=True, size_limit=0)(ir_model)
    folded = ir.to_proto(ir_model)
    _raise_ir_version(folded)  # IR 3 wants every initializer listed as a graph input
    after = _constants_per_graph(folded)
    main = before["main"] - after["main"]
    sub = before["subgraphs"] - after["subgraphs"]
    if not main and not sub:
        return model, PassOutcome("constants", "not_needed", reason=(
            f"{sum(before.values())} Constant node(s) left as they are (graph outputs or sparse values)"))
    where = f" ({sub} inside If/Loop/Scan subgraphs)" if sub else ""
    kept = sum(after.values())
    left = f"; {kept} left as nodes (graph outputs or sparse values)" if kept else ""
    return folded, PassOutcome("constants", "applied",
                               action=f"folded {main + sub} Constant node(s) into initializers{where}{left}")


def infer_shapes(model: onnx.ModelProto) -> tuple[onnx.ModelProto, PassOutcome]:
    """ONNX shape inference, strict; where it raises, mended by dropping contradicting value_info annotations,
    else run with strict mode off; else the model goes on without it, with the reason."""
    from onnx import shape_inference

    from workers.quantize.onnx_prep import short_error

    def run(proto, strict: bool):
        return shape_inference.infer_shapes(proto, check_type=False, strict_mode=strict, data_prop=True)

    before = _value_info_count(model)
    try:
        inferred = run(model, True)
    except Exception as strict_error:
        reason = short_error(strict_error, 300)
    else:
        added = _value_info_count(inferred) - before
        if added <= 0:
            return model, PassOutcome("shape_inference", "not_needed",
                                      reason="shape inference added nothing to the model's own annotations")
        return inferred, PassOutcome("shape_inference", "applied",
                                     action=f"shape inference typed {added} intermediate tensor(s)")
    stripped, dropped = _without_value_info(model)
    if dropped:
        try:
            inferred = run(stripped, True)
        except Exception:
            pass
        else:
            return inferred, PassOutcome("shape_inference", "applied", action=(
                f"shape inference mended: dropped the export's {dropped} value_info annotation(s), which "
                f"contradicted it ({reason}), and typed {_value_info_count(inferred)} tensor(s) afresh"))
    try:
        inferred = run(stripped, False)
    except Exception as exc:
        return model, PassOutcome("shape_inference", "failed", reason=(
            f"shape inference skipped: it raises on this model even with strict mode off ({short_error(exc, 300)})"))
    return inferred, PassOutcome("shape_inference", "applied", action=(
        f"shape inference ran with strict mode off, typing {_value_info_count(inferred)} tensor(s) "
        f"(strict, it raised: {reason})"))


PASS_FUNCTIONS = {"opset": raise_opset, "constants": fold_constants, "shape_inference": infer_shapes}


def _default_opset(model: onnx.ModelProto) -> int | None:
    from workers.quantize.onnx_prep import default_opset

    return default_opset(model)


def _constants_per_graph(model: onnx.ModelProto) -> dict[str, int]:
    from workers.onnx_tools.graph import graphs

    counts = {"main": 0, "subgraphs": 0}
    for graph in graphs(model.graph):
        key = "main" if graph is model.graph else "subgraphs"
        counts[key] += sum(1 for n in graph.node if n.op_type == "Constant" and n.domain in ("", "ai.onnx"))
    return counts


def _value_info_count(model: onnx.ModelProto) -> int:
    from workers.onnx_tools.graph import graphs

    return sum(len(g.value_info) for g in graphs(model.graph))


def _without_value_info(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    import onnx

    from workers.onnx_tools.graph import graphs

    stripped = onnx.ModelProto()
    stripped.CopyFrom(model)
    dropped = 0
    for graph in graphs(stripped.graph):
        dropped += len(graph.value_info)
        del graph.value_info[:]
    return stripped, dropped


def _write_beside(original: Path, model: onnx.ModelProto, stem: str) -> Path:
    """Save next to the upload: its external data files (relative locations) resolve from there too."""
    import onnx

    path = original.parent / f"{stem}.onnx"
    suffix = 1
    while path.exists():
        path, suffix = original.parent / f"{stem}-{suffix}.onnx", suffix + 1
    onnx.save(model, str(path))
    return path


# --- the check ---------------------------------------------------------------------------------------------------

@dataclass
class OutputCheck:
    """The upload's outputs on synthetic inputs, and the comparison of a normalized model's with them."""

    feeds: dict[str, Any] | None = None
    expected: list[Any] | None = None
    output_names: list[str] = field(default_factory=list)
    batch: int | None = None
    skipped: str | None = None
    # The upload does not load in ONNX Runtime: a normalized model is then only checked to load no worse.
    original_loads: bool = True

    @classmethod
    def prepare(cls, original: Path, model: onnx.ModelProto, *, batch: int, input_shapes: Any) -> OutputCheck:
        import numpy as np

        from workers.onnx_tools.inputs import plan_inputs
        from workers.quantize.onnx_prep import short_error

        try:
            session = _session(original)
        except Exception as exc:
            return cls(skipped=f"the uploaded model does not load in ONNX Runtime ({short_error(exc)})",
                       original_loads=False)
        try:
            extra = {"shapes": input_shapes} if input_shapes else {}
            plan = plan_inputs({"baseline": session, "result": session}, {"baseline": model, "result": model},
                               **extra)
            size = plan.fixed_batch or batch
            feeds = plan.feeds(size, np.random.default_rng(CHECK_SEED))["baseline"]
            expected = session.run(None, feeds)
        except Exception as exc:
            message = getattr(exc, "message", None) or short_error(exc, 300)
            return cls(skipped=f"the uploaded model does not run on synthetic inputs ({message}); the measurement "
                               "reports this with its own code")
        return cls(feeds=feeds, expected=expected, output_names=[o.name for o in session.get_outputs()], batch=size)

    def describe(self) -> dict[str, Any]:
        if self.skipped or self.feeds is None:  # (feeds are made whenever the check is not skipped)
            return {"skipped": self.skipped, "tolerance": TOLERANCE_TEXT}
        return {"tolerance": TOLERANCE_TEXT, "batch": self.batch, "seed": CHECK_SEED,
                "inputs": {name: list(value.shape) for name, value in self.feeds.items()},
                "inputs_made": "as the measurement makes them (workers.onnx_tools.inputs), same seed for both models"}

    def compare(self, candidate: Path) -> tuple[bool, dict[str, Any]]:
        """(agrees, figures): the candidate's outputs against the upload's, on the same inputs."""
        from workers.quantize.onnx_prep import short_error

        try:
            session = _session(candidate)
        except Exception as exc:
            if not self.original_loads:
                return True, {"passed": None}  # it fails as the upload does; the measurement will say so
            return False, {"passed": False, "failed": f"it does not load in ONNX Runtime ({short_error(exc)})"}
        if self.skipped or self.feeds is None or self.expected is None:  # (both are made unless skipped)
            return True, {"passed": None}
        names = [o.name for o in session.get_outputs()]
        if names != self.output_names:
            return False, {"passed": False, "failed": f"its outputs are {names}, the upload's {self.output_names}"}
        try:
            got = session.run(None, self.feeds)
        except Exception as exc:
            return False, {"passed": False, "failed": f"it does not run on the check's inputs ({short_error(exc)})"}
        outputs = [compare_output(name, want, have) for name, want, have in zip(names, self.expected, got)]
        bad = [o for o in outputs if not o["within"]]
        figures = {
            "passed": not bad,
            "max_abs_diff": max((o["max_abs_diff"] for o in outputs), default=0.0),
            "min_cosine": min((o["cosine"] for o in outputs if o["cosine"] is not None), default=None),
            "outputs": outputs,
        }
        if bad:
            figures["failed"] = "; ".join(
                f"output '{o['name']}': " + (o.get("reason") or
                                             f"max abs diff {o['max_abs_diff']:.3g} (allowed {o['allowed']:.3g}), "
                                             f"cosine {o['cosine']:.6f}") for o in bad)
        return not bad, figures


def compare_output(name: str, expected, got) -> dict[str, Any]:
    """One output of the normalized model against the upload's, as TOLERANCE_TEXT says."""
    import numpy as np

    from workers.onnx_tools import similarity

    expected, got = np.asarray(expected), np.asarray(got)
    entry: dict[str, Any] = {"name": name, "shape": list(expected.shape)}
    if expected.shape != got.shape or expected.dtype != got.dtype:
        return entry | {"within": False, "max_abs_diff": float("inf"), "cosine": None, "allowed": 0.0,
                        "reason": f"shape/dtype {list(got.shape)} {got.dtype}, the upload's "
                                  f"{list(expected.shape)} {expected.dtype}"}
    if expected.dtype.kind not in "fc":
        equal = bool(np.array_equal(expected, got))
        return entry | {"within": equal, "max_abs_diff": 0.0 if equal else float("inf"), "cosine": None,
                        "allowed": 0.0, **({} if equal else {"reason": "integer/bool values differ"})}
    want, have = expected.astype(np.float64).ravel(), got.astype(np.float64).ravel()
    nan_want, nan_have = np.isnan(want), np.isnan(have)
    if not np.array_equal(nan_want, nan_have):
        return entry | {"within": False, "max_abs_diff": float("inf"), "cosine": None, "allowed": 0.0,
                        "reason": "NaN at other positions than the upload's"}
    want, have = want[~nan_want], have[~nan_want]
    diff = float(np.max(np.abs(want - have))) if want.size else 0.0
    scale = float(np.max(np.abs(want))) if want.size else 0.0
    cosine = similarity.cosine(want, have)
    allowed = ABS_SCALE * (1.0 + scale)
    within = diff <= allowed and cosine >= MIN_COSINE
    return entry | {"within": within, "max_abs_diff": diff, "max_abs": scale, "cosine": round(cosine, 9),
                    "allowed": allowed}


def _session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4  # a failing run is reported in the record; keep the worker's log clean
    options.intra_op_num_threads = 1  # small inputs; the machine is shared with the job's own work
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
