"""Make real-world ONNX exports quantizable, writing down every change as a note.

Exports found in the wild trip ONNX Runtime's quantizer in known ways: weights
held in Constant nodes, weights also listed as graph inputs (IR 3/4 exports),
opsets too old for per-channel quantization, and graphs on which ORT's own
pre-processing (symbolic shape inference) crashes. `prepare` fixes what it can
and falls back where it cannot; the notes say which path it took and why.

Heavy imports (onnx, onnxruntime, numpy) happen inside the functions: the
method modules that import this one are imported by the API process.
"""
from __future__ import annotations

import contextlib
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import onnx

log = logging.getLogger("modelpress.methods.onnx_prep")

# Per-channel (per-axis) quantization needs opset 13.
TARGET_OPSET = 13
DEFAULT_DOMAINS = ("", "ai.onnx")


@dataclass
class Prepared:
    path: Path
    notes: list[str] = field(default_factory=list)
    # Names of the MatMul nodes that replaced Gemm nodes (each keeps its Gemm's name).
    gemm_rewritten: list[str] = field(default_factory=list)


def prepare(input_path: Path, out_dir: Path, *, gemm_to_matmul: bool = True) -> Prepared:
    """Write a quantization-ready copy of `input_path` into `out_dir`; never changes the input."""
    import onnx

    out_dir.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    model = onnx.load(str(input_path))

    named = name_nodes(model.graph)
    if named:
        notes.append(
            f"named {named} unnamed or duplicate-named node(s) as <op_type>_<index> so they can be excluded by name"
        )

    folded, kept, folded_inside = fold_constants_everywhere(model.graph)
    if folded:
        notes.append(
            f"folded {folded} Constant node(s) into initializers (the quantizer only quantizes initializer weights)"
            + (f"; {folded_inside} of them inside If/Loop/Scan subgraphs" if folded_inside else "")
        )
    if kept:
        notes.append(f"kept {kept} Constant node(s) as they are (sparse or string values, or graph outputs)")

    model, note = upgrade_opset(model, TARGET_OPSET)
    if note:
        notes.append(note)

    removed = drop_initializer_inputs(model.graph)
    if removed:
        notes.append(
            f"removed {removed} initializer(s) from the graph inputs (an old-IR export listed its weights as inputs; "
            "ONNX Runtime treats those as overridable and the quantizer skips them)"
        )
    _raise_ir_version(model)

    staged = out_dir / "prep-staged.onnx"
    onnx.save(model, str(staged))
    del model

    preprocessed = out_dir / "prep-ort.onnx"
    current = staged
    path_taken, note = ort_pre_process(staged, preprocessed)
    notes.append(note)
    if path_taken is not None:
        current = preprocessed

    rewritten: list[str] = []
    if gemm_to_matmul:
        model = onnx.load(str(current))
        rewritten, skipped = rewrite_gemm_everywhere(model.graph)
        if rewritten:
            notes.append(
                f"rewrote {len(rewritten)} Gemm node(s) with constant weights as MatMul + Add "
                "(ONNX Runtime's dynamic quantization covers MatMul, not Gemm)"
            )
        if skipped:
            notes.append(
                f"left {skipped} Gemm node(s) as float: their weights are not constant float32 or transA is set"
            )
        if rewritten:
            current = out_dir / "prep-gemm.onnx"
            onnx.save(model, str(current))
        del model

    return Prepared(path=current, notes=notes, gemm_rewritten=rewritten)


# --- graph edits on a loaded ModelProto ------------------------------------------------------------

def name_nodes(graph: onnx.GraphProto) -> int:
    """Give every node a unique name, subgraph (If/Loop/Scan body) nodes included; returns how many were renamed.

    A top-level node is named <op_type>_<index>; a node inside a subgraph <owner>/<attribute>/<op_type>_<index>
    (owner: the If/Loop/Scan node's name), the index being its position in its own graph.
    """
    taken = {node.name for node in all_nodes(graph) if node.name}
    seen: set[str] = set()
    renamed = _name_graph_nodes(graph, "", seen, taken)
    for owner, attribute, subgraph in subgraph_sites(graph):
        renamed += _name_graph_nodes(subgraph, f"{owner.name}/{attribute}/", seen, taken)
    return renamed


