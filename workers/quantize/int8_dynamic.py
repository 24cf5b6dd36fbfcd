"""quantize.int8_dynamic: ONNX Runtime dynamic quantization, int8 weights and uint8 activations.

Weights are quantized once, here; activations are quantized on the fly at run
time (DynamicQuantizeLinear), so no calibration data is needed. The model is
first made quantizable by onnx_prep (Constant weights, weights listed as
inputs, old opsets, Gemm); a transformer's attention is then fused into ORT's
Attention op (transformer_fusion), which quantizes as one QAttention. The
result must load in ONNX Runtime with the input's input and output names
before it is handed back.
"""
from __future__ import annotations

import difflib
import shutil
from pathlib import Path
from typing import Any

from app.catalog.quantize.int8_dynamic import SUPPORTED_OP_TYPES, Int8DynamicParams
from app.errors import StepFailed
from workers.methods import implements
from workers.methods.base import StepContext, StepOutput

CONV_INTEGER_WARNING = (
    "ConvInteger runs 4-16x slower than float Conv on x86 CPUs in ONNX Runtime; "
    "consider op_types=['MatMul','Gemm'] or static quantization"
)

# Float ops the method quantizes and the integer ops that replace them, counted in the report.
TRACKED_OPS = frozenset({
    "Attention", "Conv", "EmbedLayerNormalization", "Gather", "Gemm", "LSTM", "MatMul",
    "ConvInteger", "DynamicQuantizeLSTM", "DynamicQuantizeLinear", "DynamicQuantizeMatMul",
    "MatMulInteger", "MatMulIntegerToFloat", "QAttention", "QEmbedLayerNormalization",
})

# Weighted float ops whose fate inside If/Loop/Scan subgraphs (and, for recurrent ones, anywhere) the report names.
REPORTED_OPS = ("Conv", "Gemm", "LSTM", "MatMul")
# Recurrent ops ONNX Runtime has no integer kernel for: they stay float whatever op_types says.
UNQUANTIZED_RECURRENT = {
    "GRU": "ONNX Runtime has no int8 GRU kernel: its dynamic quantization turns LSTM into DynamicQuantizeLSTM but "
           "has no quantized form of GRU, so GRU weights stay float32",
    "RNN": "ONNX Runtime has no int8 kernel for the plain RNN op, so its weights stay float32",
}
# Integer ops the dynamic quantizer writes in place of the float ones.
DYNAMIC_INTEGER_OPS = frozenset({
    "ConvInteger", "DynamicQuantizeLSTM", "DynamicQuantizeMatMul", "MatMulInteger", "MatMulIntegerToFloat",
    "QAttention",
})

INTEGER_OPS = frozenset({
    "ConvInteger", "MatMulInteger", "Gather", "QAttention", "DynamicQuantizeLSTM", "QEmbedLayerNormalization",
})


