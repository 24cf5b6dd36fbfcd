"""Per-node sensitivity: which node breaks the model when it alone is quantized, and which nodes make it slow.

For every node of an op type ONNX Runtime's QDQ quantizer turns into an integer kernel (SENSITIVE_OP_TYPES),
the float model is rebuilt in memory with QuantizeLinear/DequantizeLinear in front of that node's inputs only,
run on the given feeds, and its outputs compared with the float model's (worst sample's cosine and the mean,
padded positions left out as the measurement does). Activations get ONNX Runtime's default static scheme:
uint8, asymmetric, the range being the activation's min/max over the calibration feeds (read once, from one
run of the float model with every activation added as an output); weights are int8, symmetric, per output
channel as `per_channel=True` quantizes them, and a Conv/Gemm bias int32 at the input's scale times the
weight's. The fp16 figures do the same with the inputs and weights rounded to float16 and back: the rounding,
not float16 arithmetic inside the kernel.

Each node's share of run time comes from ONNX Runtime's profiler, in the float model and in a quantized
candidate where one is given. ORT renames what it fuses or re-lays out (`r0_nchwc`, `conv1_token_18`,
`c0_bias_add`), so a profiled node is traced back to the float node by, in turn: its name, the float weight it
consumes (the quantizer keeps weight names: `conv1_w_quantized`), the float tensor its name is made from, the
float activation it reads, and for the quantize/dequantize/reorder nodes around a kernel, that kernel. What
cannot be traced is counted as unmapped, never spread over the nodes.

    table = node_sensitivity(path, feeds=feeds, calibration=None, quantized_path=qdq_path, deadline=t + 60)
    table.rows[0].node        # the node whose int8 version moves the output most
    report.sensitivity = table.to_json()
"""
from __future__ import annotations

import json
import math
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from app.catalog.quantize.int8_static import ORT_STATIC_OP_TYPES

if TYPE_CHECKING:  # pragma: no cover
    import onnx

# The op types whose quantized form is an integer kernel that can change the run time (QLinearConv, QGemm,
# QLinearAdd, int8 pooling, ...): the QDQ registry's ops less the pure data movement (Reshape, Transpose, ...),
# the activations the quantizer removes (Relu, Clip) and those that stay float kernels behind DequantizeLinear
# on CPU (LayerNormalization, Where, TopK, ...).
SENSITIVE_OP_TYPES = frozenset(ORT_STATIC_OP_TYPES) & {
    "Conv", "ConvTranspose", "MatMul", "Gemm", "Add", "Mul", "Concat", "AveragePool", "GlobalAveragePool",
    "MaxPool", "Resize", "Softmax", "Sigmoid", "LeakyRelu",
}
# The ops whose initializer input 1 is a weight quantized per output channel, and that channel's axis.
WEIGHT_CHANNEL_AXIS = {"Conv": 0, "ConvTranspose": 1, "MatMul": -1}  # Gemm: 0 with transB, else 1
# Ops that quantize only their data input (the rest are shapes, scales, axes).
DATA_INPUT_ONLY = frozenset({"Resize", "MaxPool", "AveragePool", "GlobalAveragePool", "Softmax", "Sigmoid",
                             "LeakyRelu"})
PROFILE_WARMUP, PROFILE_RUNS = 3, 10
FLOAT = 1  # onnx.TensorProto.FLOAT
UNMAPPED: Literal["unmapped"] = "unmapped"
# A node left out of the table because the deadline came first (SkippedNode.reason).
DEADLINE_REASON = "the deadline passed before it was measured"
# A profiled node's name is an original name plus one of these separators and a suffix ORT added.
SUFFIX_SEPARATORS = ("_", "/", ":", ".")
# The quantizer's names for what it made of a float weight `w`: w_quantized, w_scale, w_zero_point, ...
WEIGHT_SUFFIX = re.compile(r"(_quantized|_scale|_zero_point|_DequantizeLinear(_Output)?|_QuantizeLinear(_Output)?|"
                           r"_reshape(_output)?|_TransposeLinear)+$")
# Ops around a kernel that belong to it: their time is the kernel's (quantizing its input, re-laying it out).
AROUND_KERNEL = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "ReorderInput",
                           "ReorderOutput", "Transpose", "Cast", "Reshape"})
# What ORT fuses into the kernel before it (Conv + BatchNormalization + Relu is one Conv, named after the Relu's
# output).
FUSED_INTO_KERNEL = frozenset({"BatchNormalization", "Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid",
                               "HardSwish", "Tanh", "Add", "Mul"})