def _name_graph_nodes(graph: onnx.GraphProto, prefix: str, seen: set[str], taken: set[str]) -> int:
    renamed = 0
    for index, node in enumerate(graph.node):
        if node.name and node.name not in seen:
            seen.add(node.name)
            continue
        base = f"{prefix}{node.op_type}_{index}"
        name, suffix = base, 1
        while name in taken or name in seen:
            name, suffix = f"{base}_{suffix}", suffix + 1
        node.name = name
        seen.add(name)
        taken.add(name)
        renamed += 1
    return renamed


# --- subgraphs (If branches, Loop and Scan bodies) -----------------------------------------------------

def subgraph_sites(graph: onnx.GraphProto):
    """(owner node, attribute name, subgraph) for every subgraph at any depth, outer ones first.

    The owner of a nested subgraph is yielded before it is descended into, so its name (once name_nodes ran)
    is known; the objects are live views: edit nodes in place, never rebuild an owner's node list while walking.
    """
    import onnx

    for node in graph.node:
        for attr in node.attribute:
            subs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else \
                list(attr.graphs) if attr.type == onnx.AttributeProto.GRAPHS else []
            for sub in subs:
                yield node, attr.name, sub
                yield from subgraph_sites(sub)


def all_graphs(graph: onnx.GraphProto) -> list[onnx.GraphProto]:
    return [graph, *(sub for _, _, sub in subgraph_sites(graph))]


def all_nodes(graph: onnx.GraphProto):
    for each in all_graphs(graph):
        yield from each.node


def all_initializers(graph: onnx.GraphProto):
    for each in all_graphs(graph):
        yield from each.initializer


def nodes_with_scope(graph: onnx.GraphProto, site: tuple | None = None, outer: dict | None = None):
    """(site, node, visible initializers) for every node at any depth. site: None for the main graph, else
    (owner node, attribute name) of the subgraph the node sits in; visible: its graph's initializers and
    those of the graphs enclosing it (a subgraph may read an outer weight)."""
    visible = {**(outer or {}), **{init.name: init for init in graph.initializer}}
    for node in graph.node:
        yield site, node, visible
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from nodes_with_scope(sub, (node, attr.name), visible)


def site_label(site: tuple) -> dict[str, str]:
    owner, attribute = site
    return {"node": owner.name, "op_type": owner.op_type, "attribute": attribute}


def localize_outer_weights(graph: onnx.GraphProto, op_types) -> tuple[int, int]:
    """Give each `op_types` node inside a subgraph its weight (input 1) as an initializer of its own graph.

    ORT's quantizer looks Conv weights up in the subgraph being quantized only ("Expected ... to be an
    initializer" for a weight of the enclosing graph). A weight read from one subgraph only is moved there
    (no copy); one read elsewhere too is copied under a fresh name. Returns (moved, copied).
    """
    from onnx import TensorProto

    wanted = set(op_types)
    owners: dict[int, onnx.GraphProto] = {id(g): g for g in all_graphs(graph)}
    readers: dict[str, set[int]] = {}
    for each in owners.values():
        for node in each.node:
            for name in node.input:
                readers.setdefault(name, set()).add(id(each))
    wants: list[tuple[onnx.GraphProto, onnx.NodeProto]] = []
    for each in owners.values():
        if each is graph:
            continue
        local = {init.name for init in each.initializer}
        wants += [(each, node) for node in each.node
                  if node.op_type in wanted and len(node.input) > 1 and node.input[1] not in local]
    if not wants:
        return 0, 0
    # weight name -> (graph holding it, initializer), from the outside in
    holders: dict[str, tuple[onnx.GraphProto, onnx.TensorProto]] = {}
    for each in all_graphs(graph):
        for init in each.initializer:
            holders.setdefault(init.name, (each, init))
    names = {name for each in owners.values() for name in _all_tensor_names(each)}
    moved = copied = 0
    for sub, node in wants:
        name = node.input[1]
        if name not in holders or holders[name][0] is sub:
            continue  # computed at run time, or already moved here
        holder, init = holders[name]
        if readers.get(name, set()) == {id(sub)}:
            sub.initializer.append(init)
            kept = [i for i in holder.initializer if i.name != name]
            del holder.initializer[:]
            holder.initializer.extend(kept)
            holders[name] = (sub, sub.initializer[-1])
            moved += 1
            continue
        fresh, suffix = f"{name}__local", 1
        while fresh in names:
            fresh, suffix = f"{name}__local_{suffix}", suffix + 1
        names.add(fresh)
        copy = TensorProto()
        copy.CopyFrom(init)
        copy.name = fresh
        sub.initializer.append(copy)
        node.input[1] = fresh
        copied += 1
    return moved, copied


