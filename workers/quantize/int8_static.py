"""quantize.int8_static: ONNX Runtime static quantization (QDQ), activations calibrated on data.

Weights are quantized to int8 and activations get fixed scales measured on calibration
samples, so at run time ONNX Runtime fuses the QuantizeLinear/DequantizeLinear pairs into
integer kernels (QLinearConv, QGemm, QLinearMatMul, ...). The model is first made
quantizable by onnx_prep; the calibration runs here, in chunks, so that histogram methods
(entropy, percentile), which keep every activation of every sample they collect, stay within
memory; its ranges are handed to `quantize_static` through ORT's calibration cache.

The calibration helpers (`calibration_source`, `CalibrationReader`) are shared with the
methods that need calibration data (quantize.int4_weight_only's GPTQ).
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import shutil
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.catalog.quantize.int8_static import ORT_STATIC_OP_TYPES, Int8StaticParams
from app.errors import StepFailed
from workers.methods import implements
from workers.methods.base import StepContext, StepOutput
from workers.quantize.int8_dynamic import _check_excluded_nodes, _check_loads_with_same_io

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

# Why weighted ops inside If/Loop/Scan bodies stay float here (named per subgraph in the report).
SUBGRAPH_REASON = (
    "ONNX Runtime's static (QDQ) quantizer and its calibrator work on the main graph only: calibration cannot "
    "record activation ranges inside If/Loop/Scan bodies, so their nodes are not quantized; quantize.int8_dynamic "
    "quantizes them (it needs no activation ranges)"
)
# Ops whose weight (a constant input) is quantized, and so shrinks the file.
WEIGHTED_OP_TYPES = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "Gather", "EmbedLayerNormalization"})

# Entropy calibration compares candidate clipping thresholds on a histogram. ORT's own defaults
# (128 bins, 128 quantized bins) leave a single candidate, the full range, so "entropy" gave
# exactly MinMax's scales on YOLOX-nano. 512 bins give 193 candidates; computing them took 20 s
# for YOLOX-nano's 578 tensors here (2048 bins, TensorRT's choice: 139 s).
ENTROPY_BINS, ENTROPY_QUANTIZED_BINS = 512, 128
PERCENTILE_BINS = 2048  # ORT's default for percentile
# Histogram methods hold every calibrated activation of the samples collected in one call;
# samples go in chunks sized to keep those activations under this many bytes.
HISTOGRAM_CHUNK_BYTES = 256 * 2**20
MINMAX_CHUNK = 32  # MinMax keeps two numbers per tensor and sample; chunks only pace the progress reports


# --- calibration data ------------------------------------------------------------------------------

@dataclass
class CalibrationSource:
    """Calibration feeds, built one at a time so that a large dataset is never copied whole."""

    names: list[str]
    dtypes: dict[str, Any]
    count: int                                  # number of feeds
    samples: int                                # samples they hold (count x batch)
    batch: int                                  # samples per feed
    described: str                              # "dataset <name>" or "random data"
    notes: list[str] = field(default_factory=list)
    arrays: dict[str, Any] | None = None        # dataset arrays (sample axis first)
    plan: Any = None                            # workers.onnx_tools.inputs.InputPlan for random data
    seed: int = 0

    def feed(self, index: int) -> dict[str, np.ndarray]:
        import numpy as np

        if self.arrays is not None:
            start = index * self.batch
            return {name: np.ascontiguousarray(self.arrays[name][start:start + self.batch].astype(self.dtypes[name]))
                    for name in self.names}
        rng = np.random.default_rng([self.seed, index])
        return self.plan.feeds(self.batch, rng)["baseline"]


class CalibrationReader:
    """ONNX Runtime's CalibrationDataReader over feeds [start, stop) of a CalibrationSource."""

    def __init__(self, source: CalibrationSource, start: int = 0, stop: int | None = None) -> None:
        self.source = source
        self.start, self.stop = start, source.count if stop is None else min(stop, source.count)
        self.position = self.start

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.position >= self.stop:
            return None
        self.position += 1
        return self.source.feed(self.position - 1)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        feed = self.get_next()
        if feed is None:
            raise StopIteration
        return feed

    def __len__(self) -> int:
        return self.stop - self.start

    def __deepcopy__(self, memo) -> CalibrationReader:
        # ORT's GPTQ deep-copies its reader; the copy shares the (possibly large) dataset arrays.
        return CalibrationReader(self.source, self.start, self.stop)


