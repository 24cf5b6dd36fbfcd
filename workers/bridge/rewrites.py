"""Targeted ONNX graph rewrites that let onnx2torch convert models exported by older tools.

onnx's version_converter is not used: on UltraFace (opset 9) its opset-13 model ran but its
outputs differed from the original by 0.67. Instead each rewrite changes only the nodes
onnx2torch cannot take, and the opset import is raised only as far as those rewrites (and
onnx2torch's registry) need, and only when no other node changes meaning on the way.
Every rewrite works on a copy; the caller's model is not touched.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from workers.bridge.errors import UnsupportedOp
from workers.bridge.loader import converter_registry

# Opsets tried when the original's must be raised; 17 is what to_onnx exports at by default.
HIGHEST_TARGET_OPSET = 18
# op -> the since_versions whose changes keep the meaning of a node written for an earlier
# version (new types, negative axes, optional inputs, attributes whose default is the old
# behaviour). A version absent here (Softmax-13, Unsqueeze-13, Clip-11, Pad-11, Resize-11, ...)
# blocks raising the opset past it.
COMPATIBLE_VERSIONS: dict[str, frozenset[int]] = {op: frozenset(versions) for op, versions in {
    "Abs": (13,), "Add": (13, 14), "ArgMax": (11, 12, 13), "ArgMin": (11, 12, 13), "AveragePool": (10, 11),
    "BatchNormalization": (9, 14, 15), "Cast": (9, 13), "Ceil": (13,), "Clip": (12, 13), "Concat": (11, 13),
    "Constant": (9, 11, 12, 13), "Conv": (11,), "ConvTranspose": (11,), "Div": (13, 14), "Dropout": (10,),
    "Equal": (11, 13), "Erf": (13,), "Exp": (13,), "Expand": (13,), "Flatten": (9, 11, 13), "Floor": (13,),
    "Gather": (11, 13), "Gemm": (9, 11, 13), "Greater": (9, 13), "Identity": (13, 14, 16), "LRN": (13,),
    "LeakyRelu": (16,), "Less": (9, 13), "Log": (13,), "LogSoftmax": (11,), "MatMul": (9, 13),
    "Max": (8, 12, 13), "MaxPool": (10, 11, 12), "Mean": (8, 13), "Min": (8, 12, 13), "Mul": (13, 14),
    "Neg": (13,), "PRelu": (9, 16), "Pad": (13,), "Pow": (12, 13, 15), "Reciprocal": (13,),
    "ReduceMax": (11, 12, 13), "ReduceMean": (11, 13), "ReduceMin": (11, 12, 13), "ReduceProd": (11, 13),
    "ReduceSum": (11,), "Relu": (13, 14), "Reshape": (13, 14), "Resize": (13,), "Shape": (13, 15),
    "Sigmoid": (13,), "Slice": (11, 13), "Softmax": (11,), "Split": (11,), "Sqrt": (13,), "Squeeze": (11,),
    "Sub": (13, 14), "Sum": (8, 13), "Tanh": (13,), "Tile": (13,), "TopK": (11,), "Transpose": (13,),
    "Unsqueeze": (11,), "Where": (16,),
}.items()}
# Inputs that hold a layer's weights: a constant there lets onnx2torch build a real nn module.
WEIGHT_SLOTS: dict[str, tuple[int, ...]] = {
    "Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (1, 2), "MatMul": (1,), "LayerNormalization": (1, 2),
    "BatchNormalization": (1, 2, 3, 4), "InstanceNormalization": (1, 2), "PRelu": (1,), "Add": (0, 1),
}
SPATIAL_OPS = frozenset({"Conv", "MaxPool", "AveragePool", "LpPool"})
DEFAULT_DOMAINS = ("", "ai.onnx")


@dataclass
class Prepared:
    model: onnx.ModelProto                  # the rewritten copy onnx2torch converts
    opset: int                              # its default-domain opset
    notes: list[str] = field(default_factory=list)


def node_label(node: onnx.NodeProto, index: int) -> str:
    """A node's name; unnamed nodes are <op_type>_<index> as elsewhere in the service."""
    return node.name or f"{node.op_type}_{index}"


@lru_cache(maxsize=1)
def _histories() -> dict[tuple[str, str], tuple[int, ...]]:
    versions: dict[tuple[str, str], set[int]] = {}
    for schema in onnx.defs.get_all_schemas_with_history():
        versions.setdefault((schema.domain, schema.name), set()).add(schema.since_version)
    return {key: tuple(sorted(found)) for key, found in versions.items()}


