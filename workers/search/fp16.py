"""Named nodes of a model (float or QDQ) computing in float16, the rest of the graph as it was.

A mixed-precision candidate keeps its most sensitive nodes out of int8; where the runtime runs float16 faster than
float32 (a GPU), those nodes should run in float16. `to_fp16` converts exactly the named nodes: their float32
weights become float16 (a float16 copy where a node left as it was reads the same initializer), a Cast to float16
goes in front of each float32 activation they read, a Cast back to float32 after each output that something else
(a node left as it was, a graph output, a subgraph) reads, and two converted nodes next to each other pass float16
without a Cast pair. Graph inputs and outputs keep their types.

A node is left as it was, and missing from the names returned, when it is not a float32 compute node: its ONNX
schema (at the model's opset; other domains are not converted) has no float16 for the type it computes in, it reads
no float32 input or writes no float32 output of that type, it holds a subgraph, or it is a QuantizeLinear /
DequantizeLinear (their float side stays float32, so ONNX Runtime still fuses DequantizeLinear -> op ->
QuantizeLinear into QLinearConv / QGemm), a Cast, or an op whose output type an attribute sets. With `provider`
named, a node is also left as it was when that execution provider has no float16 kernel for its op in this
onnxruntime build: ONNX Runtime would run it in float32 between Casts, all cost and no gain. ORT's CPU provider
(1.32, x86) registers float16 kernels for LayerNormalization and data movement, not for Conv, Gemm, MatMul or
Relu; the GPU build (onnxruntime-gpu) registers CUDAExecutionProvider's, which cover them.

ONNX Runtime's converter (`onnxruntime.transformers.float16.convert_float_to_float16`, the maintained fork of
onnxconverter-common's) is not used: it converts a whole model, and a block list of every other node does not turn
it into a per-node conversion. Run on a QDQ model (onnxruntime 1.32) with one Conv converted, it makes every float
tensor of the graph float16 and puts a Cast pair around every blocked node: 26 Casts for one node, each
DequantizeLinear -> Conv / Gemm edge cut by a Cast pair so ORT no longer fuses any QLinearConv or QGemm (the int8
model runs as float Conv between Q/DQ), every float32 activation rounded through float16 and back, and the Casts
appended after the nodes that read them, which onnx.checker refuses (not topologically sorted).

    path, converted = to_fp16(mixed_qdq_path, ["conv7", "conv7_relu"], out / "mixed-fp16.onnx",
                              provider="CUDAExecutionProvider")
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import onnx

FLOAT, FLOAT16 = 1, 10  # onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
HALF = "tensor(float16)"
LARGEST_FLOAT16 = 65504.0
# Nodes never converted: the QDQ pairs (their float side must stay float32 for ORT's QDQ fusions), the ops whose
# job is a type change, and those whose output type an attribute sets rather than their inputs.
NEVER_CONVERTED = frozenset({
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "Cast", "CastLike", "EyeLike",
    "RandomNormalLike", "RandomUniformLike", "Bernoulli", "Multinomial",
})


@dataclass
class _Conversion:
    """One convertible node (its place in the graph): the positions of the inputs and outputs that turn float16."""

    at: int
    node: onnx.NodeProto
    inputs: list[int] = field(default_factory=list)
    outputs: list[int] = field(default_factory=list)


def to_fp16(path: Path, nodes: list[str], out: Path, *, provider: str | None = None) -> tuple[Path, list[str]]:
    """Write to `out` the model at `path` with the nodes named `nodes` (main graph) computing in float16.

    provider: None converts every named float32 compute node whose ONNX schema takes float16; an execution
    provider's name (CUDAExecutionProvider) also leaves the ops it has no float16 kernel for in this onnxruntime
    build. Returns (out, the names converted, in the order given). Raises ValueError naming the nodes the model
    does not have, or a provider this onnxruntime build registers no kernels for.
    """
    import onnx

    model = onnx.load(str(path))
    graph = model.graph
    present = {node.name for node in graph.node}
    wanted = list(dict.fromkeys(nodes))
    missing = [name for name in wanted if name not in present]
    if missing:
        raise ValueError(f"the model at {path.name} has no node named {', '.join(map(repr, missing))}; the names "
                         "are the nodes' names in the main graph, as the quantizer's nodes_to_exclude takes them.")
    kernels = _float16_kernels(provider) if provider is not None else None
    infos = _value_infos(model)
    types = {name: info.type.tensor_type.elem_type for name, info in infos.items()}
    types.update({init.name: init.data_type for init in graph.initializer})
    opsets, named = _opsets(model), set(wanted)
    conversions = [conversion for at, node in enumerate(graph.node) if node.name in named
                   for conversion in [_convertible(at, node, types, opsets, kernels)] if conversion is not None]
    _rewire(graph, conversions, infos)
    onnx.save(model, str(out))
    done = {conversion.node.name for conversion in conversions}
    return out, [name for name in wanted if name in done]


def _convertible(at: int, node: onnx.NodeProto, types: dict[str, int], opsets: dict[str, int],
                 kernels: dict[str, list[tuple[tuple[int, int], dict[str, list[str]]]]] | None) -> _Conversion | None:
    """The node's float16 positions, or None where it stays as it is (see the module docstring for when)."""
    import onnx

    if node.domain not in ("", "ai.onnx") or node.op_type in NEVER_CONVERTED or any(
            attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for attr in node.attribute):
        return None
    try:
        schema = onnx.defs.get_schema(node.op_type, opsets.get("", 1), "")
    except onnx.defs.SchemaError:
        return None
    allowed = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}
    ins, outs = _formals(node.input, schema.inputs), _formals(node.output, schema.outputs)
    bound: dict[str, set[int]] = {}
    for tensor, formal in [*ins, *outs]:
        if tensor and formal in allowed and tensor in types:
            bound.setdefault(formal, set()).add(types[tensor])
    # A type parameter turns float16 where everything bound to it is float32 and its schema allows float16.
    halved = {param for param, seen in bound.items() if seen == {FLOAT} and HALF in allowed[param]}
    conversion = _Conversion(at, node, inputs=[i for i, (t, f) in enumerate(ins) if t and f in halved],
                             outputs=[i for i, (t, f) in enumerate(outs) if t and f in halved])
    if not conversion.inputs or not conversion.outputs:
        return None
    if kernels is not None and not any(
            start <= schema.since_version <= end and all(HALF in constraints.get(param, [HALF]) for param in halved)
            for (start, end), constraints in kernels.get(node.op_type, [])):
        return None
    return conversion


