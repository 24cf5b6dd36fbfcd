"""Small ONNX models built with onnx.helper for the measuring tests."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def save(model: onnx.ModelProto, path: Path, **kwargs) -> Path:
    onnx.checker.check_model(model)
    onnx.save_model(model, str(path), **kwargs)
    return path


def opset_model(graph: onnx.GraphProto) -> onnx.ModelProto:
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def linear_model(*, batch: int | str = "batch", seed: int = 0, input_name: str = "x", width: int = 32,
                 reshape_to: list[int] | None = None) -> onnx.ModelProto:
    """x [batch, width] -> scores [batch, 10]; reshape_to hard-codes a Reshape of x first."""
    rng = np.random.default_rng(seed)
    weight = numpy_helper.from_array(rng.standard_normal((width, 10)).astype(np.float32), "weight")
    nodes, initializers, source = [], [weight], input_name
    if reshape_to is not None:
        initializers.append(numpy_helper.from_array(np.array(reshape_to, dtype=np.int64), "fixed_shape"))
        nodes.append(helper.make_node("Reshape", [input_name, "fixed_shape"], ["reshaped"]))
        source = "reshaped"
    nodes.append(helper.make_node("MatMul", [source, "weight"], ["scores"]))
    graph = helper.make_graph(
        nodes, "linear",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [batch, width])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [batch if reshape_to is None else None, 10])],
        initializer=initializers,
    )
    return opset_model(graph)