def since_version(op_type: str, opset: int, domain: str = "") -> int | None:
    """The version of `op_type` in force at `opset`, or None when the op does not exist there."""
    history = _histories().get((domain, op_type), ())
    found = [v for v in history if v <= opset]
    return found[-1] if found else None


def prepare(model: onnx.ModelProto) -> Prepared:
    """A copy of `model` onnx2torch can convert; UnsupportedOp names the nodes no rewrite can save."""
    prepared = onnx.ModelProto()
    prepared.CopyFrom(model)
    notes: list[str] = []
    graph = prepared.graph
    for node in graph.node:
        if node.domain == "ai.onnx":
            node.domain = ""
    for entry in prepared.opset_import:
        if entry.domain == "ai.onnx":
            entry.domain = ""

    initializers = {t.name for t in graph.initializer}
    listed = [i for i in graph.input if i.name in initializers]
    if listed:
        for value in listed:
            graph.input.remove(value)
        notes.append(f"{len(listed)} graph inputs that are initializers (weights) no longer listed as inputs")

    _fold_constant_weights(prepared, notes)
    opset = default_opset(prepared)
    target = _plan_opset(prepared, opset)
    _explicit_pads(prepared, notes)
    if since_version("Slice", opset) == 1:
        _rewrite_slice_v1(prepared, target, notes)
    _rewrite_upsample(prepared, target, notes)
    if target != opset:
        for entry in prepared.opset_import:
            if entry.domain == "":
                entry.version = target
        notes.append(f"default opset raised from {opset} to {target}, the lowest at which onnx2torch converts "
                     "every node; no other node changes meaning between the two")
    _single_output_producers(prepared, notes)
    return Prepared(model=prepared, opset=target, notes=notes)


def default_opset(model: onnx.ModelProto) -> int:
    return next((e.version for e in model.opset_import if e.domain in DEFAULT_DOMAINS), 1)


# --- which nodes onnx2torch takes at which opset ---------------------------------------------------

def _convertible_at(node: onnx.NodeProto, original: int, target: int, registry: set[tuple[str, str, int]]) -> bool:
    op = node.op_type
    if op == "Slice" and since_version(op, original) == 1:
        return target >= 10 and ("", op, since_version(op, target)) in registry
    if op == "Upsample":
        return target >= 11 and ("", "Resize", since_version("Resize", target)) in registry
    now = since_version(op, target)
    if now is None or ("", op, now) not in registry:
        return False
    before = since_version(op, original)
    crossed = [v for v in _histories().get(("", op), ()) if before is not None and before < v <= now]
    return all(v in COMPATIBLE_VERSIONS.get(op, frozenset()) for v in crossed)


def _plan_opset(model: onnx.ModelProto, original: int) -> int:
    registry = converter_registry()
    imports = {e.domain: e.version for e in model.opset_import}
    nodes = list(enumerate(model.graph.node))
    unsupported: dict[tuple[str, str, int], list[str]] = {}
    for index, node in nodes:
        if node.domain in DEFAULT_DOMAINS:
            continue
        version = imports.get(node.domain, 1)
        if (node.domain, node.op_type, since_version(node.op_type, version, node.domain) or version) not in registry:
            unsupported.setdefault((node.domain, node.op_type, version), []).append(node_label(node, index))

    default_nodes = [(index, node) for index, node in nodes if node.domain in DEFAULT_DOMAINS]
    targets = range(original, max(original, HIGHEST_TARGET_OPSET) + 1)
    chosen = next((t for t in targets
                   if all(_convertible_at(node, original, t, registry) for _, node in default_nodes)), None)
    if chosen is None:
        # No single opset works: blame the nodes that no opset saves, else those failing at the original.
        hopeless = [(i, n) for i, n in default_nodes
                    if not any(_convertible_at(n, original, t, registry) for t in targets)]
        for index, node in hopeless or [(i, n) for i, n in default_nodes
                                        if not _convertible_at(n, original, original, registry)]:
            unsupported.setdefault(("", node.op_type, original), []).append(node_label(node, index))
    if unsupported or chosen is None:  # (no opset chosen always leaves nodes unsupported)
        raise UnsupportedOp(_unsupported_message(unsupported), ops=sorted({op for _, op, _ in unsupported}))
    return chosen


