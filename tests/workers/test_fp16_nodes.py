"""Named nodes in float16 (workers.search.fp16.to_fp16): the named nodes compute in float16 and the rest of the graph,
its inputs and outputs and the int8 part of a QDQ model, stay as they were; what cannot run in float16 is left."""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from workers.search.fp16 import to_fp16

BATCH_INPUT = (2, 3, 8, 8)


def cnn() -> onnx.ModelProto:
    """x -> conv1 -> relu1 -> conv2 -> relu2 -> flatten -> gemm -> y, conv weights scaled to keep activations near 1."""
    rng = np.random.default_rng(3)

    def weight(name: str, *shape: int) -> onnx.TensorProto:
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        return numpy_helper.from_array((rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Flatten", ["r2"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "wg", "bg"], ["y"], name="gemm", transB=1),
    ]
    inits = [weight("w1", 8, 3, 3, 3), weight("b1", 8), weight("w2", 8, 8, 3, 3), weight("b2", 8),
             weight("wg", 10, 512), weight("bg", 10)]
    graph = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])  # float16 Q/DQ exist (19+)


def feeds(count: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal(BATCH_INPUT).astype(np.float32)} for _ in range(count)]


def run(path, feed) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)[0]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def checked_types(path) -> tuple[onnx.ModelProto, dict[str, int]]:
    """The model, checked strictly (shape inference included), and the element type of every tensor in it."""
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*inferred.input, *inferred.output, *inferred.value_info]}
    types.update({init.name: init.data_type for init in inferred.initializer})
    return model, types


def node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == name)


@pytest.fixture
def float_model(tmp_path):
    path = tmp_path / "cnn.onnx"
    onnx.save(cnn(), str(path))
    return path


def test_named_nodes_compute_in_float16_and_the_rest_stays_float32(float_model, tmp_path):
    out, converted = to_fp16(float_model, ["gemm", "conv2", "relu2"], tmp_path / "fp16.onnx")

    assert out == tmp_path / "fp16.onnx" and converted == ["gemm", "conv2", "relu2"]
    model, types = checked_types(out)
    for name in converted:
        assert all(types[t] == TensorProto.FLOAT16 for t in node(model, name).input), name
        assert all(types[t] == TensorProto.FLOAT16 for t in node(model, name).output), name
    for name in ("conv1", "relu1", "flatten"):
        assert all(types[t] == TensorProto.FLOAT for t in [*node(model, name).input, *node(model, name).output]), name
    assert [(v.name, v.type.tensor_type.elem_type) for v in [*model.graph.input, *model.graph.output]] == [
        ("x", TensorProto.FLOAT), ("y", TensorProto.FLOAT)]
    # conv2 hands relu2 float16 directly; Casts only where float32 meets float16: r1 in, r2 out, flat in, y out.
    assert node(model, "relu2").input[0] == node(model, "conv2").output[0]
    assert Counter(n.op_type for n in model.graph.node)["Cast"] == 4
    assert {init.name: init.data_type for init in model.graph.initializer} == {
        "w1": TensorProto.FLOAT, "b1": TensorProto.FLOAT, "w2": TensorProto.FLOAT16, "b2": TensorProto.FLOAT16,
        "wg": TensorProto.FLOAT16, "bg": TensorProto.FLOAT16}
    for feed in feeds(3):
        expected, got = run(float_model, feed), run(out, feed)
        assert got.dtype == np.float32 and cosine(expected, got) > 0.999


def test_an_initializer_a_float32_node_also_reads_is_copied(tmp_path):
    """Two Convs share one weight: the converted one reads a float16 copy, the other the float32 original."""
    rng = np.random.default_rng(1)
    nodes = [helper.make_node("Conv", ["x", "w"], ["a"], name="left", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["x", "w"], ["b"], name="right", pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["a", "b"], ["y"], name="sum")]
    weight = numpy_helper.from_array((rng.standard_normal((4, 3, 3, 3)) / 5).astype(np.float32), "w")
    graph = helper.make_graph(nodes, "shared", [helper.make_tensor_value_info("x", TensorProto.FLOAT, BATCH_INPUT)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4, 8, 8])], [weight])
    path = tmp_path / "shared.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))

    out, converted = to_fp16(path, ["left"], tmp_path / "fp16.onnx")

    assert converted == ["left"]
    model, types = checked_types(out)
    copy = node(model, "left").input[1]
    assert copy != "w" and types[copy] == TensorProto.FLOAT16 and types["w"] == TensorProto.FLOAT
    assert node(model, "right").input[1] == "w"
    assert np.array_equal(numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == copy)),
                          numpy_helper.to_array(weight).astype(np.float16))
    feed = feeds(1)[0]
    assert cosine(run(path, feed), run(out, feed)) > 0.999


