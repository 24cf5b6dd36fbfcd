"""Repeated blocks of an ONNX graph (transformer layers, residual blocks) and a shallower copy without some of them.

A block boundary is a "cut": a point in the node order where every path from the inputs to the outputs
passes through one tensor. Walking the nodes in topological order and tracking which activations are
still needed later, a cut is a position where only one is. Constants (initializers, Constant nodes and
what is computed from them alone) never count. Side tensors that every block reads, such as an attention
mask, would keep two tensors alive everywhere; when no repeated run shows up without them, the longest-
lived tensors are set aside as side inputs one at a time (up to MAX_SIDE_TENSORS) and the search repeats.

The segments between consecutive cuts get a structural signature (op types, attributes, weight shapes,
where each input comes from); a block is one or more consecutive segments, and the blocks found are the
longest run of consecutive identical ones (most nodes covered, then the shortest block).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import onnx
from onnx import numpy_helper

MAX_SIDE_TENSORS = 3
# Integer constants up to this many elements (shapes, axes, indices) are compared by value; weights, which differ
# from block to block, by shape.
SMALL_CONSTANT = 64


@dataclass
class Block:
    index: int
    nodes: list[int]                 # node positions in graph.node
    input: str                       # the cut tensor the block starts from
    output: str                      # the cut tensor it ends with


@dataclass
class Blocks:
    blocks: list[Block]
    side_tensors: list[str] = field(default_factory=list)
    cuts: int = 0                    # cut tensors found in the graph
    searched: str = ""

    def summary(self) -> dict[str, Any]:
        return {"count": len(self.blocks), "nodes_per_block": len(self.blocks[0].nodes) if self.blocks else 0,
                "boundaries": [b.input for b in self.blocks] + ([self.blocks[-1].output] if self.blocks else []),
                "side_tensors": self.side_tensors, "cuts_in_graph": self.cuts}


def find_blocks(model: onnx.ModelProto) -> Blocks:
    """The longest run of at least two consecutive identical blocks; an empty `blocks` when there is none."""
    graph = model.graph
    constants = _constant_tensors(graph)
    lifetimes = _lifetimes(graph, constants)
    tried: list[str] = []
    best = Blocks(blocks=[])
    # Long-lived tensors first: a mask read by every layer lives from the embeddings to the last layer.
    candidates = sorted(lifetimes, key=lambda t: lifetimes[t][0] - lifetimes[t][1])
    for sides in range(MAX_SIDE_TENSORS + 1):
        side = candidates[:sides]
        cuts = _cuts(graph, lifetimes, set(side))
        found = _longest_run(graph, cuts, set(side), constants)
        tried.append(f"{len(cuts)} cuts with side tensors {side}" if side else f"{len(cuts)} cuts")
        if found:
            best = Blocks(blocks=found, side_tensors=side, cuts=len(cuts))
            break
        if sides >= len(candidates):
            break
    best.searched = ("tensors through which every path from the inputs to the outputs passes, walking "
                     f"{len(graph.node)} nodes in topological order ({'; '.join(tried)}), and runs of at least two "
                     "consecutive segments between them with the same op types, attributes and weight shapes")
    return best


def drop_blocks(model: onnx.ModelProto, blocks: list[Block], keep: list[int]) -> onnx.ModelProto:
    """A copy of `model` without the blocks whose index is not in `keep`: what read a dropped block's output
    reads its input instead. Nodes and initializers left unused are removed."""
    student = onnx.ModelProto()
    student.CopyFrom(model)
    graph = student.graph
    rename: dict[str, str] = {}
    dropped: set[int] = set()
    for block in blocks:
        if block.index in keep:
            continue
        rename[block.output] = rename.get(block.input, block.input)
        dropped.update(block.nodes)
    nodes = [node for position, node in enumerate(graph.node) if position not in dropped]
    for node in nodes:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    outputs = {o.name for o in graph.output}
    for source, target in rename.items():
        if source in outputs:  # a graph output keeps its name
            nodes.append(onnx.helper.make_node("Identity", [target], [source], name=f"kept/{source}"))
    nodes = _live_nodes(nodes, outputs)
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for node in graph.node for name in node.input} | outputs
    kept_initializers = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept_initializers)
    produced = {name for node in graph.node for name in node.output}
    kept_info = [v for v in graph.value_info if v.name in produced]
    del graph.value_info[:]
    graph.value_info.extend(kept_info)
    onnx.checker.check_model(student)
    return student


# --- the walk -------------------------------------------------------------------------------------------

def _constant_tensors(graph: onnx.GraphProto) -> set[str]:
    constants = {t.name for t in graph.initializer}
    for node in graph.node:
        if all(not name or name in constants for name in node.input) and node.op_type not in ("RandomNormal",
                                                                                             "RandomUniform"):
            constants.update(node.output)
    return constants


def _lifetimes(graph: onnx.GraphProto, constants: set[str]) -> dict[str, tuple[int, int]]:
    """Non-constant tensor -> (position produced, position last read); graph inputs are produced at -1 and
    graph outputs are read at len(nodes)."""
    produced = {i.name: -1 for i in graph.input if i.name not in constants}
    last: dict[str, int] = {}
    for position, node in enumerate(graph.node):
        for name in node.input:
            if name in produced:
                last[name] = position
        for name in node.output:
            if name and name not in constants:
                produced[name] = position
    for output in graph.output:
        if output.name in produced:
            last[output.name] = len(graph.node)
    return {name: (start, last[name]) for name, start in produced.items() if name in last}


def _cuts(graph: onnx.GraphProto, lifetimes: dict[str, tuple[int, int]], side: set[str]) -> list[tuple[int, str]]:
    """(position, tensor): after node `position` runs, `tensor` is the only live activation besides `side`."""
    starts: dict[int, list[str]] = {}
    ends: dict[int, list[str]] = {}
    for name, (start, end) in lifetimes.items():
        if name not in side:
            starts.setdefault(start, []).append(name)
            ends.setdefault(end, []).append(name)
    live = set(starts.get(-1, []))
    cuts = []
    for position in range(len(graph.node)):
        live.difference_update(ends.get(position, []))
        live.update(starts.get(position, []))
        if len(live) == 1:
            tensor = next(iter(live))
            if tensor in graph.node[position].output:
                cuts.append((position, tensor))
    return cuts


def _longest_run(graph: onnx.GraphProto, cuts: list[tuple[int, str]], side: set[str],
                 constants: set[str]) -> list[Block]:
    if len(cuts) < 3:
        return []
    inputs = [i.name for i in graph.input if i.name not in constants and i.name not in side]
    segments = []   # (node positions, input tensor, output tensor)
    previous_position, previous_tensor = -1, inputs[0] if len(inputs) == 1 else ""
    for position, tensor in cuts:
        members = [p for p in range(previous_position + 1, position + 1) if not _is_constant(graph.node[p], constants)]
        segments.append((members, previous_tensor, tensor))
        previous_position, previous_tensor = position, tensor
    producers = {out: node for node in graph.node for out in node.output}
    initializers = {t.name: t for t in graph.initializer}
    signatures = [_signature(graph, members, entry, side, constants, producers, initializers)
                  for members, entry, _ in segments]

    best: tuple[int, int, int, int] | None = None   # (nodes covered, -block length, start, repeats)
    for length in range(1, len(segments) // 2 + 1):
        for start in range(len(segments) - 2 * length + 1):
            unit = signatures[start:start + length]
            repeats = 1
            while signatures[start + repeats * length:start + (repeats + 1) * length] == unit:
                repeats += 1
            if repeats < 2:
                continue
            covered = sum(len(segments[start + i][0]) for i in range(length * repeats))
            # Where a run can start one segment earlier or later (a ReLU between residual blocks), the later
            # start ends each block with its own activation, as the model's code usually does.
            candidate = (covered, -length, start, repeats)
            if best is None or candidate > best:
                best = candidate
    if best is None:
        return []
    covered, length, start, repeats = best[0], -best[1], best[2], best[3]
    blocks = []
    for index in range(repeats):
        first, last = start + index * length, start + (index + 1) * length - 1
        nodes = [p for s in range(first, last + 1) for p in segments[s][0]]
        blocks.append(Block(index=index, nodes=nodes, input=segments[first][1], output=segments[last][2]))
    if any(not b.input for b in blocks):
        return []
    return blocks


def _is_constant(node: onnx.NodeProto, constants: set[str]) -> bool:
    return all(name in constants for name in node.output if name)


def _signature(graph: onnx.GraphProto, members: list[int], entry: str, side: set[str], constants: set[str],
               producers: dict[str, onnx.NodeProto], initializers: dict[str, onnx.TensorProto]) -> str:
    """Op types, attributes, weight shapes and wiring of a segment, blind to names and weight values."""
    local: dict[str, str] = {}
    parts = []
    for order, position in enumerate(members):
        node = graph.node[position]
        sources = []
        for name in node.input:
            if not name:
                sources.append("-")
            elif name in local:
                sources.append(local[name])
            elif name == entry:
                sources.append("entry")
            elif name in side:
                sources.append(f"side:{name}")
            elif name in initializers:
                sources.append(_tensor_signature(initializers[name]))
            elif name in constants and name in producers:
                sources.append(_constant_signature(producers[name], constants, producers, initializers))
            else:
                sources.append(f"outer:{name}")
        for index, name in enumerate(node.output):
            local[name] = f"{order}.{index}"
        parts.append(f"{node.domain}:{node.op_type}({','.join(sources)}){_attributes(node)}")
    return "|".join(parts)


def _constant_signature(node: onnx.NodeProto, constants: set[str], producers: dict, initializers: dict,
                        depth: int = 0) -> str:
    if depth > 8:
        return "const"
    if node.op_type == "Identity" and node.input[0] in initializers:
        # Exporters share equal initializers (a fresh LayerNorm's ones and zeros) through Identity nodes.
        return _tensor_signature(initializers[node.input[0]])
    inputs = []
    for name in node.input:
        if name in initializers:
            inputs.append(_tensor_signature(initializers[name]))
        elif name in producers:
            inputs.append(_constant_signature(producers[name], constants, producers, initializers, depth + 1))
    return f"const:{node.op_type}({','.join(inputs)}){_attributes(node)}"


def _tensor_signature(tensor: onnx.TensorProto) -> str:
    dims = "x".join(map(str, tensor.dims))
    size = 1
    for d in tensor.dims:
        size *= d
    floating = tensor.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                                    onnx.TensorProto.BFLOAT16)
    if size <= SMALL_CONSTANT and not floating:
        digest = hashlib.sha1(numpy_helper.to_array(tensor).tobytes()).hexdigest()[:12]
        return f"t{tensor.data_type}[{dims}]={digest}"
    return f"t{tensor.data_type}[{dims}]"


def _attributes(node: onnx.NodeProto) -> str:
    parts = []
    for attribute in sorted(node.attribute, key=lambda a: a.name):
        if attribute.type == onnx.AttributeProto.TENSOR:
            parts.append(f"{attribute.name}={_tensor_signature(attribute.t)}")
        elif attribute.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
            parts.append(f"{attribute.name}=<graph>")
        else:
            value = onnx.helper.get_attribute_value(attribute)
            parts.append(f"{attribute.name}={value!r}")
    return "{" + ";".join(parts) + "}" if parts else ""


def _live_nodes(nodes: list[onnx.NodeProto], outputs: set[str]) -> list[onnx.NodeProto]:
    """Nodes that contribute to a graph output, in their order."""
    needed = set(outputs)
    keep = []
    for node in reversed(nodes):
        if any(name in needed for name in node.output):
            keep.append(node)
            needed.update(n for n in node.input if n)
    return keep[::-1]