def _unsupported_message(found: dict[tuple[str, str, int], list[str]]) -> str:
    parts = []
    for (domain, op, version), names in found.items():
        shown = ", ".join(f"'{n}'" for n in names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        where = "node" if len(names) == 1 else "nodes"
        parts.append(f"op '{op}' ({domain or 'ai.onnx'} opset {version}) at {where} {shown}")
    return "; ".join(parts) + " cannot be converted to PyTorch"


# --- the rewrites -----------------------------------------------------------------------------------

def _attributes(node: onnx.NodeProto) -> dict[str, Any]:  # onnx's attribute values are of any kind
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _set_attribute(node: onnx.NodeProto, name: str, value: object | None) -> None:
    kept = [a for a in node.attribute if a.name != name]
    del node.attribute[:]
    node.attribute.extend(kept)
    if value is not None:
        node.attribute.append(helper.make_attribute(name, value))


def _fold_constant_weights(model: onnx.ModelProto, notes: list[str]) -> None:
    """Weights behind an Identity of an initializer, or in a Constant node, become initializers.

    torch's exporter shares one initializer between parameters that happen to be equal (the
    LayerNorms of a fresh transformer) and hands it to the others through Identity nodes;
    onnx2torch makes a layer a real module (nn.LayerNorm, nn.Conv2d, nn.Linear) only when its
    weights are initializers. Each such output gets its own copy, as the source model had.
    """
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    outputs = {v.name for v in graph.output}
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in graph.node:
        for position, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, position))
    folded, kept = 0, []
    for node in graph.node:
        value = None
        if node.op_type == "Identity" and node.domain in DEFAULT_DOMAINS and node.input[0] in initializers:
            value = numpy_helper.to_array(initializers[node.input[0]])
        elif (node.op_type == "Constant" and node.domain in DEFAULT_DOMAINS and len(node.attribute) == 1
              and node.attribute[0].name == "value"
              and all(position in WEIGHT_SLOTS.get(user.op_type, ()) for user, position in
                      consumers.get(node.output[0], []))):
            value = numpy_helper.to_array(node.attribute[0].t)
        if value is None or node.output[0] in outputs or not consumers.get(node.output[0]):
            kept.append(node)
            continue
        graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
        folded += 1
    if folded:
        del graph.node[:]
        graph.node.extend(kept)
        notes.append(f"{folded} constant weights passed through Identity or Constant nodes made initializers")