@pytest.fixture
def qdq_model(float_model):
    """ONNX Runtime's static QDQ quantization of the CNN with conv2 left float, as a mixed candidate has it."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter(feeds(4, seed=1))

        def get_next(self):
            return next(self.feeds, None)

    path = float_model.with_name("cnn-qdq.onnx")
    quantize_static(str(float_model), str(path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    nodes_to_exclude=["conv2"])
    return path


def test_the_float_node_of_a_qdq_model_runs_in_float16_and_the_int8_part_is_untouched(qdq_model, tmp_path):
    out, converted = to_fp16(qdq_model, ["conv2"], tmp_path / "mixed-fp16.onnx")

    assert converted == ["conv2"]
    model, types = checked_types(out)
    conv2 = node(model, "conv2")
    assert all(types[t] == TensorProto.FLOAT16 for t in [*conv2.input, *conv2.output])
    # Every QuantizeLinear reads float32 and every DequantizeLinear writes it, so ORT still fuses the int8 kernels.
    for n in model.graph.node:
        if n.op_type == "QuantizeLinear":
            assert types[n.input[0]] == TensorProto.FLOAT, n.name
        if n.op_type == "DequantizeLinear":
            assert types[n.output[0]] == TensorProto.FLOAT, n.name
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    session = ort.InferenceSession(str(out), options, providers=["CPUExecutionProvider"])
    fused = Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)
    assert fused["QLinearConv"] == 1 and fused["QGemm"] == 1, fused
    for feed in feeds(3, seed=2):
        got = session.run(None, feed)[0]
        assert cosine(run(qdq_model, feed), got) > 0.999 and cosine(run(qdq_model.with_name("cnn.onnx"), feed), got) > 0.99


def test_nodes_that_are_not_float32_compute_are_left_as_they_are(qdq_model, tmp_path):
    quantized = onnx.load(str(qdq_model))
    dequantize = next(n.name for n in quantized.graph.node if n.op_type == "DequantizeLinear")
    quantize = next(n.name for n in quantized.graph.node if n.op_type == "QuantizeLinear")

    out, converted = to_fp16(qdq_model, [dequantize, quantize, "conv2"], tmp_path / "fp16.onnx")

    assert converted == ["conv2"]
    model, types = checked_types(out)
    untouched = {n.name: (list(n.input), list(n.output)) for n in quantized.graph.node if n.name in (dequantize, quantize)}
    assert {n.name: (list(n.input), list(n.output)) for n in model.graph.node if n.name in untouched} == untouched
    assert types[node(model, dequantize).output[0]] == types[node(model, quantize).input[0]] == TensorProto.FLOAT


def test_with_a_provider_only_the_ops_it_has_float16_kernels_for_are_converted(tmp_path):
    """ORT's CPU provider has a float16 LayerNormalization but no float16 Gemm: only the first converts."""
    from onnxruntime.capi import _pybind_state

    if any(k.provider == "CPUExecutionProvider" and k.op_name == "Gemm" and k.domain == ""
           and "tensor(float16)" in k.type_constraints.get("T", []) for k in _pybind_state.get_all_opkernel_def()):
        pytest.skip("this onnxruntime build has a float16 Gemm kernel on CPU")
    rng = np.random.default_rng(2)
    nodes = [helper.make_node("LayerNormalization", ["x", "scale", "bias"], ["normed"], name="norm", axis=-1),
             helper.make_node("Gemm", ["normed", "w"], ["y"], name="proj")]
    inits = [numpy_helper.from_array(np.ones(16, np.float32), "scale"),
             numpy_helper.from_array(np.zeros(16, np.float32), "bias"),
             numpy_helper.from_array((rng.standard_normal((16, 4)) / 4).astype(np.float32), "w")]
    graph = helper.make_graph(nodes, "norm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 4])], inits)
    path = tmp_path / "norm.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))

    out, converted = to_fp16(path, ["norm", "proj"], tmp_path / "fp16.onnx", provider="CPUExecutionProvider")

    assert converted == ["norm"]
    model, types = checked_types(out)
    assert types[node(model, "norm").input[0]] == TensorProto.FLOAT16 and types["w"] == TensorProto.FLOAT
    feed = {"x": rng.standard_normal((3, 16)).astype(np.float32)}
    assert cosine(run(path, feed), run(out, feed)) > 0.999
    assert to_fp16(path, ["norm", "proj"], tmp_path / "all.onnx")[1] == ["norm", "proj"]

    with pytest.raises(ValueError, match="registers no kernels for 'NoSuchExecutionProvider'"):
        to_fp16(path, ["norm"], tmp_path / "none.onnx", provider="NoSuchExecutionProvider")


def test_a_name_the_model_does_not_have_is_refused_by_name(float_model, tmp_path):
    with pytest.raises(ValueError, match="no node named 'conv9', 'Conv2'"):
        to_fp16(float_model, ["conv2", "conv9", "Conv2"], tmp_path / "fp16.onnx")
    assert not (tmp_path / "fp16.onnx").exists()