def calibration_source(model_path: Path, dataset, *, samples: int, seed: int, allow_random: bool,
                       shapes=None) -> CalibrationSource:
    """Feeds for the model at `model_path`: the first `samples` samples of `dataset`, or random ones.

    Each feed holds one sample, or the fixed batch the model requires. Raises StepFailed
    (code calibration_failed) where the dataset does not fit the model.
    """
    import numpy as np
    import onnx
    import onnxruntime as ort

    from app.errors import MeasurementFailed
    from workers.onnx_tools.inputs import ORT_DTYPES, plan_inputs
    from workers.quantize.onnx_prep import short_error

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise StepFailed(f"the model does not load in ONNX Runtime: {short_error(exc, 400)}",
                         code="quantization_failed") from exc
    specs = session.get_inputs()
    structure = onnx.load(str(model_path), load_external_data=False)
    try:
        plan = plan_inputs({"baseline": session, "result": session}, {"baseline": structure, "result": structure},
                           shapes=shapes)
    except MeasurementFailed as exc:
        raise StepFailed(f"cannot build calibration inputs: {exc.message}", code="calibration_failed") from exc
    del structure
    batch = plan.fixed_batch or 1
    names = [spec.name for spec in specs]
    dtypes = {spec.name: np.dtype(ORT_DTYPES[spec.type]) for spec in specs if spec.type in ORT_DTYPES}
    notes = [f"the model takes a fixed batch of {batch}: each calibration run feeds {batch} samples "
             f"({plan.fixed_reason})"] if batch > 1 else []

    if dataset is None:
        if not allow_random:
            raise StepFailed("the step names a calibration dataset but none was loaded", code="calibration_failed")
        notes.extend(plan.notes)
        return CalibrationSource(names=names, dtypes=dtypes, count=samples, samples=samples * batch, batch=batch,
                                 described="random data", notes=notes, plan=plan, seed=seed)

    missing = [name for name in names if name not in dataset.inputs]
    if missing:
        held = ", ".join(map(repr, dataset.inputs)) or "none"
        raise StepFailed(
            f"the calibration dataset has no array named {', '.join(map(repr, missing))}, which the model takes as "
            f"input (it holds {held})",
            code="calibration_failed",
        )
    arrays = {name: dataset.inputs[name] for name in names}
    available = min(len(array) for array in arrays.values())
    for spec in specs:
        array = arrays[spec.name]
        declared = list(spec.shape)
        sample = list(array.shape[1:])
        fixed_mismatch = any(isinstance(want, int) and want != have for want, have in zip(declared[1:], sample))
        if array.ndim != len(declared) or fixed_mismatch:
            raise StepFailed(
                f"calibration array {spec.name!r} holds samples of shape {sample}; the model input {spec.name!r} "
                f"takes {declared} (axis 0 of the array is the sample axis)",
                code="calibration_failed",
            )
        if spec.name not in dtypes:
            raise StepFailed(f"the model input {spec.name!r} has type {spec.type}, which calibration cannot feed",
                             code="calibration_failed")
    used = min(samples, available)
    count = used // batch
    if count == 0:
        raise StepFailed(
            f"the calibration dataset holds {available} sample(s); the model takes a fixed batch of {batch}",
            code="calibration_failed",
        )
    if available < samples:
        notes.append(f"the calibration dataset holds {available} samples, fewer than calibration_samples={samples}")
    if count * batch < used:
        notes.append(f"{used - count * batch} sample(s) left out: the model takes whole batches of {batch}")
    return CalibrationSource(
        names=names, dtypes=dtypes, count=count, samples=count * batch, batch=batch,
        described=f"dataset {dataset.name}" if dataset.name else "dataset", notes=notes, arrays=arrays,
    )


# --- the method ----------------------------------------------------------------------------------------