def _explicit_pads(model: onnx.ModelProto, notes: list[str]) -> None:
    """auto_pad SAME_* / VALID -> explicit pads, which onnx2torch takes (it refuses SAME_*)."""
    nodes = [n for n in model.graph.node if n.op_type in SPATIAL_OPS and
             _attributes(n).get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET")]
    if not nodes:
        return
    shapes = _inferred_shapes(model)
    weights = {t.name: list(t.dims) for t in model.graph.initializer}
    rewritten: dict[str, int] = {}
    for node in nodes:
        attrs = _attributes(node)
        mode = attrs["auto_pad"].decode() if isinstance(attrs["auto_pad"], bytes) else str(attrs["auto_pad"])
        shape = shapes.get(node.input[0])
        kernel = list(attrs.get("kernel_shape") or weights.get(node.input[1] if len(node.input) > 1 else "", [])[2:])
        if mode == "VALID":
            pads = [0] * (2 * len(kernel))
        elif shape is None or not kernel or not all(isinstance(d, int) for d in shape[2:]):
            continue  # unknown spatial size: onnx2torch reports the node as unsupported
        else:
            spatial = shape[2:]
            strides = list(attrs.get("strides") or [1] * len(kernel))
            dilations = list(attrs.get("dilations") or [1] * len(kernel))
            begin, end = [], []
            for size, k, s, d in zip(spatial, kernel, strides, dilations):
                total = max(0, (math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size)
                small, large = total // 2, total - total // 2
                begin.append(small if mode == "SAME_UPPER" else large)
                end.append(large if mode == "SAME_UPPER" else small)
            pads = begin + end
        _set_attribute(node, "auto_pad", None)
        _set_attribute(node, "pads", pads)
        rewritten[mode] = rewritten.get(mode, 0) + 1
    for mode, count in rewritten.items():
        notes.append(f"auto_pad={mode} rewritten to explicit pads ({count} nodes)")


def _inferred_shapes(model: onnx.ModelProto) -> dict[str, list[int | str | None]]:
    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    shapes: dict[str, list[int | str | None]] = {}
    for value in [*graph.input, *graph.value_info, *graph.output]:
        if value.type.HasField("tensor_type") and value.type.tensor_type.HasField("shape"):
            shapes[value.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                                  for d in value.type.tensor_type.shape.dim]
    return shapes


def _constant(model: onnx.ModelProto, name: str, values: list[int] | np.ndarray, dtype=np.int64) -> str:
    taken = {t.name for t in model.graph.initializer} | {o for n in model.graph.node for o in n.output}
    unique, suffix = name, 1
    while unique in taken:
        unique, suffix = f"{name}_{suffix}", suffix + 1
    model.graph.initializer.append(numpy_helper.from_array(np.asarray(values, dtype=dtype), unique))
    return unique


def _rewrite_slice_v1(model: onnx.ModelProto, target: int, notes: list[str]) -> None:
    """Slice-1 keeps starts/ends/axes as attributes; Slice-10 on takes them as inputs (same meaning)."""
    if target < 10:
        return
    count = 0
    for index, node in enumerate(model.graph.node):
        if node.op_type != "Slice" or node.domain not in DEFAULT_DOMAINS or len(node.input) > 1:
            continue
        attrs = _attributes(node)
        base = node_label(node, index)
        inputs = [node.input[0], _constant(model, f"{base}_starts", attrs["starts"]),
                  _constant(model, f"{base}_ends", attrs["ends"])]
        if "axes" in attrs:
            inputs.append(_constant(model, f"{base}_axes", attrs["axes"]))
        del node.input[:]
        node.input.extend(inputs)
        del node.attribute[:]
        count += 1
    if count:
        notes.append(f"Slice-1 nodes rewritten to Slice-{since_version('Slice', target)} ({count})")


def _rewrite_upsample(model: onnx.ModelProto, target: int, notes: list[str]) -> None:
    """Upsample (deprecated at opset 10) -> Resize with the coordinate mapping Upsample used."""
    count = 0
    for index, node in enumerate(model.graph.node):
        if node.op_type != "Upsample" or node.domain not in DEFAULT_DOMAINS:
            continue
        attrs = _attributes(node)
        mode = attrs.get("mode", b"nearest")
        mode = mode.decode() if isinstance(mode, bytes) else str(mode)
        if "scales" in attrs:  # Upsample-7
            scales = _constant(model, f"{node_label(node, index)}_scales", attrs["scales"], dtype=np.float32)
        else:
            scales = node.input[1]
        resize_attrs = {"mode": mode, "coordinate_transformation_mode": "asymmetric"}
        if mode == "nearest":
            resize_attrs["nearest_mode"] = "floor"
        resize = helper.make_node("Resize", [node.input[0], "", scales], list(node.output), name=node.name,
                                  **resize_attrs)
        node.CopyFrom(resize)
        count += 1
    if count:
        notes.append(f"Upsample nodes rewritten to Resize-{since_version('Resize', target)} ({count})")


def _single_output_producers(model: onnx.ModelProto, notes: list[str]) -> None:
    """Give graph outputs that come from a multi-output node, or are initializers, an Identity of their own.

    onnx2torch returns the whole tuple of a node whose output is a graph output, and cannot return
    an initializer at all; one Identity per such output keeps the outputs one tensor each, in order.
    """
    graph = model.graph
    producers = {o: n for n in graph.node for o in n.output}
    initializers = {t.name: t for t in graph.initializer}
    fixed = 0
    for value in graph.output:
        name = value.name
        producer = producers.get(name)
        if producer is not None and len([o for o in producer.output if o]) > 1:
            source = f"{name}__bridge_source"
            for node in graph.node:
                node.output[:] = [source if o == name else o for o in node.output]
                node.input[:] = [source if i == name else i for i in node.input]
        elif producer is None and name in initializers:
            source = f"{name}__bridge_source"
            initializers[name].name = source
            for node in graph.node:
                node.input[:] = [source if i == name else i for i in node.input]
        else:
            continue
        graph.node.append(helper.make_node("Identity", [source], [name], name=f"{name}__bridge_identity"))
        fixed += 1
    if fixed:
        notes.append(f"{fixed} graph outputs given an Identity node of their own")