def _graphs_bottom_up(graph: onnx.GraphProto):
    """Every graph, each subgraph before the graph that holds it: an edit that rebuilds a graph's node list
    (which detaches the node objects a walk holds) then comes after the edits inside its subgraphs."""
    import onnx

    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graphs_bottom_up(attr.g)
            for sub in attr.graphs:
                yield from _graphs_bottom_up(sub)
    yield graph


def subgraph_summary(graph: onnx.GraphProto, op_types) -> list[dict]:
    """Each subgraph holding nodes of `op_types` (at its own level): owner node, op type, attribute, counts."""
    wanted = set(op_types)
    found = []
    for owner, attribute, sub in subgraph_sites(graph):
        counts = Counter(node.op_type for node in sub.node if node.op_type in wanted)
        if counts:
            found.append({"node": owner.name, "op_type": owner.op_type, "attribute": attribute,
                          "ops": dict(sorted(counts.items()))})
    return found


def fold_constants(graph: onnx.GraphProto) -> tuple[int, int]:
    """Move this graph's Constant nodes' values into its initializers. Returns (folded, kept)."""
    graph_outputs = {o.name for o in graph.output}
    nodes, folded, kept = [], 0, 0
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in DEFAULT_DOMAINS and len(node.output) == 1:
            tensor = _constant_value(node) if node.output[0] not in graph_outputs else None
            if tensor is not None:
                tensor.name = node.output[0]
                graph.initializer.append(tensor)
                folded += 1
                continue
            kept += 1
        nodes.append(node)
    if folded:
        del graph.node[:]
        graph.node.extend(nodes)
    return folded, kept


def fold_constants_everywhere(graph: onnx.GraphProto) -> tuple[int, int, int]:
    """fold_constants in the graph and in every subgraph. Returns (folded, kept, folded inside subgraphs)."""
    folded = kept = inside = 0
    for each in _graphs_bottom_up(graph):
        done, left = fold_constants(each)
        folded, kept = folded + done, kept + left
        inside += done if each is not graph else 0
    return folded, kept, inside


def _constant_value(node: onnx.NodeProto) -> onnx.TensorProto | None:
    """The dense tensor a Constant node produces, or None where it is sparse, a string, or a reference."""
    from onnx import TensorProto, helper

    if len(node.attribute) != 1 or node.attribute[0].ref_attr_name:
        return None
    attr = node.attribute[0]
    if attr.name == "value":
        tensor = TensorProto()
        tensor.CopyFrom(attr.t)
        return tensor
    if attr.name == "value_float":
        return helper.make_tensor("", TensorProto.FLOAT, [], [attr.f])
    if attr.name == "value_floats":
        return helper.make_tensor("", TensorProto.FLOAT, [len(attr.floats)], list(attr.floats))
    if attr.name == "value_int":
        return helper.make_tensor("", TensorProto.INT64, [], [attr.i])
    if attr.name == "value_ints":
        return helper.make_tensor("", TensorProto.INT64, [len(attr.ints)], list(attr.ints))
    return None  # sparse_value, value_string(s)


def drop_initializer_inputs(graph: onnx.GraphProto) -> int:
    initializers = {init.name for init in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    removed = len(graph.input) - len(inputs)
    if removed:
        del graph.input[:]
        graph.input.extend(inputs)
    return removed


def default_opset(model: onnx.ModelProto) -> int | None:
    versions = [o.version for o in model.opset_import if o.domain in DEFAULT_DOMAINS]
    return max(versions) if versions else None


def upgrade_opset(model: onnx.ModelProto, target: int) -> tuple[onnx.ModelProto, str | None]:
    """Convert the default-domain opset up to `target`; on any failure keep the model as it was."""
    from onnx import version_converter

    current = default_opset(model)
    if current is None or current >= target:
        return model, None
    try:
        converted = version_converter.convert_version(model, target)
        _raise_ir_version(converted)
        _check_converted(original=model, converted=converted)
    except Exception as exc:
        return model, (
            f"kept opset {current}: converting to opset {target} failed ({short_error(exc)}); "
            "per-channel quantization may be unavailable"
        )
    return converted, f"upgraded the default opset from {current} to {target} (per-channel quantization needs opset 13)"


def _check_converted(*, original: onnx.ModelProto, converted: onnx.ModelProto) -> None:
    """The converted model must pass the checker (if the original did) and load in ONNX Runtime."""
    import onnx

    try:
        onnx.checker.check_model(converted)
    except onnx.checker.ValidationError:
        try:
            onnx.checker.check_model(original)
        except onnx.checker.ValidationError:
            pass  # the export already failed the checker; ONNX Runtime loading it is the test that matters
        else:
            raise
    load_in_ort(converted.SerializeToString())


def _raise_ir_version(model: onnx.ModelProto) -> None:
    """IR 3 requires every initializer to be a graph input; newer opsets need newer IR versions."""
    from onnx import helper

    needed = max(4, helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True))
    if model.ir_version < needed:
        model.ir_version = needed