@implements("quantize.int8_static")
def quantize(input_path: Path, params: Int8StaticParams, out_dir: Path, ctx: StepContext | None = None) -> StepOutput:
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from workers.quantize import onnx_prep

    ctx = ctx or StepContext()
    source = onnx.load(str(input_path), load_external_data=False)
    onnx_prep.refuse_quantized(source.graph, "quantize.int8_static")
    onnx_prep.name_nodes(source.graph)  # the same names prepare() gives, so exclusions match
    requested = list(params.op_types or ORT_STATIC_OP_TYPES)
    _check_excluded_nodes(params.nodes_to_exclude, source.graph, set(requested))

    prep_dir = out_dir / "prep"
    output = out_dir / "model.onnx"
    warnings: list[str] = []
    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[params.calibrate_method]
    types = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    try:
        ctx.report(0.02, "preparing the model for quantization")
        # Gemm stays Gemm: ORT fuses its QDQ form into QGemm, which adds the bias in int32; on the
        # test MLP that was a little faster and closer to float than MatMul + Add.
        prepared = onnx_prep.prepare(input_path, prep_dir, gemm_to_matmul=False)
        flattened = _flatten_gemm_biases(prepared.path)
        if flattened:
            prepared.notes.append(f"reshaped {flattened} Gemm bias(es) of shape [1, N] to [N] (ONNX Runtime's "
                                  "per-channel bias check fails on 2-D biases)")
        graph = onnx.load(str(prepared.path), load_external_data=False).graph
        before = onnx_prep.op_counts(graph)
        present = {node.name for node in onnx_prep.all_nodes(graph)}
        gone = [name for name in params.nodes_to_exclude if name not in present]
        if gone:
            warnings.append(f"pre-processing fused or removed node(s) {', '.join(map(repr, gone[:5]))}; "
                            "excluding them has no effect")
        excluded = set(params.nodes_to_exclude)
        unreached = onnx_prep.subgraph_summary(graph, set(requested) & WEIGHTED_OP_TYPES)
        for site in unreached[:10]:
            ops = ", ".join(f"{count} {op}" for op, count in site["ops"].items())
            warnings.append(f"{ops} inside the {site['attribute']} of {site['op_type']} node {site['node']!r} "
                            f"stay float: {SUBGRAPH_REASON}")
        if not any(node.op_type in requested and node.name not in excluded for node in graph.node):
            raise _nothing_to_quantize(graph, requested, params.nodes_to_exclude, unreached)
        del graph

        # A step that names a dataset calibrates on it; random data stands in only where none is named.
        data = calibration_source(prepared.path, ctx.calibration, samples=params.calibration_samples, seed=ctx.seed,
                                  shapes=ctx.input_shapes,
                                  allow_random=params.allow_random_calibration and not params.calibration_dataset_id)
        if data.plan is not None:
            warnings.append(
                "calibrated on random data, not on samples of real inputs: activation ranges may not match real "
                "data and accuracy on it may be much lower; give a calibration_dataset_id"
            )
        cache = prep_dir / "calibration.json"
        key = _ranges_key(prepared.path, requested, params, data, ctx)
        reused = key in _RANGES
        if reused:
            ctx.report(0.1, "reusing the activation ranges this process calibrated for the same model and data")
            cache.write_bytes(_RANGES[key][0])
            chunking = _RANGES[key][1]
        else:
            chunking = _calibrate(prepared.path, requested, method, params, data, prep_dir, cache, ctx)
            _RANGES[key] = (cache.read_bytes(), chunking)
            while len(_RANGES) > RANGES_KEPT:
                _RANGES.popitem(last=False)

        ctx.report(0.85, "quantizing weights and inserting QuantizeLinear/DequantizeLinear")
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                quantize_static(
                    prepared.path, output, None,
                    quant_format=QuantFormat.QDQ, op_types_to_quantize=requested,
                    per_channel=params.per_channel, reduce_range=params.reduce_range,
                    activation_type=types[params.activation_type], weight_type=types[params.weight_type],
                    nodes_to_exclude=list(params.nodes_to_exclude), calibrate_method=method,
                    calibration_cache_path=cache, use_external_data_format=False,
                )
        except Exception as exc:
            raise StepFailed(f"ONNX Runtime's quantize_static failed: {onnx_prep.short_error(exc, 400)}",
                             code="quantization_failed") from exc
    finally:
        shutil.rmtree(prep_dir, ignore_errors=True)

    ctx.report(0.95, "checking the quantized model")
    _check_loads_with_same_io(source, output)
    result = onnx.load(str(output))
    summary = _qdq_summary(result.graph)
    if not summary["weights"] and not summary["activations"]:
        raise _nothing_to_quantize(result.graph, requested, params.nodes_to_exclude)
    after = onnx_prep.op_counts(result.graph)
    quantized_ops = {
        op: {"before": before[op], "after": after[op], "quantized": summary["nodes"][op]}
        for op in sorted(set(summary["nodes"]) | (WEIGHTED_OP_TYPES & set(before)))
    }
    for op in ("QuantizeLinear", "DequantizeLinear"):
        quantized_ops[op] = {"before": before[op], "after": after[op]}
    weights = summary["weights"]
    per_tensor = [name for name, per_channel in weights.items() if not per_channel]
    if params.per_channel and per_tensor:
        warnings.append(f"per_channel: {len(per_tensor)} of {len(weights)} weights were quantized per tensor "
                        "(ONNX Runtime quantizes per channel only Conv, Gemm and MatMul weights with an output axis)")
    integer_ops = _cpu_integer_ops(output)
    if integer_ops is not None and summary["nodes"] and not integer_ops:
        warnings.append("ONNX Runtime's CPU provider fused no QuantizeLinear/DequantizeLinear pair into an integer "
                        "kernel: the model will run in float with extra (de)quantization, slower than the original")

    details = {
        "preprocess": prepared.notes,
        "calibrated_on": data.described,
        "calibration_samples": data.samples,
        "calibration_batch": data.batch,
        "calibrate_method": params.calibrate_method,
        **({"percentile": params.percentile} if params.calibrate_method == "percentile" else {}),
        "calibration_chunk_samples": chunking,
        "calibration_reused": reused,
        "calibration_notes": data.notes,
        "quantized_ops": quantized_ops,
        "weights_quantized": len(weights),
        "weights_per_channel": sum(1 for per_channel in weights.values() if per_channel),
        "subgraphs": [{"node": site["node"], "op_type": site["op_type"], "attribute": site["attribute"],
                       "quantized": {}, "left_float": site["ops"], "reason": SUBGRAPH_REASON} for site in unreached],
        "activations_quantized": summary["activations"],
        "cpu_integer_ops": integer_ops,
        "activation_type": params.activation_type,
        "weight_type": params.weight_type,
        "format": "QDQ",
        "warnings": warnings,
    }
    return StepOutput(model_path=output, details=details)