def _rewire(graph: onnx.GraphProto, conversions: list[_Conversion], infos: dict[str, onnx.ValueInfoProto]) -> None:
    """Turn the converted nodes' positions float16 in place, with the Casts and initializer copies that needs."""
    import onnx
    from onnx import helper

    converted_at = {(c.at, index) for c in conversions for index in c.inputs}
    float_readers: dict[str, int] = {}  # tensor -> how many places read it as float32
    for at, node in enumerate(graph.node):
        for index, tensor in enumerate(node.input):
            if (at, index) not in converted_at:
                float_readers[tensor] = float_readers.get(tensor, 0) + 1
    for tensor in [o.name for o in graph.output] + _read_in_subgraphs(graph):
        float_readers[tensor] = float_readers.get(tensor, 0) + 1
    initializers = {init.name: init for init in graph.initializer}
    graph_inputs = {i.name for i in graph.input}
    taken = _tensor_names(graph)
    half: dict[str, str] = {}  # float32 tensor -> its float16 twin
    before: dict[int, list[onnx.NodeProto]] = {}
    after: dict[int, list[onnx.NodeProto]] = {}
    dropped: set[str] = set()
    value_infos: list[onnx.ValueInfoProto] = []

    def twin(tensor: str) -> str:
        name = f"{tensor}_fp16"
        while name in taken:
            name += "_"
        taken.add(name)
        if tensor in infos:
            info = onnx.ValueInfoProto()
            info.CopyFrom(infos[tensor])
            info.name = name
            info.type.tensor_type.elem_type = FLOAT16
            value_infos.append(info)
        return name

    for conversion in conversions:  # graph order: a tensor's producer comes before its readers
        node = conversion.node
        for index in conversion.inputs:
            tensor = node.input[index]
            if tensor not in half:
                if tensor in initializers and tensor not in graph_inputs:
                    half[tensor] = _half_initializer(graph, initializers[tensor], shared=tensor in float_readers,
                                                     name=f"{tensor}_fp16", taken=taken)
                else:
                    half[tensor] = twin(tensor)
                    before.setdefault(conversion.at, []).append(helper.make_node(
                        "Cast", [tensor], [half[tensor]], name=f"{half[tensor]}_cast", to=FLOAT16))
            node.input[index] = half[tensor]
        for index in conversion.outputs:
            tensor = node.output[index]
            half[tensor] = twin(tensor)
            node.output[index] = half[tensor]
            if tensor in float_readers:
                after.setdefault(conversion.at, []).append(helper.make_node(
                    "Cast", [half[tensor]], [tensor], name=f"{half[tensor]}_cast_back", to=FLOAT))
            else:
                dropped.add(tensor)
    ordered = []
    for at, node in enumerate(graph.node):
        ordered += [*before.get(at, []), _copy(node), *after.get(at, [])]
    del graph.node[:]
    graph.node.extend(ordered)
    kept = [info for info in graph.value_info if info.name not in dropped]
    del graph.value_info[:]
    graph.value_info.extend(kept + value_infos)


