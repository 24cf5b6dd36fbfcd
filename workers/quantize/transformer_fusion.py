"""Fuse a transformer's self-attention into ONNX Runtime's Attention op before dynamic quantization.

ONNX Runtime quantizes a fused Attention node as one QAttention (an int8 Q/K/V projection plus the
attention core in one kernel) instead of three MatMulIntegers around float Reshape/Transpose/MatMul/
Softmax nodes. Only what this module finds in the graph is used: the number of heads and the hidden
size are read from the Reshape that splits the heads and the projection weights, never asked for.
The fused model must reproduce the unfused one's outputs (cosine >= FUSED_MIN_COSINE on generated
inputs, padded masks included) or it is not used; every refusal says why.

Only the attention fusion is enabled. ORT's SkipLayerNormalization/BiasGelu/EmbedLayerNormalization
fusions made the quantized BERT-6x384 slower, not faster (AMD EPYC, 2 threads, interleaved: 1.05-1.1x
the unfused result's p50 with them, 0.95-0.98x without); the session re-creates the ones that pay.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("modelpress.methods.transformer_fusion")

FUSED_MIN_COSINE = 0.9999
# Ops a query/key path may pass through between the head-splitting Reshape and the scores MatMul.
_PASS_THROUGH = frozenset({"Transpose", "Mul", "Div", "Cast", "Identity"})
# Ops between the scores MatMul and the Softmax: scaling and the additive mask.
_SCORE_OPS = frozenset({"Add", "Mul", "Div", "Where", "Cast", "Identity"})


@dataclass(frozen=True)
class AttentionShape:
    num_heads: int
    hidden_size: int
    layers: int  # Softmax attentions found


@dataclass
class Fusion:
    """The fused model's path, or None when the unfused model is to be quantized; details for the report."""

    path: Path | None
    details: dict[str, Any]
    warnings: list[str] = field(default_factory=list)