# Activation ranges this process computed, by what they depend on (_ranges_key): a search that quantizes one model
# several times with different nodes left float (its mixed-precision ladder) calibrates once, since ORT's ranges
# cover every tensor whatever nodes_to_exclude says. ppocr-det: 6.0 s per calibration (bench/RESULTS.md).
_RANGES: OrderedDict[str, tuple[bytes, int]] = OrderedDict()
RANGES_KEPT = 4


def _ranges_key(prepared: Path, requested: list[str], params: Int8StaticParams, data: CalibrationSource,
                ctx: StepContext) -> str:
    """What the ranges depend on: the prepared model's bytes, the op types, the calibration method and its
    settings, and the feeds (the dataset samples' bytes, or the random plan's seed and shapes)."""
    import numpy as np

    digest = hashlib.sha256(prepared.read_bytes())
    digest.update(repr((sorted(requested), params.calibrate_method, params.percentile, data.count, data.batch,
                        data.seed if data.arrays is None else None, repr(ctx.input_shapes))).encode())
    for name, array in (data.arrays or {}).items():
        used = np.ascontiguousarray(array[:data.samples], dtype=data.dtypes[name])
        digest.update(f"{name}{used.shape}{used.dtype}".encode())
        digest.update(used.data)
    return digest.hexdigest()