def rewrite_gemm_everywhere(graph: onnx.GraphProto) -> tuple[list[str], int]:
    """rewrite_gemm_as_matmul in the graph and in every subgraph; a Gemm inside a subgraph may read its weight
    from an enclosing graph (a new, transposed weight then lives in the subgraph). Returns (rewritten, skipped)."""
    tensor_names = {name for each in all_graphs(graph) for name in _all_tensor_names(each)}
    orphans: set[str] = set()
    rewritten: list[str] = []
    skipped = 0

    def rewrite(each, outer: dict) -> None:
        nonlocal skipped
        done, left = rewrite_gemm_as_matmul(each, outer=outer, tensor_names=tensor_names, orphans=orphans)
        rewritten.extend(done)
        skipped += left
        # Descends after the rewrite: the node list was rebuilt, and only its new objects are live.
        scope = {**outer, **{init.name: init for init in each.initializer}}
        for node in each.node:
            for attr in node.attribute:
                for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    rewrite(sub, scope)

    rewrite(graph, {})
    if orphans:
        for each in _graphs_bottom_up(graph):
            _drop_unused_initializers(each, orphans)
    return rewritten, skipped


def rewrite_gemm_as_matmul(graph: onnx.GraphProto, *, outer: dict | None = None, tensor_names: set[str] | None = None,
                           orphans: set[str] | None = None) -> tuple[list[str], int]:
    """Gemm(A, B, C) with constant float32 B and transA=0 -> MatMul(A, alpha*B') [+ Add(beta*C)].

    The MatMul keeps the Gemm's name. `outer`: initializers of the enclosing graphs (for a subgraph). When
    `orphans` is given, weights the rewrite may leave unused are added to it for the caller to drop; else they
    are dropped here. Returns (names of rewritten nodes, count left alone).
    """
    from onnx import TensorProto, helper, numpy_helper

    initializers = {**(outer or {}), **{init.name: init for init in graph.initializer}}
    tensor_names = _all_tensor_names(graph) if tensor_names is None else tensor_names
    orphan_candidates: set[str] = set()
    nodes, rewritten, skipped = [], [], 0

    def fresh(base: str) -> str:
        name, suffix = base, 1
        while name in tensor_names:
            name, suffix = f"{base}_{suffix}", suffix + 1
        tensor_names.add(name)
        return name

    for node in graph.node:
        if node.op_type != "Gemm" or node.domain not in DEFAULT_DOMAINS:
            nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
        trans_a, trans_b = int(attrs.get("transA", 0)), int(attrs.get("transB", 0))
        weight = initializers.get(node.input[1])
        bias_name = node.input[2] if len(node.input) > 2 and node.input[2] and beta != 0.0 else None
        bias = initializers.get(bias_name) if bias_name else None
        unscalable_bias = bias_name and beta != 1.0 and bias is None
        if trans_a or weight is None or weight.data_type != TensorProto.FLOAT or unscalable_bias:
            skipped += 1
            nodes.append(node)
            continue

        weight_name = weight.name
        if trans_b or alpha != 1.0:
            array = numpy_helper.to_array(weight)
            array = (array.T if trans_b else array) * alpha
            weight_name = fresh(f"{weight.name}_matmul")
            graph.initializer.append(numpy_helper.from_array(array, weight_name))
            orphan_candidates.add(weight.name)
        if bias_name and bias is not None and beta != 1.0:  # (a named bias that is no initializer went above)
            scaled = numpy_helper.to_array(bias) * beta
            new_bias = fresh(f"{bias_name}_scaled")
            graph.initializer.append(numpy_helper.from_array(scaled, new_bias))
            orphan_candidates.add(bias_name)
            bias_name = new_bias

        output = node.output[0]
        matmul_out = fresh(f"{output}_matmul") if bias_name else output
        nodes.append(helper.make_node("MatMul", [node.input[0], weight_name], [matmul_out], name=node.name))
        if bias_name:
            nodes.append(helper.make_node("Add", [matmul_out, bias_name], [output], name=fresh(f"{node.name}_bias")))
        rewritten.append(node.name)

    if rewritten:
        del graph.node[:]
        graph.node.extend(nodes)
        if orphans is None:
            _drop_unused_initializers(graph, orphan_candidates)
        else:
            orphans |= orphan_candidates
    return rewritten, skipped