@implements("quantize.int8_dynamic")
def quantize(input_path: Path, params: Int8DynamicParams, out_dir: Path, ctx: StepContext | None = None) -> StepOutput:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from workers.quantize import onnx_prep

    source = onnx.load(str(input_path), load_external_data=False)
    onnx_prep.name_nodes(source.graph)  # the same names prepare() gives, so exclusions match
    requested = set(params.op_types or SUPPORTED_OP_TYPES)
    _check_excluded_nodes(params.nodes_to_exclude, source.graph, requested)

    prep_dir = out_dir / "prep"
    output = out_dir / "model.onnx"
    warnings: list[str] = []
    try:
        prepared = onnx_prep.prepare(input_path, prep_dir, gemm_to_matmul="Gemm" in requested)
        present = {node.name for node in
                   onnx_prep.all_nodes(onnx.load(str(prepared.path), load_external_data=False).graph)}
        gone = [name for name in params.nodes_to_exclude if name not in present]
        fusion = _fuse(prepared.path, prep_dir, params, requested,
                       keep_nodes=[name for name in params.nodes_to_exclude if name in present],
                       shapes=ctx.input_shapes if ctx else None)
        warnings += fusion.warnings
        to_quantize = fusion.path or prepared.path
        if fusion.path is not None:
            requested = requested | {"Attention"}  # the fused Q/K/V MatMuls
        graph = onnx.load(str(to_quantize), load_external_data=False).graph
        before = onnx_prep.op_counts(graph)  # what the quantizer is given, after pre-processing
        has_subgraphs = any(True for _ in onnx_prep.subgraph_sites(graph))
        if gone:
            warnings.append(
                f"pre-processing fused or removed node(s) {', '.join(map(repr, gone[:5]))}; "
                "excluding them has no effect"
            )
        depthwise = _grouped_convs(graph) if params.keep_depthwise_conv_float and "Conv" in requested else []
        excluded = list(dict.fromkeys([*params.nodes_to_exclude, *depthwise]))
        chosen_type, type_reason = _weight_type(graph, params, requested, set(excluded))
        weight_type = QuantType.QInt8 if chosen_type == "int8" else QuantType.QUInt8
        ort_op_types = sorted((requested - {"Gemm"}) | ({"MatMul"} if "Gemm" in requested else set()))
        nodes_to_quantize = _nodes_to_quantize(graph, requested, prepared.gemm_rewritten)
        if nodes_to_quantize is not None:
            left_float = set(excluded)
            nodes_to_quantize = [name for name in nodes_to_quantize if name not in left_float]
        del graph
        if nodes_to_quantize == []:
            raise _nothing_to_quantize(source.graph, requested, params.nodes_to_exclude)
        # ONNX shape inference cannot type the outputs of ORT's contrib ops (Attention): say they are float.
        extra_options: dict[str, Any] = {"DefaultTensorType": onnx.TensorProto.FLOAT} if fusion.path is not None else {}
        if has_subgraphs:
            # ORT's quantizer then quantizes If/Loop/Scan bodies too; it reads weights inside them only from
            # initializers, which is why prepare() folded the subgraphs' Constant nodes first.
            extra_options["EnableSubgraph"] = True
            to_quantize = _localize_conv_weights(to_quantize, prep_dir, warnings)
        try:
            quantize_dynamic(
                to_quantize, output,
                per_channel=params.per_channel, reduce_range=params.reduce_range,
                op_types_to_quantize=ort_op_types, nodes_to_quantize=nodes_to_quantize,
                nodes_to_exclude=excluded, weight_type=weight_type,
                use_external_data_format=False, extra_options=extra_options,
            )
        except Exception as exc:
            raise StepFailed(f"ONNX Runtime's quantize_dynamic failed: {onnx_prep.short_error(exc, 400)}",
                             code="quantization_failed") from exc
    finally:
        shutil.rmtree(prep_dir, ignore_errors=True)

    _check_loads_with_same_io(source, output)
    result = onnx.load(str(output))
    weights = _quantized_weights(result.graph)
    if not weights:
        raise _nothing_to_quantize(source.graph, requested, excluded)

    after = onnx_prep.op_counts(result.graph)
    quantized_ops = {
        op: {"before": before[op], "after": after[op]}
        for op in sorted(TRACKED_OPS) if before[op] or after[op]
    }
    per_tensor = [ops for per_channel, ops in weights.values() if not per_channel]
    if params.per_channel and per_tensor:
        ops = sorted({op.removesuffix("Integer") for consumers in per_tensor for op in consumers if op in INTEGER_OPS})
        warnings.append(
            f"per_channel: {len(per_tensor)} of {len(weights)} weights were quantized per tensor; ONNX Runtime's "
            f"dynamic quantization does not quantize {', '.join(ops) or 'their'} weights per channel"
        )
    subgraphs, recurrent, left_notes = _inside_report(result.graph, requested, excluded, depthwise)
    warnings += left_notes
    if after["ConvInteger"]:
        warnings.append(CONV_INTEGER_WARNING)
    if chosen_type == "int8" and not params.reduce_range and not cpu_has_vnni():
        warnings.append("this CPU has no VNNI: int8 weights may saturate in ONNX Runtime's u8s8 kernels; "
                        "if accuracy suffers, set reduce_range or weight_type uint8")
    details = {
        "preprocess": prepared.notes,
        "transformer_fusion": fusion.details,
        "quantized_ops": quantized_ops,
        "weights_quantized": len(weights),
        "weights_per_channel": sum(1 for per_channel, _ in weights.values() if per_channel),
        "depthwise_conv_kept_float": len(depthwise),
        "subgraphs": subgraphs,
        "recurrent": recurrent,
        "weight_type": chosen_type,
        "weight_type_reason": type_reason,
        "activation_type": "uint8, quantized at run time",
        "warnings": warnings,
    }
    return StepOutput(model_path=output, details=details)