def _calibrate(model_path: Path, op_types: list[str], method, params: Int8StaticParams, data: CalibrationSource,
               work_dir: Path, cache: Path, ctx: StepContext) -> int:
    """Collect activation ranges in chunks and write them to ORT's calibration cache; returns the chunk size."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator, save_tensors_data

    from workers.quantize.onnx_prep import short_error

    extra: dict[str, Any] = {}
    if method == CalibrationMethod.Entropy:
        extra = {"num_bins": ENTROPY_BINS, "num_quantized_bins": ENTROPY_QUANTIZED_BINS}
    elif method == CalibrationMethod.Percentile:
        extra = {"num_bins": PERCENTILE_BINS, "percentile": params.percentile}

    def failed(exc: BaseException, stage: str) -> StepFailed:
        return StepFailed(f"calibration failed while {stage}: {short_error(exc, 400)}", code="calibration_failed")

    ctx.report(0.1, f"calibrating on {data.samples} sample(s) of {data.described}")
    # ORT's calibrators print progress to stdout; the step reports its own.
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            calibrator = create_calibrator(
                model_path, op_types, augmented_model_path=str(work_dir / "augmented.onnx"),
                calibrate_method=method, providers=["CPUExecutionProvider"], extra_options=extra,
            )
        except Exception as exc:
            raise failed(exc, "preparing the calibration model") from exc
        if method == CalibrationMethod.MinMax:
            chunk = MINMAX_CHUNK
        else:
            try:
                first = calibrator.infer_session.run(None, data.feed(0))
            except Exception as exc:
                raise failed(exc, "running the model on the first calibration sample") from exc
            per_feed = max(1, sum(getattr(value, "nbytes", 0) for value in first))
            del first
            chunk = max(1, min(64, HISTOGRAM_CHUNK_BYTES // per_feed))
        for start in range(0, data.count, chunk):
            try:
                calibrator.collect_data(CalibrationReader(data, start, start + chunk))
            except Exception as exc:
                raise failed(exc, f"running the model on calibration samples {start}-{start + chunk - 1}") from exc
            done = min(start + chunk, data.count)
            ctx.report(0.1 + 0.65 * done / data.count, f"calibrated on {done}/{data.count} feed(s)")
        ctx.report(0.78, f"computing {params.calibrate_method} ranges")
        try:
            ranges = calibrator.compute_data()
        except Exception as exc:
            raise failed(exc, f"computing {params.calibrate_method} ranges") from exc
        del calibrator
    save_tensors_data(ranges, cache)
    return chunk


def _flatten_gemm_biases(path: Path) -> int:
    """Gemm biases [1, N] -> [N] in place (same maths: C broadcasts); returns how many were reshaped.

    ORT 1.32's QDQ quantizer indexes a per-channel Gemm's bias by output channel and fails with
    "truth value of an array ... is ambiguous" on a 2-D bias (opt-mnist's Gemm has one).
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    initializers = {init.name: init for init in model.graph.initializer}
    readers = Counter(name for node in model.graph.node for name in node.input)
    reshaped = 0
    for node in model.graph.node:
        if node.op_type != "Gemm" or len(node.input) < 3 or node.input[2] not in initializers:
            continue
        bias = initializers[node.input[2]]
        if len(bias.dims) < 2 or any(d != 1 for d in bias.dims[:-1]) or readers[bias.name] != 1:
            continue
        flat = numpy_helper.from_array(numpy_helper.to_array(bias).reshape(-1), bias.name)
        bias.CopyFrom(flat)
        reshaped += 1
    if reshaped:
        onnx.save(model, str(path))
    return reshaped


def _qdq_summary(graph) -> dict[str, Any]:
    """Weights quantized (name -> per channel?), activations quantized, and quantized nodes per op type."""
    import onnx

    initializers = {init.name: init for init in graph.initializer}
    dequantized: dict[str, str] = {}  # DequantizeLinear output -> its quantized input
    weights: dict[str, bool] = {}
    for node in graph.node:
        if node.op_type != "DequantizeLinear":
            continue
        dequantized[node.output[0]] = node.input[0]
        init = initializers.get(node.input[0])
        if init is not None and init.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8):
            scale = initializers.get(node.input[1]) if len(node.input) > 1 else None
            # Per-channel scales are 1-D (one per output channel, a single one for a 1-channel layer).
            weights[init.name] = scale is not None and len(scale.dims) == 1
    nodes: Counter[str] = Counter()
    for node in graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") and any(i in dequantized for i in node.input):
            nodes[node.op_type] += 1
    activations = sum(1 for node in graph.node if node.op_type == "QuantizeLinear")
    return {"weights": weights, "activations": activations, "nodes": nodes}


def _cpu_integer_ops(path: Path) -> dict[str, int] | None:
    """The integer kernels ONNX Runtime's CPU provider fuses the QDQ graph into (None if that cannot be seen)."""
    import onnx
    import onnxruntime as ort

    optimized = path.with_name(path.stem + ".cpu-optimized.onnx")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    # Extended: the QDQ fusions, without the hardware-specific layout changes of level 3.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(optimized)
    try:
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        counts = Counter(node.op_type for node in onnx.load(str(optimized), load_external_data=False).graph.node)
    except Exception:
        return None
    finally:
        optimized.unlink(missing_ok=True)
    integer = {op: n for op, n in counts.items()
               if op.startswith("QLinear") or op in ("QGemm", "MatMulIntegerToFloat", "ConvInteger", "MatMulInteger",
                                                     "QAttention", "DynamicQuantizeMatMul")}
    return dict(sorted(integer.items()))


def _nothing_to_quantize(graph, requested: list[str], excluded: list[str], unreached=()) -> StepFailed:
    present = sorted({node.op_type for node in graph.node})
    inside = ""
    if unreached:
        sites = "; ".join(f"{', '.join(site['ops'])} in the {site['attribute']} of {site['op_type']} node "
                          f"{site['node']!r}" for site in unreached[:5])
        inside = f". Its weighted ops sit inside subgraphs ({sites}{'; ...' if len(unreached) > 5 else ''}): " \
                 + SUBGRAPH_REASON
    return StepFailed(
        f"nothing to quantize: the main graph has no {', '.join(sorted(requested)[:12])}"
        f"{'...' if len(requested) > 12 else ''} node ONNX Runtime quantizes"
        + (f" once {len(excluded)} excluded node(s) are left out" if excluded else "")
        + f" (it has {', '.join(present[:15])}{'...' if len(present) > 15 else ''})" + inside,
        code="nothing_to_quantize",
    )