# Fused kernels whose name says nothing of the float op they start from (the rest: _family strips QLinear, Fused,
# Integer, ...). SkipLayerNormalization is a residual Add and the LayerNormalization after it.
KERNEL_FAMILY = {"DynamicQuantizeMatMul": "MatMul", "MatMulIntegerToFloat": "MatMul", "MatMulNBits": "MatMul",
                 "FusedMatMul": "MatMul", "SkipLayerNormalization": "Add", "SkipSimplifiedLayerNormalization": "Add",
                 "BiasGelu": "Add", "BiasAdd": "Add", "BiasSoftmax": "Softmax"}

TimeShare = float | Literal["unmapped"] | None


@dataclass
class Figures:
    """The model's output against the float model's, one variant: the worst sample's cosine and the mean."""

    worst_cosine: float
    mean_cosine: float

    def to_json(self) -> dict[str, float]:
        return {"worst_cosine": round(self.worst_cosine, 8), "mean_cosine": round(self.mean_cosine, 8)}


@dataclass
class SensitivityRow:
    node: str
    op_type: str
    int8: Figures | None
    fp16: Figures | None
    float_time_share: TimeShare
    quantized_time_share: TimeShare

    def to_json(self) -> dict[str, Any]:
        return {
            "node": self.node, "op_type": self.op_type,
            "int8": None if self.int8 is None else self.int8.to_json(),
            "fp16": None if self.fp16 is None else self.fp16.to_json(),
            "float_time_share": _share_json(self.float_time_share),
            "quantized_time_share": _share_json(self.quantized_time_share),
        }


@dataclass
class SkippedNode:
    node: str
    op_type: str
    reason: str


