"""Parameters and multiply-accumulates of an ONNX model, counted from its graph.

Params: elements of the weights (float, int8/uint8/int4 initializers and Constant tensors with
more than one element: quantized weights count once, their scales too), zeros included, with
the zero count beside them. MACs: Conv, ConvTranspose,
Gemm and MatMul at one batch size, from ONNX shape inference; other ops are cheap next
to them and are not counted (as fvcore and thop do). A model whose shapes cannot be
inferred gets `macs: None` with the reason.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

FLOAT_TYPES = {1, 10, 11, 16}  # FLOAT, FLOAT16, DOUBLE, BFLOAT16
# Quantized weights, and the uint8 indices of clustered ones: INT8, UINT8, UINT4, INT4. (INT64/INT32
# initializers are shapes and indices of the graph itself, not parameters.)
WEIGHT_TYPES = FLOAT_TYPES | {2, 3, 21, 22}
MAC_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def count(path: Path, *, batch: int = 1) -> dict[str, Any]:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    params = zeros = 0
    tensors = list(graph.initializer) + [
        attr.t for node in graph.node if node.op_type == "Constant" for attr in node.attribute if attr.name == "value"
    ]
    for tensor in tensors:
        if tensor.data_type in WEIGHT_TYPES and int(np.prod(tensor.dims, dtype=np.int64)) > 1:
            values = numpy_helper.to_array(tensor)
            params += values.size
            zeros += int(values.size - np.count_nonzero(values))
    macs, reason = _macs(model, batch)
    return {"params": int(params), "zero_params": zeros, "macs": macs, "macs_batch": batch,
            **({"macs_reason": reason} if reason else {})}


def _macs(model, batch: int) -> tuple[int | None, str | None]:
    import onnx

    model = onnx.ModelProto.FromString(model.SerializeToString())
    initializers = {t.name for t in model.graph.initializer}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        dims = value.type.tensor_type.shape.dim
        for axis, dim in enumerate(dims):
            if dim.HasField("dim_value") and dim.dim_value > 0:
                continue
            if axis != 0:
                return None, f"input '{value.name}' axis {axis} has no fixed size"
            dim.Clear()
            dim.dim_value = batch
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception as exc:
        return None, f"ONNX shape inference failed: {exc}"
    shapes: dict[str, list[int]] = {}
    for value in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        dims = value.type.tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            shapes[value.name] = [d.dim_value for d in dims]
    for tensor in inferred.graph.initializer:
        shapes[tensor.name] = list(tensor.dims)
    wanted = {name for node in inferred.graph.node if node.op_type in MAC_OPS
              for name in (node.input[0], node.output[0])}
    if wanted - shapes.keys():
        try:
            shapes.update(_run_for_shapes(model, sorted(wanted - shapes.keys())))
        except Exception as exc:
            return None, f"shapes not inferable and the model did not run on zeros: {exc}"
    total = 0
    for node in inferred.graph.node:
        if node.op_type not in MAC_OPS:
            continue
        out = shapes.get(node.output[0])
        weight = shapes.get(node.input[1]) if len(node.input) > 1 else None
        if out is None or weight is None:
            return None, f"no inferred shape at node '{node.name or node.op_type}'"
        if node.op_type == "Conv":
            # every output element sums over (Cin / groups) x kernel
            total += int(np.prod(out, dtype=np.int64)) * int(np.prod(weight[1:], dtype=np.int64))
        elif node.op_type == "ConvTranspose":
            source = shapes.get(node.input[0])
            if source is None:
                return None, f"no inferred shape at node '{node.name or node.op_type}'"
            total += int(np.prod(source, dtype=np.int64)) * int(np.prod(weight[1:], dtype=np.int64))
        elif node.op_type == "Gemm":
            trans_a = next((a.i for a in node.attribute if a.name == "transA"), 0)
            source = shapes.get(node.input[0])
            if source is None:
                return None, f"no inferred shape at node '{node.name or node.op_type}'"
            inner = source[0] if trans_a else source[-1]
            total += int(np.prod(out, dtype=np.int64)) * inner
        else:  # MatMul: out elements x shared dimension
            source = shapes.get(node.input[0])
            if source is None:
                return None, f"no inferred shape at node '{node.name or node.op_type}'"
            total += int(np.prod(out, dtype=np.int64)) * source[-1]
    return int(total), None


def _run_for_shapes(model, names: list[str]) -> dict[str, list[int]]:
    """Shapes ONNX inference could not give, read off one run on zeros (the inputs' dims are fixed by now)."""
    import onnx
    import onnxruntime as ort

    probe = onnx.ModelProto.FromString(model.SerializeToString())
    present = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in present)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every tensor
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    initializers = {t.name for t in probe.graph.initializer}
    feeds = {}
    for value in session.get_inputs():
        if value.name in initializers:
            continue
        dtype = np.float32 if "float" in value.type else np.int64
        feeds[value.name] = np.zeros([d if isinstance(d, int) else 1 for d in value.shape], dtype=dtype)
    outputs = session.run(names, feeds)
    return {name: list(array.shape) for name, array in zip(names, outputs)}