def _all_tensor_names(graph: onnx.GraphProto) -> set[str]:
    names = {i.name for i in graph.initializer} | {i.name for i in graph.input} | {o.name for o in graph.output}
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
        names.add(node.name)
    return names


def _drop_unused_initializers(graph: onnx.GraphProto, candidates: set[str]) -> None:
    used = _used_names(graph) | {o.name for o in graph.output}
    keep = [init for init in graph.initializer if init.name not in candidates or init.name in used]
    if len(keep) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(keep)


def _used_names(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name a node reads, subgraphs (If/Loop/Scan bodies) included."""
    used: set[str] = set()
    for node in graph.node:
        used.update(node.input)
        for attr in node.attribute:
            if attr.HasField("g"):
                used |= _used_names(attr.g)
            for sub in attr.graphs:
                used |= _used_names(sub)
    return used


# --- ONNX Runtime's own pre-processing ----------------------------------------------------------------

def ort_pre_process(src: Path, dst: Path) -> tuple[str | None, str]:
    """ORT's quant_pre_process (shape inference + graph optimisation), falling back as it fails.

    Returns (path taken or None when skipped, note).
    """
    import onnxruntime as ort
    from onnxruntime.quantization.shape_inference import quant_pre_process

    failures: list[tuple[str, str]] = []  # (attempt, short error)
    for label, options in (
        ("full", {}),
        ("without symbolic shape inference", {"skip_symbolic_shape": True}),
    ):
        # Its optimisation session logs a warning per unused initializer; keep the worker log readable.
        ort.set_default_logger_severity(3)
        try:
            # Its symbolic shape inference saves sym_shape_infer_temp.onnx (and external data) into the
            # working directory when it gives up: keep that inside the output's folder.
            with contextlib.chdir(dst.parent):
                quant_pre_process(str(src.resolve()), str(dst.resolve()), **options)
            load_in_ort(str(dst))
        except Exception as exc:
            log.info("quant_pre_process (%s) failed on %s: %s", label, src, exc)
            failures.append((label, short_error(exc)))
            dst.unlink(missing_ok=True)
            continue
        finally:
            ort.set_default_logger_severity(2)  # ONNX Runtime's default: warnings
        if not failures:
            return label, (
                "ran ONNX Runtime's quantization pre-processing (symbolic shape inference, optimisation, shape inference)"
            )
        return label, (
            "ran ONNX Runtime's quantization pre-processing without symbolic shape inference "
            f"(with it, it failed: {failures[0][1]})"
        )
    tried = "; ".join(f"{label}: {error}" for label, error in failures)
    return None, f"skipped ONNX Runtime's quantization pre-processing; it failed ({tried})"


def load_in_ort(model: str | bytes) -> None:
    """Open a CPU session without optimisations: proves ONNX Runtime accepts the graph."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def op_counts(graph: onnx.GraphProto) -> Counter[str]:
    """Nodes per op type, in the graph and in its subgraphs (If/Loop/Scan bodies)."""
    return Counter(node.op_type for node in all_nodes(graph))


# Ops of a model that is quantized already: ONNX's QDQ and integer ops, ONNX Runtime's contrib ones.
QUANTIZED_OPS = frozenset({
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "ConvInteger", "MatMulInteger", "QLinearConv",
    "QLinearMatMul", "DynamicQuantizeLSTM", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QAttention",
    "QGemm", "QLinearAdd", "QLinearMul", "MatMulNBits", "GatherBlockQuantized",
})


def refuse_quantized(graph, method: str) -> None:
    """StepFailed(already_quantized) when the model holds quantized ops: calibrating a graph whose activations
    are already quantized at run time breaks ONNX Runtime's static quantizer (a KeyError on a scale, on
    ddddocr's int8 model), and it would quantize twice."""
    from app.errors import StepFailed

    found = Counter(node.op_type for node in all_nodes(graph) if node.op_type in QUANTIZED_OPS)
    if found:
        ops = ", ".join(f"{count} {op}" for op, count in found.most_common(4))
        raise StepFailed(f"the model is quantized already ({ops}); {method} quantizes float models: upload the "
                         "float model it was made from", code="already_quantized")


def short_error(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}"
