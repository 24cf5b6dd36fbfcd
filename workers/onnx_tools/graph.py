"""Walking an ONNX graph: every subgraph inside it, and what its stored tensors weigh on disk."""
from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def graphs(graph) -> Iterator[Any]:
    """A graph and every subgraph (If/Loop/Scan bodies) inside it."""
    import onnx

    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from graphs(sub)


def _bits_per_element(data_type: int) -> float:
    import onnx

    four_bit = {getattr(onnx.TensorProto, n) for n in ("INT4", "UINT4", "FLOAT4E2M1") if hasattr(onnx.TensorProto, n)}
    two_bit = {getattr(onnx.TensorProto, n) for n in ("INT2", "UINT2") if hasattr(onnx.TensorProto, n)}
    if data_type in four_bit:
        return 4
    if data_type in two_bit:
        return 2
    try:
        return onnx.helper.tensor_dtype_to_np_dtype(data_type).itemsize * 8
    except Exception:  # strings and types numpy cannot name: no fixed width
        return 0


def model_size(path: Path, model) -> dict[str, Any]:
    """file_bytes counts the .onnx file plus each external-data file it references (once each).

    parameters is the element count of every initializer (subgraphs included; non-zeros
    of sparse ones); for a quantized model that includes scales and zero points. initializer_bytes is that
    count times each element's nominal width.
    """
    import onnx

    parameters, initializer_bytes = 0, 0.0
    external: set[Path] = set()
    for graph in graphs(model.graph):
        # A sparse initializer stores its non-zero values (the parameters) and their indices (bytes only).
        stored = [(t, True) for t in graph.initializer]
        for sparse in graph.sparse_initializer:
            stored += [(sparse.values, True), (sparse.indices, False)]
        for tensor, is_parameter in stored:
            count = math.prod(tensor.dims)
            parameters += count if is_parameter else 0
            initializer_bytes += count * _bits_per_element(tensor.data_type) / 8
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                location = next((e.value for e in tensor.external_data if e.key == "location"), None)
                if location:
                    external.add((path.parent / location).resolve())
    file_bytes = path.stat().st_size + sum(p.stat().st_size for p in external if p.is_file())
    return {
        "file_bytes": file_bytes,
        "external_data_files": len(external),
        "parameters": parameters,
        "initializer_bytes": int(round(initializer_bytes)),
    }