def _localize_conv_weights(path: Path, work_dir: Path, warnings: list[str]) -> Path:
    """Conv weights an If/Loop/Scan body reads from an enclosing graph, made the body's own (see
    onnx_prep.localize_outer_weights); returns the model to quantize."""
    import onnx

    from workers.quantize.onnx_prep import localize_outer_weights

    model = onnx.load(str(path))
    moved, copied = localize_outer_weights(model.graph, ("Conv",))
    if not moved and not copied:
        return path
    if copied:
        warnings.append(f"{copied} Conv weight(s) read by several If/Loop/Scan bodies were copied into each body "
                        "so ONNX Runtime's quantizer could reach them; each copy is stored (quantized) once per body")
    localized = work_dir / "prep-localized.onnx"
    onnx.save(model, str(localized))
    return localized


def _fuse(prepared: Path, work_dir: Path, params: Int8DynamicParams, requested: set[str], *,
          keep_nodes: list[str], shapes=None):
    from workers.quantize import transformer_fusion

    if params.fuse_transformer == "off":
        return transformer_fusion.Fusion(None, {"applied": False, "reason": "fuse_transformer is off"})
    if "MatMul" not in requested:
        return transformer_fusion.Fusion(None, {"applied": False, "reason": "op_types leaves MatMul out"})
    return transformer_fusion.fuse(prepared, work_dir, keep_nodes=keep_nodes, shapes=shapes)


def _inside_report(graph, requested: set[str], excluded: list[str], depthwise: list[str]):
    """What became of the weighted ops inside If/Loop/Scan subgraphs, and of recurrent ops anywhere.

    Returns (per subgraph: owner, attribute, integer ops written, float ops left with why; per recurrent op
    type: count, quantized, reason; warnings naming what stayed float). Read from the quantized graph.
    """
    from collections import Counter

    from workers.quantize.onnx_prep import nodes_with_scope, site_label

    reported = set(REPORTED_OPS) & requested
    depthwise_set, excluded_set = set(depthwise), set(excluded)
    sites: dict[tuple[str, str], dict] = {}  # by (owner name, attribute): name_nodes made owner names unique
    recurrent: dict[str, dict] = {}
    left_warnings: list[str] = []
    for site, node, visible in nodes_with_scope(graph):
        if node.op_type in ("LSTM", "DynamicQuantizeLSTM", *UNQUANTIZED_RECURRENT):
            kind = "LSTM" if node.op_type == "DynamicQuantizeLSTM" else node.op_type
            entry = recurrent.setdefault(kind, {"count": 0, "quantized": 0, "left_float": []})
            entry["count"] += 1
            if node.op_type == "DynamicQuantizeLSTM":
                entry["quantized"] += 1
            else:
                entry["left_float"].append(node.name)
                if kind in UNQUANTIZED_RECURRENT:
                    entry["reason"] = UNQUANTIZED_RECURRENT[kind]
        if site is None:
            continue
        entry = sites.setdefault((site[0].name, site[1]),
                                 {**site_label(site), "quantized": Counter(), "left_float": []})
        if node.op_type in DYNAMIC_INTEGER_OPS:
            entry["quantized"][node.op_type] += 1
        elif node.op_type in reported or node.op_type in UNQUANTIZED_RECURRENT:
            entry["left_float"].append({"node": node.name, "op_type": node.op_type,
                                        "reason": _float_reason(node, visible, depthwise_set, excluded_set)})
    subgraphs = [{**entry, "quantized": dict(sorted(entry["quantized"].items()))}
                 for entry in sites.values() if entry["quantized"] or entry["left_float"]]
    for entry in subgraphs:
        for left in entry["left_float"][:5]:
            left_warnings.append(
                f"{left['op_type']} node {left['node']!r} inside the {entry['attribute']} of {entry['op_type']} "
                f"node {entry['node']!r} stays float: {left['reason']}")
    for kind, entry in recurrent.items():
        if kind in UNQUANTIZED_RECURRENT and entry["left_float"]:
            left_warnings.append(f"{entry['count']} {kind} node(s) ({', '.join(map(repr, entry['left_float'][:5]))}) "
                                 f"stay float: {UNQUANTIZED_RECURRENT[kind]}")
    return subgraphs, recurrent, list(dict.fromkeys(left_warnings))