def _half_initializer(graph: onnx.GraphProto, init: onnx.TensorProto, *, shared: bool, name: str,
                      taken: set[str]) -> str:
    """The float16 version of a float32 initializer: the same one converted, or a copy where a float32 node reads
    it too. Returns its name. Values beyond float16's range are clipped to its largest finite value, not inf."""
    import numpy as np
    from onnx import numpy_helper

    values = numpy_helper.to_array(init)
    halved = np.where(np.isfinite(values), np.clip(values, -LARGEST_FLOAT16, LARGEST_FLOAT16), values)
    if not shared:
        init.CopyFrom(numpy_helper.from_array(halved.astype(np.float16), init.name))
        for info in graph.value_info:
            if info.name == init.name:
                info.type.tensor_type.elem_type = FLOAT16
        return init.name
    while name in taken:
        name += "_"
    taken.add(name)
    graph.initializer.append(numpy_helper.from_array(halved.astype(np.float16), name))
    return name


def _formals(tensors, formals) -> list[tuple[str, str | None]]:
    """Each actual input/output with its formal parameter's type string (a variadic last formal takes the rest)."""
    import onnx

    pairs = []
    for index, tensor in enumerate(tensors):
        if index < len(formals):
            formal = formals[index]
        elif formals and formals[-1].option == onnx.defs.OpSchema.FormalParameterOption.Variadic:
            formal = formals[-1]
        else:
            formal = None
        pairs.append((tensor, formal.type_str if formal is not None else None))
    return pairs


def float16_ops(provider: str) -> set[str]:
    """The ONNX op types `provider` runs in float16 in this onnxruntime build (empty where it lists no kernels)."""
    try:
        kernels = _float16_kernels(provider)
    except ValueError:
        return set()
    return {op for op, entries in kernels.items()
            if any("tensor(float16)" in allowed for _, constraints in entries for allowed in constraints.values())}


@functools.cache
def _float16_kernels(provider: str) -> dict[str, list[tuple[tuple[int, int], dict[str, list[str]]]]]:
    """ONNX-domain op type -> (opset range, type constraints) of each kernel `provider` has in this onnxruntime
    (read once a process: listing them instantiates every provider the build has)."""
    import onnxruntime
    from onnxruntime.capi import _pybind_state

    listing = getattr(_pybind_state, "get_all_opkernel_def", None)
    if listing is None:
        raise ValueError(f"onnxruntime {onnxruntime.__version__} here does not list its kernels (a build without "
                         "onnxruntime_PYBIND_EXPORT_OPSCHEMA); pass provider=None to convert by the ONNX schema alone.")
    kernels: dict[str, list[tuple[tuple[int, int], dict[str, list[str]]]]] = {}
    registered = False
    for kernel in listing():
        if kernel.provider != provider:
            continue
        registered = True
        if kernel.domain in ("", "ai.onnx"):
            kernels.setdefault(kernel.op_name, []).append((tuple(kernel.version_range), dict(kernel.type_constraints)))
    if not registered:
        raise ValueError(f"onnxruntime {onnxruntime.__version__} here registers no kernels for {provider!r} (its "
                         "build has no such execution provider, or the provider compiles whole graphs, as "
                         "TensorRT does); pass provider=None to convert by the ONNX schema alone.")
    return kernels


def _value_infos(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    """Every tensor's declared or inferred type and shape (inference is skipped where it fails: what is declared
    is kept)."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # a custom op or a broken shape: the declared types are enough to decide on most nodes
        inferred = model
    graph = inferred.graph
    return {info.name: info for info in [*graph.input, *graph.output, *graph.value_info]
            if info.type.HasField("tensor_type")}


def _opsets(model: onnx.ModelProto) -> dict[str, int]:
    return {("" if o.domain == "ai.onnx" else o.domain): o.version for o in model.opset_import}


def _read_in_subgraphs(graph: onnx.GraphProto) -> list[str]:
    """Tensors the nodes of subgraphs (If/Loop/Scan bodies) read: an outer-scope one must stay float32."""
    from workers.quantize.onnx_prep import subgraph_sites

    return [tensor for _owner, _attr, sub in subgraph_sites(graph) for node in sub.node for tensor in node.input]


def _tensor_names(graph: onnx.GraphProto) -> set[str]:
    names = {i.name for i in [*graph.input, *graph.output, *graph.value_info, *graph.initializer]}
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
    return names | set(_read_in_subgraphs(graph))


def _copy(node: onnx.NodeProto) -> onnx.NodeProto:
    import onnx

    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    return copy