@dataclass
class SensitivityTable:
    """Rows ranked by int8 error (worst cosine ascending), what they were measured on, and what was not."""

    rows: list[SensitivityRow]
    samples: int
    source: str
    calibration: str
    seconds: float
    threads: int
    quantized_model: str | None
    skipped: list[SkippedNode] = field(default_factory=list)
    # Profiled time no float node could be traced to, per model, and the profiled nodes that make it up.
    unmapped_time_share: dict[str, float] = field(default_factory=dict)
    unmapped_nodes: dict[str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The report's `sensitivity` (app.reports.SensitivityReport)."""
        return {
            "rows": [row.to_json() for row in self.rows],
            "samples": self.samples, "source": self.source, "calibration": self.calibration,
            "seconds": round(self.seconds, 3), "threads": self.threads, "quantized_model": self.quantized_model,
            "skipped": [{"node": s.node, "op_type": s.op_type, "reason": s.reason} for s in self.skipped],
            "unmapped_time_share": {k: round(v, 6) for k, v in self.unmapped_time_share.items()},
            "unmapped_nodes": self.unmapped_nodes,
            "notes": self.notes,
        }


def _share_json(share: TimeShare) -> float | str | None:
    return round(share, 6) if isinstance(share, float) else share


def node_sensitivity(model_path: Path, *, feeds: list[dict[str, np.ndarray]], calibration: list[dict] | None,
                     quantized_path: Path | None = None, threads: int = 1, deadline: float | None = None,
                     fp16: bool = True, max_nodes: int = 400, source: str = "the feeds given") -> SensitivityTable:
    """The sensitivity table of the float model at `model_path` (see the module's docstring).

    feeds: the inputs to judge on (eval samples or random ones), one dict per run; calibration: the feeds whose
    activation ranges set the int8 scales (None: `feeds`); source: what the feeds are, for the report; fp16:
    also measure each node rounded to float16 (else its fp16 figures are None). Time shares are profiled on the
    feeds as given (their batch size), `threads` intra-op threads. Nodes are measured in order of their float time
    share (the most costly first), at most `max_nodes`, until `deadline` (a time.monotonic() value) passes: the
    rest are listed in `skipped` with the reason.
    """
    import onnx

    from workers.quantize import onnx_prep

    if not feeds:
        raise ValueError("node_sensitivity needs at least one feed")
    started = time.monotonic()
    model, notes = _quantizable(onnx.load(str(model_path)))
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    candidates = [node for node in graph.node if node.op_type in SENSITIVE_OP_TYPES and node.domain in ("", "ai.onnx")]
    if any(node.op_type in SENSITIVE_OP_TYPES for _, _, sub in onnx_prep.subgraph_sites(graph) for node in sub.node):
        notes.append("nodes inside If/Loop/Scan bodies were not measured (the static quantizer leaves them float)")
    table = SensitivityTable(
        rows=[], samples=sum(_batch_of(feed) for feed in feeds), source=source,
        calibration=f"{len(calibration)} calibration feed(s)" if calibration else "the judged feeds (no calibration data)",
        seconds=0.0, threads=threads, quantized_model=None if quantized_path is None else quantized_path.name,
        notes=notes)

    def expired() -> bool:
        return deadline is not None and time.monotonic() >= deadline

    def finish(rest: list[onnx.NodeProto], reason: str) -> SensitivityTable:
        table.skipped.extend(SkippedNode(node.name, node.op_type, reason) for node in rest)
        table.rows.sort(key=_rank)
        table.seconds = time.monotonic() - started
        return table

    if candidates and not expired():
        ranges, reference = _ranges_and_reference(model, candidates, initializers, feeds, calibration, threads)
        # Shape arithmetic (a Concat or Mul of int64 sizes) has nothing to quantize.
        candidates = [node for node in candidates if any(
            name in ranges or (name in initializers and initializers[name].data_type == FLOAT) for name in node.input)]
    if not candidates:
        notes.append(f"the model has no node of the op types measured ({', '.join(sorted(SENSITIVE_OP_TYPES))}) "
                     "that reads a float tensor")
        return finish([], "")
    if expired():
        return finish(candidates, DEADLINE_REASON)

    with tempfile.TemporaryDirectory(prefix="sensitivity-") as scratch:
        folder = Path(scratch)
        profiled = _profile(model.SerializeToString(), feeds, threads, folder / "float")
        float_shares, table.unmapped_time_share["float"], table.unmapped_nodes["float"] = \
            _attribute(profiled, graph, initializers)
        quantized_shares: dict[str, float] | None = None
        if quantized_path is not None and not expired():
            profiled = _profile(str(quantized_path), feeds, threads, folder / "quantized")
            quantized_shares, table.unmapped_time_share["quantized"], table.unmapped_nodes["quantized"] = \
                _attribute(profiled, graph, initializers)
        elif quantized_path is not None:
            notes.append("the quantized model was not profiled: the deadline passed")

        # The most costly nodes first, so that a deadline or max_nodes leaves out those that matter least.
        order = sorted(candidates, key=lambda node: -float_shares.get(node.name, 0.0))
        measured, beyond = order[:max_nodes], order[max_nodes:]
        outputs = [o.name for o in graph.output]
        opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
        if opset < 10:
            notes.append(f"int8 was not measured: the model's opset ({opset}) has no QuantizeLinear (opset 10)")
        elif opset < 13:
            notes.append(f"weights were quantized per tensor, not per channel: the model's opset ({opset}) has no "
                         "per-axis DequantizeLinear (opset 13)")
        variants = _Variants(model, initializers, ranges, per_channel=opset >= 13, threads=threads, folder=folder)
        for index, node in enumerate(measured):
            if expired():
                return finish(measured[index:] + beyond, DEADLINE_REASON)
            try:
                int8 = None if opset < 10 else _judge(variants.int8(node), outputs, feeds, reference)
                half = _judge(variants.fp16(node), outputs, feeds, reference) if fp16 else None
            except Exception as exc:  # one node ORT cannot run quantized must not lose the others' figures
                table.skipped.append(SkippedNode(node.name, node.op_type,
                                                 f"its variant failed: {onnx_prep.short_error(exc, 300)}"))
                continue
            table.rows.append(SensitivityRow(
                node=node.name, op_type=node.op_type, int8=int8, fp16=half,
                float_time_share=float_shares.get(node.name, UNMAPPED),
                quantized_time_share=None if quantized_shares is None else quantized_shares.get(node.name, UNMAPPED)))
    return finish(beyond, f"beyond max_nodes={max_nodes} (nodes are measured by float time share, largest first)")


def _quantizable(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """The model as the quantizers see it (workers.quantize.onnx_prep): nodes named as they name them, weights
    in Constant nodes folded into initializers, the opset raised to 13 (per-channel QDQ), weights that old
    exports also list as inputs taken out of the inputs. Notes say what changed."""
    from workers.quantize import onnx_prep

    notes: list[str] = []
    renamed = onnx_prep.name_nodes(model.graph)
    if renamed:
        notes.append(f"named {renamed} unnamed or duplicate-named node(s) <op_type>_<index>, as the quantizers do, "
                     "so a row's node can be excluded by that name")
    folded = onnx_prep.fold_constants_everywhere(model.graph)[0]
    if folded:
        notes.append(f"folded {folded} Constant node(s) into initializers, as the quantizers do (weights)")
    model, upgraded = onnx_prep.upgrade_opset(model, onnx_prep.TARGET_OPSET)
    if upgraded:
        notes.append(upgraded)
    if onnx_prep.drop_initializer_inputs(model.graph):
        notes.append("weights listed as graph inputs (an old-IR export) were taken out of the inputs, as the "
                     "quantizers do")
    return model, notes


def _rank(row: SensitivityRow) -> tuple[float, float]:
    if row.int8 is None:
        return (math.inf, math.inf)
    return (row.int8.worst_cosine, row.int8.mean_cosine)


def _batch_of(feed: dict[str, np.ndarray]) -> int:
    """Samples in one feed: the leading axis of its first input with one (1 for scalars)."""
    return next((int(np.shape(value)[0]) for value in feed.values() if np.ndim(value) >= 1), 1)


def _session(model: bytes | str, threads: int, *, optimize: bool = False, profile_prefix: Path | None = None,
             optimized_path: Path | None = None, shared: _SharedWeights | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # Between runs the outputs are compared in numpy: threads left spinning for the next run would take its cores
    # (ppocr-rec: the comparisons took 5.7 s of 20 s with spinning on; the measurement turns it off too).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # Variants and their reference run the graph as written: Q/DQ and Casts stay in place (a fused kernel would
    # differ in nothing but speed) and no constant folding reads a shared weight's placeholder (_SharedWeights).
    # The profiled models run at the level the measurement runs them at.
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = str(profile_prefix)
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    if shared is not None:
        shared.apply(options)
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


# --- run time per node ---------------------------------------------------------------------------------

@dataclass
class Profile:
    durations: dict[str, float]     # microseconds per profiled node: its median over the timed runs
    graph: Any                      # the optimized graph ORT ran (onnx.GraphProto), to trace names back


def _profile(model: bytes | str, feeds: list[dict[str, np.ndarray]], threads: int, prefix: Path) -> Profile:
    """Kernel time per node in PROFILE_RUNS runs after PROFILE_WARMUP, from ONNX Runtime's profiler."""
    import onnx

    optimized = prefix.with_suffix(".optimized.onnx")
    session = _session(model, threads, optimize=True, profile_prefix=prefix, optimized_path=optimized)
    names = {i.name for i in session.get_inputs()}
    for run in range(PROFILE_WARMUP + PROFILE_RUNS):
        feed = feeds[run % len(feeds)]
        session.run(None, {k: v for k, v in feed.items() if k in names})
    events = json.loads(Path(session.end_profiling()).read_text())
    runs = sorted((e["ts"], e["ts"] + e.get("dur", 0)) for e in events
                  if e.get("cat") == "Session" and e.get("name") == "model_run")[PROFILE_WARMUP:]
    per_run: dict[str, list[float]] = {}
    for event in events:
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time"):
            continue
        within = next((i for i, (start, end) in enumerate(runs) if start <= event["ts"] <= end), None)
        if within is not None:
            times = per_run.setdefault(event["name"][: -len("_kernel_time")], [0.0] * len(runs))
            times[within] += float(event.get("dur", 0))
    # The median run of each node: a run the OS preempted inflates one kernel's time, not its share.
    durations = {name: float(np.median(times)) for name, times in per_run.items()}
    return Profile(durations=durations, graph=onnx.load(str(optimized), load_external_data=False).graph)


def _family(op_type: str) -> str:
    """The float op a fused or quantized kernel computes: QLinearConv, ConvInteger, FusedConv -> Conv."""
    if op_type in KERNEL_FAMILY:
        return KERNEL_FAMILY[op_type]
    for prefix in ("QLinear", "NhwcFused", "Fused", "Nhwc", "Q"):
        if op_type.startswith(prefix) and op_type[len(prefix):len(prefix) + 1].isupper():
            op_type = op_type[len(prefix):]
            break
    return op_type.removesuffix("Integer")


def _attribute(profile: Profile, graph: onnx.GraphProto,
               initializers: dict[str, Any]) -> tuple[dict[str, float], float, list[str]]:
    """Each float node's share of the profiled time; the share nothing could be traced to, and its nodes."""
    total = sum(profile.durations.values())
    nodes = {node.name: node for node in graph.node}
    producer, consumers = _links(graph)
    by_length = sorted(nodes, key=len, reverse=True)

    def named(text: str) -> str | None:
        """The float node (or the producer of the float tensor) `text` is named after."""
        if text in nodes:
            return text
        if text in producer:
            return producer[text].name
        for name in by_length:
            if text.startswith(name) and text[len(name)] in SUFFIX_SEPARATORS:
                return name
        for tensor, node in producer.items():
            if text.startswith(tensor) and len(text) > len(tensor) and text[len(tensor)] in SUFFIX_SEPARATORS:
                return node.name
        return None

    def walk_back(name: str, op_type: str) -> str:
        """From a fused chain's last node (Relu, Add) back to the node of the kernel's own op (Conv)."""
        frontier, family = [nodes[name]], _family(op_type)
        for _ in range(3):
            if any(node.op_type == family for node in frontier):
                return next(node.name for node in frontier if node.op_type == family)
            frontier = [producer[i] for node in frontier if node.op_type in FUSED_INTO_KERNEL
                        for i in node.input if i in producer]
        return name

    graph_inputs = {i.name for i in graph.input}
    kernels = {node.name: node for node in profile.graph.node}
    owner: dict[str, str] = {}
    for name in profile.durations:
        kernel = kernels.get(name)
        op_type = kernel.op_type if kernel is not None else ""
        found = named(name)
        if found is not None and op_type in AROUND_KERNEL and nodes[found].op_type != op_type:
            found = None  # x_QuantizeLinear is named after its tensor, not a float node of its own
        elif found is not None and op_type:
            found = walk_back(found, op_type)
        elif found is None and kernel is not None and op_type not in AROUND_KERNEL:
            weights = {WEIGHT_SUFFIX.sub("", i) for i in kernel.input if i not in producer} & set(initializers)
            readers = {c.name for w in weights for c in consumers.get(w, [])}
            activations = {c.name for i in kernel.input if i in producer or i in graph_inputs
                           for c in consumers.get(i, []) if c.op_type == _family(op_type)}
            for evidence in (readers, activations):
                if len(evidence) == 1:
                    found = evidence.pop()
                    break
        if found is not None:
            owner[name] = found
    # Quantize/dequantize/reorder nodes belong to the kernel they feed, or that feeds them (an output's DQ).
    made_by, read_by = _links(profile.graph)
    for _ in range(4):  # chains: QuantizeLinear -> Transpose -> QLinearConv
        for name in profile.durations:
            kernel = kernels.get(name)
            if name in owner or kernel is None or kernel.op_type not in AROUND_KERNEL:
                continue
            after = {owner.get(n.name) for out in kernel.output for n in read_by.get(out, [])}
            before = {owner.get(made_by[i].name) for i in kernel.input if i in made_by}
            sides = (before, after) if kernel.op_type in ("DequantizeLinear", "ReorderOutput") else (after, before)
            for side in sides:
                if len(side) == 1:
                    (only,) = side
                    if only is not None:
                        owner[name] = only
                        break
    shares: dict[str, float] = {}
    for name, duration in profile.durations.items():
        if name in owner and total:
            shares[owner[name]] = shares.get(owner[name], 0.0) + duration / total
    left = sorted((n for n in profile.durations if n not in owner), key=lambda n: -profile.durations[n])
    return shares, (sum(profile.durations[n] for n in left) / total if total else 0.0), left[:20]


def _links(graph: onnx.GraphProto) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    """The node producing each tensor, and the nodes reading it."""
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    return producer, consumers


# --- output error per variant --------------------------------------------------------------------------

def _ranges_and_reference(model: onnx.ModelProto, candidates: list[Any], initializers: dict[str, Any],
                          feeds: list[dict[str, np.ndarray]], calibration: list[dict] | None,
                          threads: int) -> tuple[dict[str, tuple[float, float]], list[list[np.ndarray]]]:
    """The min/max of every float activation a candidate reads, over the calibration feeds (one run of the model
    with each added as an output), and the float model's outputs on `feeds`."""
    import onnx

    graph_inputs = {i.name for i in model.graph.input}
    wanted = sorted({name for node in candidates for name in node.input
                     if name and name not in initializers})
    added = [name for name in wanted if name not in graph_inputs and name not in {o.name for o in model.graph.output}]
    for name in added:
        model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    try:
        session = _session(model.SerializeToString(), threads)
    finally:
        del model.graph.output[len(model.graph.output) - len(added):]
    names = [o.name for o in session.get_outputs()]
    inputs = {i.name for i in session.get_inputs()}
    first = len(names) - len(added)
    ranges: dict[str, tuple[float, float]] = {}

    def run(feed: dict[str, np.ndarray], *, calibrating: bool) -> list[np.ndarray]:
        got = session.run(None, {k: v for k, v in feed.items() if k in inputs})
        if calibrating:
            seen = dict(zip(names, got)) | {k: np.asarray(v) for k, v in feed.items()}
            for name in wanted:
                value = seen.get(name)
                if value is None or value.dtype != np.float32 or not value.size:
                    continue
                low, high = float(value.min()), float(value.max())
                old = ranges.get(name, (low, high))
                ranges[name] = (min(old[0], low), max(old[1], high))
        return got[:first]

    for feed in calibration or ():
        run(feed, calibrating=True)
    reference = [run(feed, calibrating=calibration is None) for feed in feeds]
    return ranges, reference


def _judge(session: Any, outputs: list[str], feeds: list[dict[str, np.ndarray]],
           reference: list[list[np.ndarray]]) -> Figures:
    """A variant's outputs against the float model's on every feed: per-sample cosines, padding left out."""
    from workers.measure.fidelity import OutputComparison, padding_mask

    inputs = {i.name for i in session.get_inputs()}
    comparisons = [OutputComparison(name, name, "") for name in outputs]
    for feed, expected in zip(feeds, reference):
        got = session.run(None, {k: v for k, v in feed.items() if k in inputs})
        batch = _batch_of(feed)
        keep = padding_mask(feed, batch)
        for comparison, want, have in zip(comparisons, expected, got):
            comparison.add(want, have, batch, keep)
    cosines = [c.cosines for c in comparisons if c.cosines]
    if not cosines:
        raise ValueError("the model has no float output to compare")
    return Figures(worst_cosine=float(min(min(c) for c in cosines)),
                   mean_cosine=float(np.mean([np.mean(c) for c in cosines])))


class _SharedWeights:
    """The model's large initializers, handed to every variant's session by reference (SessionOptions.add_initializer)
    instead of serialized into each: a variant of a 90 MB encoder then loads in 0.06 s, where serializing took 0.12 s
    and loading 0.2 s. In the graph each becomes a reference to an empty placeholder file, which ONNX Runtime checks
    exists but never reads (the added initializer replaces it)."""

    PLACEHOLDER = "shared-initializers.bin"
    MIN_BYTES = 16 * 1024

    def __init__(self, graph: onnx.GraphProto, folder: Path) -> None:
        import onnxruntime as ort
        from onnx import TensorProto, numpy_helper

        self.folder = folder
        (folder / self.PLACEHOLDER).touch()
        self.arrays: dict[str, np.ndarray] = {}
        self.values: dict[str, Any] = {}
        for init in graph.initializer:
            if init.ByteSize() < self.MIN_BYTES:
                continue
            array = np.ascontiguousarray(numpy_helper.to_array(init))
            if array.dtype.kind not in "biuf":
                continue
            self.arrays[init.name] = array
            self.values[init.name] = ort.OrtValue.ortvalue_from_numpy(array)
            for data in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
                init.ClearField(data)
            init.data_location = TensorProto.EXTERNAL
            del init.external_data[:]
            for key, value in (("location", self.PLACEHOLDER), ("offset", "0"), ("length", str(array.nbytes))):
                entry = init.external_data.add()
                entry.key, entry.value = key, value

    def array(self, init: Any) -> np.ndarray:
        from onnx import numpy_helper

        return self.arrays[init.name] if init.name in self.arrays else numpy_helper.to_array(init)

    def apply(self, options: Any) -> None:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(self.folder))
        for name, value in self.values.items():
            options.add_initializer(name, value)

    def restore(self, graph: onnx.GraphProto) -> None:
        """Put the data back into the graph (where ONNX Runtime refuses the placeholders)."""
        from onnx import numpy_helper

        for init in graph.initializer:
            if init.name in self.arrays:
                init.CopyFrom(numpy_helper.from_array(self.arrays[init.name], init.name))


class _Variants:
    """Sessions of the model with one node's inputs quantized (or rounded to float16), the rest float.

    The model is edited in place and restored after serializing: nodes and initializers are appended (ONNX
    Runtime sorts the graph itself) and the node's inputs rewired, so no variant copies the whole model, and its
    large weights are shared by every session rather than serialized into each (_SharedWeights).
    """

    def __init__(self, model: onnx.ModelProto, initializers: dict[str, Any], ranges: dict[str, tuple[float, float]],
                 *, per_channel: bool, threads: int, folder: Path) -> None:
        self.model, self.initializers, self.ranges, self.per_channel = model, initializers, ranges, per_channel
        self.threads = threads
        shared = _SharedWeights(model.graph, folder)
        self.shared: _SharedWeights | None = shared
        try:
            _session(model.SerializeToString(), threads, shared=shared)
        except Exception:  # an ONNX Runtime that will not take them: every variant carries its weights
            shared.restore(model.graph)
            self.shared = None

    def int8(self, node: onnx.NodeProto) -> Any:
        from onnx import helper, numpy_helper

        new_nodes: list[Any] = []
        new_inits: list[Any] = []
        rewired: dict[int, str] = {}
        act_scale: float | None = None
        weight_scale: np.ndarray | None = None
        for index, name in enumerate(node.input):
            if not name or (node.op_type in DATA_INPUT_ONLY and index > 0) or (
                    node.op_type in ("Conv", "ConvTranspose", "Gemm") and index == 2):
                continue
            tag = f"{name}::sensitivity{index}"
            init = self.initializers.get(name)
            if init is not None:
                if init.data_type != FLOAT:
                    continue
                axis = self._channel_axis(node, index, init)
                q, scale = _quantize_weight(self._array(init), axis)
                if index == 1:
                    weight_scale = scale
                new_inits += [numpy_helper.from_array(q, f"{tag}_q"), numpy_helper.from_array(scale, f"{tag}_s"),
                              numpy_helper.from_array(np.zeros_like(q, shape=scale.shape), f"{tag}_z")]
                new_nodes.append(_dequantize(tag, axis))
            elif name in self.ranges:
                zero, scale = _activation_params(*self.ranges[name])
                if index == 0:
                    act_scale = float(scale)
                new_inits += [numpy_helper.from_array(np.asarray(scale, np.float32), f"{tag}_s"),
                              numpy_helper.from_array(np.asarray(zero, np.uint8), f"{tag}_z")]
                new_nodes += [helper.make_node("QuantizeLinear", [name, f"{tag}_s", f"{tag}_z"], [f"{tag}_q"]),
                              _dequantize(tag, None)]
            else:
                continue  # not a float tensor (shapes, indices)
            rewired[index] = f"{tag}_dq"
        bias = node.input[2] if node.op_type in ("Conv", "ConvTranspose", "Gemm") and len(node.input) > 2 else ""
        if bias in self.initializers and act_scale is not None and weight_scale is not None:
            dequantized = self._bias(self.initializers[bias], act_scale, weight_scale, node)
            if dequantized is not None:
                new_nodes.append(dequantized[0])
                new_inits += dequantized[1]
                rewired[2] = dequantized[0].output[0]
        return self._open(node, new_nodes, new_inits, rewired)

    def fp16(self, node: onnx.NodeProto) -> Any:
        from onnx import TensorProto, helper

        new_nodes: list[Any] = []
        rewired: dict[int, str] = {}
        for index, name in enumerate(node.input):
            init = self.initializers.get(name)
            is_float = init.data_type == FLOAT if init is not None else name in self.ranges
            if not name or not is_float:
                continue
            tag = f"{name}::sensitivity{index}"
            new_nodes += [helper.make_node("Cast", [name], [f"{tag}_h"], to=TensorProto.FLOAT16),
                          helper.make_node("Cast", [f"{tag}_h"], [f"{tag}_f"], to=TensorProto.FLOAT)]
            rewired[index] = f"{tag}_f"
        return self._open(node, new_nodes, [], rewired)

    def _bias(self, init: Any, act_scale: float, weight_scale: np.ndarray, node: onnx.NodeProto) -> tuple[Any, list[Any]] | None:
        """A float bias as int32 at the input's scale times the weight's (ORT's quantize_bias_static), behind its
        DequantizeLinear; None where ORT would leave it float (a Gemm's beta, a bias not one value per channel)."""
        from onnx import numpy_helper

        values = self._array(init).astype(np.float64)
        if init.data_type != FLOAT or _beta(node) != 1.0 or values.ndim != 1 or \
                weight_scale.size not in (1, values.size):
            return None
        scale = (act_scale * weight_scale.astype(np.float64)).astype(np.float32)
        q = np.clip(np.rint(values / np.where(scale > 0, scale, 1.0)), -2**31, 2**31 - 1).astype(np.int32)
        tag = f"{init.name}::sensitivity2"
        inits = [numpy_helper.from_array(q, f"{tag}_q"), numpy_helper.from_array(scale, f"{tag}_s"),
                 numpy_helper.from_array(np.zeros(scale.shape, np.int32), f"{tag}_z")]
        return _dequantize(tag, 0 if scale.ndim == 1 else None), inits

    def _channel_axis(self, node: onnx.NodeProto, index: int, init: Any) -> int | None:
        rank = len(init.dims)
        if not self.per_channel or index != 1 or rank < 2:
            return None
        if node.op_type == "Gemm":
            return 0 if any(a.name == "transB" and a.i for a in node.attribute) else 1
        axis = WEIGHT_CHANNEL_AXIS.get(node.op_type)
        return None if axis is None else axis % rank

    def _array(self, init: Any) -> np.ndarray:
        from onnx import numpy_helper

        return numpy_helper.to_array(init) if self.shared is None else self.shared.array(init)

    def _open(self, node: onnx.NodeProto, new_nodes: list[Any], new_inits: list[Any], rewired: dict[int, str]) -> Any:
        return _session(self._serialized(node, new_nodes, new_inits, rewired), self.threads, shared=self.shared)

    def _serialized(self, node: onnx.NodeProto, new_nodes: list[Any], new_inits: list[Any],
                    rewired: dict[int, str]) -> bytes:
        graph = self.model.graph
        original = list(node.input)
        graph.node.extend(new_nodes)
        graph.initializer.extend(new_inits)
        try:
            for index, name in rewired.items():
                node.input[index] = name
            return self.model.SerializeToString()
        finally:
            for index, name in enumerate(original):
                node.input[index] = name
            del graph.node[len(graph.node) - len(new_nodes):]
            del graph.initializer[len(graph.initializer) - len(new_inits):]


def _dequantize(tag: str, axis: int | None) -> onnx.NodeProto:
    """DequantizeLinear of the initializers `{tag}_q`, `{tag}_s`, `{tag}_z` into `{tag}_dq`, per `axis` if given."""
    from onnx import helper

    node = helper.make_node("DequantizeLinear", [f"{tag}_q", f"{tag}_s", f"{tag}_z"], [f"{tag}_dq"])
    if axis is not None:
        node.attribute.append(helper.make_attribute("axis", axis))
    return node


def _beta(node: onnx.NodeProto) -> float:
    return next((a.f for a in node.attribute if a.name == "beta"), 1.0)


def _activation_params(low: float, high: float) -> tuple[np.ndarray, np.ndarray]:
    """uint8 asymmetric zero point and scale for the range [low, high], by ONNX Runtime's own function."""
    from onnx import TensorProto
    from onnxruntime.quantization.quant_utils import compute_data_quant_params

    return compute_data_quant_params(np.array([low, high], np.float32), TensorProto.UINT8, symmetric=False)


def _quantize_weight(weight: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """int8 symmetric (-127..127, zero point 0), per channel along `axis` or per tensor: values and scales.

    ORT's compute_scale_zp for symmetric int8: scale = max|w| / 127 (1.0 where that underflows)."""
    weight = weight.astype(np.float32)
    if axis is None:
        absmax = np.asarray(np.abs(weight).max() if weight.size else 0.0, np.float32).reshape(())
        scale = absmax / np.float32(127)
        shaped = scale
    else:
        moved = np.moveaxis(weight, axis, 0).reshape(weight.shape[axis], -1)
        scale = (np.abs(moved).max(axis=1) / np.float32(127)).astype(np.float32)
        shaped = scale.reshape([-1 if i == axis else 1 for i in range(weight.ndim)])
    scale = np.where(scale < np.finfo(np.float32).tiny, np.float32(1.0), scale).astype(np.float32)
    shaped = np.where(shaped < np.finfo(np.float32).tiny, np.float32(1.0), shaped)
    q = np.clip(np.rint(weight / shaped), -127, 127).astype(np.int8)
    return q, scale