def _float_reason(node, visible: dict, depthwise: set[str], excluded: set[str]) -> str:
    if node.op_type in UNQUANTIZED_RECURRENT:
        return UNQUANTIZED_RECURRENT[node.op_type]
    if node.name in depthwise:
        return "a depthwise/grouped Conv, kept float (keep_depthwise_conv_float)"
    if node.name in excluded:
        return "named in nodes_to_exclude"
    weights = node.input[1:3] if node.op_type == "LSTM" else node.input[1:2]
    runtime = [name for name in weights if name and name not in visible]
    if runtime:
        return (f"its weight {runtime[0]!r} is computed at run time, not a constant; ONNX Runtime quantizes "
                "constant weights only")
    if node.op_type == "LSTM" and any(len(visible[name].dims) != 3 for name in weights if name):
        return "its W/R weights are not 3-D, which ONNX Runtime's DynamicQuantizeLSTM needs"
    return "left float by ONNX Runtime's quantizer (its input types could not be inferred inside the subgraph)"


def _quantized_weights(graph) -> dict[str, tuple[bool, set[str]]]:
    """Quantized weight initializers -> (quantized per channel?, op types that read them)."""
    import onnx

    from workers.quantize.onnx_prep import all_initializers, all_nodes

    scales = {init.name: init for init in all_initializers(graph)}
    consumers: dict[str, set[str]] = {}
    for node in all_nodes(graph):
        for name in node.input:
            consumers.setdefault(name, set()).add(node.op_type)
    weights = {}
    for init in all_initializers(graph):
        if init.name.endswith("_quantized") and init.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8):
            scale = scales.get(init.name.removesuffix("_quantized") + "_scale")
            per_channel = scale is not None and len(scale.dims) > 0 and max(scale.dims) > 1
            weights[init.name] = (per_channel, consumers.get(init.name, set()))
    return weights


def _check_excluded_nodes(names: list[str], graph, requested: set[str]) -> None:
    from workers.quantize.onnx_prep import all_nodes

    known = [node.name for node in all_nodes(graph)]
    known_set = set(known)
    missing = [name for name in names if name not in known_set]
    if not missing:
        return
    quantizable = [node.name for node in all_nodes(graph) if node.op_type in requested]
    examples = (quantizable or known)[:5]
    hints = []
    for name in missing[:3]:
        close = difflib.get_close_matches(name, known, n=1)
        if close:
            hints.append(f"{name!r} -> did you mean {close[0]!r}?")
    message = (
        f"nodes_to_exclude names {len(missing)} node(s) not in the model: {', '.join(map(repr, missing[:5]))}"
        + ("..." if len(missing) > 5 else "")
        + f". The graph has {len(known)} nodes; for example {', '.join(map(repr, examples))}"
        + (f" ({'; '.join(hints)})" if hints else "")
    )
    raise StepFailed(message, code="unknown_node")