def detect_attention(graph) -> tuple[AttentionShape | None, str]:
    """Heads and hidden size of the graph's scaled dot-product attentions, or None and why not.

    Each Softmax fed by a MatMul of two activations (Q·Kᵀ) is followed back to the Reshape that
    splits the query into heads, [batch, seq, heads, head_size], one of which may be -1; the
    projection weight before it gives the hidden size that resolves it.
    """
    import numpy as np
    from onnx import numpy_helper

    producers = {out: node for node in graph.node for out in node.output}
    # Values of the small constants (shapes, scalars); weights only need their shape, and may be external data.
    constants = {init.name: numpy_helper.to_array(init) if np.prod(init.dims) <= 64
                 else np.broadcast_to(np.float32(0), tuple(init.dims)) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        elif node.op_type == "Identity" and node.input[0] in constants:  # exporters alias shared weights
            constants[node.output[0]] = constants[node.input[0]]

    shapes: set[tuple[int, int]] = set()
    found = 0
    for softmax in (n for n in graph.node if n.op_type == "Softmax"):
        scores = _walk_up(softmax.input[0], producers, constants, _SCORE_OPS, stop="MatMul")
        if scores is None or any(name in constants for name in scores.input[:2]):
            continue  # not activation x activation: a classifier's softmax, say
        shape = _heads_from_query(scores.input[0], producers, constants)
        if shape is None:
            return None, f"found a Q·Kᵀ MatMul ({scores.name}) but could not read its head count and size"
        shapes.add(shape)
        found += 1
    if not found:
        return None, "no attention pattern (Softmax over a MatMul of two activations) in the graph"
    if len(shapes) > 1:
        listed = ", ".join(f"{h} heads x {d}" for h, d in sorted(shapes))
        return None, f"attention layers disagree on their shape ({listed}); one fusion setting cannot cover them"
    num_heads, hidden = shapes.pop()
    return AttentionShape(num_heads=num_heads, hidden_size=hidden, layers=found), ""


def _walk_up(name: str, producers: dict, constants: dict, through: frozenset[str], *, stop: str, depth: int = 8):
    """The first `stop` node above `name`, searching the non-constant inputs of `through` ops depth first."""
    node = producers.get(name)
    if node is None or depth == 0:
        return None
    if node.op_type == stop:
        return node
    if node.op_type not in through:
        return None
    inputs = node.input[1:] if node.op_type == "Where" else node.input  # Where's condition is the mask
    for source in inputs:
        if source and source not in constants:
            found = _walk_up(source, producers, constants, through, stop=stop, depth=depth - 1)
            if found is not None:
                return found
    return None


def _heads_from_query(name: str, producers: dict, constants: dict) -> tuple[int, int] | None:
    """(heads, hidden) from the head-splitting Reshape above a Q·Kᵀ input and the projection above it."""
    reshape = _walk_up(name, producers, constants, _PASS_THROUGH, stop="Reshape")
    if reshape is None or len(reshape.input) < 2:
        return None
    split = _shape_values(reshape.input[1], producers, constants)
    if split is None or len(split) != 4:
        return None
    heads, head_size = split[2], split[3]
    width = _projection_width(reshape.input[0], producers, constants)
    if heads > 0 and head_size > 0:
        hidden = heads * head_size
        if width is not None and width != hidden:
            return None  # a packed or unusual projection: leave it alone
        return heads, hidden
    if width is None:
        return None
    if heads == -1 and head_size > 0 and width % head_size == 0:
        return width // head_size, width
    if head_size == -1 and heads > 0 and width % heads == 0:
        return heads, width
    return None


def _shape_values(name: str, producers: dict, constants: dict) -> list[int] | None:
    """A Reshape's target shape as ints, where it is a constant or a Concat of pieces (unknown pieces: 0)."""
    if name in constants:
        return [int(v) for v in constants[name].ravel()]
    node = producers.get(name)
    if node is None or node.op_type != "Concat":
        return None
    values: list[int] = []
    for piece in node.input:
        if piece in constants:
            values += [int(v) for v in constants[piece].ravel()]
        else:
            values.append(0)  # a runtime size (batch, sequence): one element, as Unsqueeze'd scalars are
    return values


def _projection_width(name: str, producers: dict, constants: dict) -> int | None:
    """Output width of the Linear (MatMul with a 2-D constant weight, maybe + bias) that produced `name`."""
    node = producers.get(name)
    if node is not None and node.op_type == "Add":  # the bias
        node = next((producers[i] for i in node.input if i in producers and producers[i].op_type == "MatMul"), None)
    if node is None or node.op_type != "MatMul" or node.input[1] not in constants:
        return None
    weight = constants[node.input[1]]
    return int(weight.shape[-1]) if weight.ndim == 2 else None


def fuse(prepared: Path, out_dir: Path, *, keep_nodes: list[str], shapes=None) -> Fusion:
    """Fuse `prepared`'s attention into `out_dir`; on any doubt return Fusion(None, ...) and say why.

    keep_nodes: node names the caller must still find (the user's exclusions); a fusion that
    swallows one of them is refused.
    """
    import onnx

    graph = onnx.load(str(prepared), load_external_data=False).graph
    shape, reason = detect_attention(graph)
    if shape is None:
        return Fusion(None, {"applied": False, "reason": reason})
    found = {"num_heads": shape.num_heads, "hidden_size": shape.hidden_size, "attention_layers": shape.layers}
    del graph

    fused_path = out_dir / "fused.onnx"
    try:
        counts = _run_ort_optimizer(prepared, fused_path, shape)
    except Exception as exc:
        from workers.quantize.onnx_prep import short_error

        log.info("attention fusion failed on %s: %s", prepared, exc)
        return _refused(found, f"ONNX Runtime's transformer optimizer failed ({short_error(exc)})")
    details = {"applied": False, **found, "fused_ops": counts}
    if not counts.get("Attention"):
        return _refused(details, f"found {shape.layers} attention layer(s) ({shape.num_heads} heads, hidden "
                                 f"{shape.hidden_size}) but ONNX Runtime's optimizer fused none")

    fused_names = {node.name for node in onnx.load(str(fused_path), load_external_data=False).graph.node}
    swallowed = [name for name in keep_nodes if name not in fused_names]
    if swallowed:
        return _refused(details, f"the fusion would absorb excluded node(s) {', '.join(map(repr, swallowed[:5]))}, "
                                 "which then could not stay float")

    try:
        cosines = output_cosines(prepared, fused_path, shapes=shapes)
    except Exception as exc:
        from workers.quantize.onnx_prep import short_error

        return _refused(details, f"the fused model could not be checked against the original ({short_error(exc)})")
    worst = min(cosines.values())
    details["fused_output_cosine"] = round(worst, 6)
    if not worst >= FUSED_MIN_COSINE:  # NaN fails too
        return _refused(details, f"the fused model's outputs differ from the original's (cosine {worst:.6f} < "
                                 f"{FUSED_MIN_COSINE})")
    details["applied"] = True
    return Fusion(fused_path, details)


def _refused(details: dict[str, Any], reason: str) -> Fusion:
    return Fusion(None, {**details, "applied": False, "reason": reason},
                  [f"transformer fusion skipped: {reason}; quantized the unfused graph"])


def _run_ort_optimizer(src: Path, dst: Path, shape: AttentionShape) -> dict[str, int]:
    """ORT's BERT optimizer with the attention fusion only; returns the counts of the ops it fused.

    opt_level 1 (ORT's basic, provider-independent rewrites) keeps the saved model portable: the
    level-2 fusions are CPU-specific, and the session that runs the model applies them anyway.
    """
    import onnxruntime as ort
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("bert")
    for flag in ("enable_skip_layer_norm", "enable_bias_skip_layer_norm", "enable_embed_layer_norm",
                 "enable_bias_gelu", "enable_gelu", "enable_gelu_approximation", "enable_rotary_embeddings",
                 "enable_qordered_matmul", "enable_gemm_fast_gelu"):
        setattr(options, flag, False)
    # LayerNormalization stays on: the attention fusion starts from the LayerNorm before each layer.
    ort.set_default_logger_severity(3)
    quiet = logging.getLogger("onnxruntime.transformers")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with contextlib.chdir(dst.parent):  # its tools drop temporary files into the working directory
            model = optimize_model(str(src), model_type="bert", num_heads=shape.num_heads,
                                   hidden_size=shape.hidden_size, opt_level=1, use_gpu=False,
                                   optimization_options=options)
        stats = model.get_fused_operator_statistics()
        model.save_model_to_file(str(dst), use_external_data_format=False)
    finally:
        quiet.setLevel(level)
        ort.set_default_logger_severity(2)
    return {op: int(count) for op, count in sorted(stats.items()) if count}


def output_cosines(original: Path, candidate: Path, *, seed: int = 0, shapes=None) -> dict[str, float]:
    """Cosine of each output of `candidate` to `original`'s on generated inputs (batch 2, one row padded)."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    from workers.onnx_tools.inputs import plan_inputs
    from workers.onnx_tools.similarity import cosine

    options = ort.SessionOptions()
    options.log_severity_level = 3
    sessions = {role: ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
                for role, path in (("baseline", original), ("result", candidate))}
    structures = {role: onnx.load(str(path), load_external_data=False)
                  for role, path in (("baseline", original), ("result", candidate))}
    plan = plan_inputs(sessions, structures, shapes=shapes)
    batch = plan.fixed_batch or 2
    feeds = plan.feeds(batch, np.random.default_rng(seed))
    for item in plan.inputs:
        if item.kind == "ones" and batch > 1 and len(item.dims) >= 2:
            for role in feeds:  # pad the last row's tail: the fused op must honour the mask as the graph did
                mask = feeds[role][item.name]
                mask[-1, ..., mask.shape[-1] * 3 // 4:] = 0
    names = [o.name for o in sessions["baseline"].get_outputs()]
    expected = sessions["baseline"].run(names, feeds["baseline"])
    got = sessions["result"].run(names, feeds["result"])
    return {name: cosine(a, b) if np.shape(a) == np.shape(b) else float("nan")
            for name, a, b in zip(names, expected, got)}