def _weight_type(graph, params: Int8DynamicParams, requested: set[str], excluded: set[str]) -> tuple[str, str]:
    """The weight type to store, and why: the user's, or for auto the one the dominant op runs fastest with."""
    if params.weight_type != "auto":
        return params.weight_type, "as requested"
    import numpy as np

    from workers.quantize.onnx_prep import all_initializers, all_nodes

    sizes = {init.name: int(np.prod(init.dims)) if init.dims else 1 for init in all_initializers(graph)}
    conv = matmul = 0
    for node in all_nodes(graph):
        if node.name in excluded or node.op_type not in requested | {"MatMul"} or len(node.input) < 2:
            continue
        weight = sizes.get(node.input[1], 0)
        if node.op_type == "Conv":
            conv += weight
        elif node.op_type in ("MatMul", "Gemm", "Attention"):
            matmul += weight
    if conv > matmul:
        return "uint8", (f"auto: {conv} of {conv + matmul} quantized weights feed Conv, and ConvInteger runs faster "
                         "with uint8 weights")
    return "int8", (f"auto: {matmul} of {conv + matmul} quantized weights feed MatMul/Gemm, which run faster with "
                    "int8 weights (u8s8 kernels)")


def cpu_has_vnni() -> bool:
    """Whether this x86 CPU has VNNI (no saturation in u8s8 dot products); True where it cannot be told."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True
    if " avx2" not in flags:
        return True  # not an x86 CPU with the AVX2 path that saturates
    return "avx512_vnni" in flags or "avx_vnni" in flags


def _grouped_convs(graph) -> list[str]:
    """Names of Conv nodes with group > 1 (depthwise and grouped convolutions)."""
    from workers.quantize.onnx_prep import all_nodes

    names = []
    for node in all_nodes(graph):
        if node.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in node.attribute):
            names.append(node.name)
    return names


def _nodes_to_quantize(graph, requested: set[str], gemm_rewritten: list[str]) -> list[str] | None:
    """None quantizes every node of the requested types; a list restricts to those nodes.

    Needed only when Gemm is requested without MatMul: the rewritten Gemms are MatMuls,
    and the model's own MatMuls must stay float.
    """
    if "Gemm" not in requested or "MatMul" in requested:
        return None
    from workers.quantize.onnx_prep import all_nodes

    from_gemm = set(gemm_rewritten)
    return [node.name for node in all_nodes(graph) if node.name in from_gemm or node.op_type in requested]


def _nothing_to_quantize(graph, requested: set[str], excluded: list[str]) -> StepFailed:
    from workers.quantize.onnx_prep import all_nodes

    present = sorted({node.op_type for node in all_nodes(graph)})
    recurrent = [f"; {UNQUANTIZED_RECURRENT[op]}" for op in present if op in UNQUANTIZED_RECURRENT]
    return StepFailed(
        f"nothing to quantize: no {', '.join(sorted(requested))} node with constant float weights was found"
        + (f" once {len(excluded)} excluded node(s) were left out" if excluded else "")
        + f" (the graph has {', '.join(present[:15])}{'...' if len(present) > 15 else ''})"
        + "".join(recurrent),
        code="nothing_to_quantize",
    )


def _check_loads_with_same_io(source, output: Path) -> None:
    import onnxruntime as ort

    from workers.quantize.onnx_prep import short_error

    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(output), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise StepFailed(f"the quantized model does not load in ONNX Runtime: {short_error(exc, 400)}",
                         code="quantization_failed") from exc
    initializers = {init.name for init in source.graph.initializer}
    expected_inputs = [i.name for i in source.graph.input if i.name not in initializers]
    expected_outputs = [o.name for o in source.graph.output]
    inputs = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    if sorted(inputs) != sorted(expected_inputs) or outputs != expected_outputs:
        raise StepFailed(
            f"the quantized model's inputs/outputs {inputs}/{outputs} differ from the original's "
            f"{expected_inputs}/{expected_outputs}"
        )
