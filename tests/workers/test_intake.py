"""Normalization on intake (issue 16 item 2): Constant weights folded, old opsets raised, shape inference mended or
skipped, each change checked against the upload's outputs and recorded; the upload stays the measurement's
reference. Unit tests on models built here and on the real models in ../shared/models, then jobs through the API
on a real worker."""
from __future__ import annotations

import io
import shutil
import uuid
from pathlib import Path

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from app.formats.input_shapes import InputShapes
from tests.helpers import SHARED_MODELS, shared_model
from tests.stack import BIN, base_env, free_port, logs, processes, wait_for_job, wait_ready
from workers.intake import ABS_SCALE, MIN_COSINE, compare_output, normalize
from workers.onnx_tools.graph import graphs

RNG = np.random.default_rng(7)


def f32(*shape) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def constant(name: str, array: np.ndarray) -> onnx.NodeProto:
    """A weight held in a Constant node, as onnx's helper and TF exporters write them."""
    return helper.make_node("Constant", [], [name], name=f"const_{name}",
                            value=numpy_helper.from_array(array, f"{name}_value"))


def save(model: onnx.ModelProto, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    onnx.save(model, str(path))
    return path


def run(path_or_model, feeds: dict) -> list[np.ndarray]:
    source = path_or_model.SerializeToString() if isinstance(path_or_model, onnx.ModelProto) else str(path_or_model)
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"]).run(None, feeds)


def constant_weights_model() -> onnx.ModelProto:
    """Conv + MatMul whose weights are Constant nodes, then an If whose branches hold a Constant-weight MatMul each."""
    def branch(tag: str) -> onnx.GraphProto:
        return helper.make_graph(
            [constant(f"{tag}_w", f32(10, 10)), helper.make_node("MatMul", ["y0", f"{tag}_w"], [f"{tag}_out"])],
            tag, [], [helper.make_tensor_value_info(f"{tag}_out", TensorProto.FLOAT, ["N", 10])])

    nodes = [
        constant("w_conv", f32(4, 1, 3, 3)), constant("b_conv", f32(4)),
        helper.make_node("Conv", ["x", "w_conv", "b_conv"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Flatten", ["r"], ["f"], axis=1),
        constant("w_mm", f32(4 * 8 * 8, 10)), constant("b_mm", f32(10)),
        helper.make_node("MatMul", ["f", "w_mm"], ["m"]),
        helper.make_node("Add", ["m", "b_mm"], ["y0"]),
        helper.make_node("If", ["flag"], ["y"], then_branch=branch("then"), else_branch=branch("else")),
    ]
    graph = helper.make_graph(
        nodes, "constant-weights",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8]),
         helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    return model


def constant_nodes(model: onnx.ModelProto) -> int:
    return sum(1 for g in graphs(model.graph) for n in g.node if n.op_type == "Constant")


def int8_weights(path: Path) -> list[str]:
    model = onnx.load(str(path))
    return [t.name for g in graphs(model.graph) for t in g.initializer
            if t.data_type in (TensorProto.INT8, TensorProto.UINT8) and len(t.dims) >= 2]


class Reader:
    """Calibration data for ONNX Runtime's quantize_static."""

    def __init__(self, flag: bool = True):
        self.batches = iter([{"x": f32(1, 1, 8, 8), "flag": np.array(flag)} for _ in range(4)])

    def get_next(self):
        return next(self.batches, None)


# --- Constant weights ----------------------------------------------------------------------------------------------

def test_constant_weights_break_onnx_runtime_quantizers_until_folded(tmp_path):
    from onnxruntime.quantization import QuantFormat, quantize_dynamic, quantize_static

    upload = save(constant_weights_model(), tmp_path / "input")
    # Without the intake, ONNX Runtime's own tools fail on the upload as the issue reports ...
    with pytest.raises(ValueError, match="w_conv to be an initializer"):
        quantize_dynamic(str(upload), str(tmp_path / "dynamic-raw.onnx"))
    # ... and its static quantizer "succeeds" with no weight stored as int8: all four stay float Constants.
    quantize_static(str(upload), str(tmp_path / "static-raw.onnx"), Reader(), quant_format=QuantFormat.QDQ)
    assert int8_weights(tmp_path / "static-raw.onnx") == []
    assert constant_nodes(onnx.load(str(tmp_path / "static-raw.onnx"))) >= 4

    intake = normalize(upload)
    assert intake.normalized and intake.path != upload and intake.path.parent == upload.parent
    normalized = onnx.load(str(intake.path))
    assert constant_nodes(normalized) == 0
    names = [t.name for g in graphs(normalized.graph) for t in g.initializer]
    assert {"w_conv", "b_conv", "w_mm", "b_mm", "then_w", "else_w"} <= set(names)
    assert len(names) == len(set(names))  # each Constant's output name became one initializer, no clash
    folded = next(p for p in intake.record["passes"] if p["pass"] == "constants")
    assert folded == {"pass": "constants", "status": "applied",
                      "action": "folded 6 Constant node(s) into initializers (2 inside If/Loop/Scan subgraphs)"}
    check = intake.record["check"]
    assert check["passed"] is True and check["max_abs_diff"] == 0.0 and check["min_cosine"] == pytest.approx(1.0)
    assert check["inputs"]["x"] == [1, 1, 8, 8] and check["batch"] == 1
    assert intake.note().startswith("intake: folded 6 Constant node(s) into initializers")
    # Both branches compute what the upload computes.
    for flag in (True, False):
        feeds = {"x": f32(3, 1, 8, 8), "flag": np.array(flag)}
        np.testing.assert_array_equal(run(intake.path, feeds)[0], run(upload, feeds)[0])

    # After it, the same tools quantize the weights.
    quantize_dynamic(str(intake.path), str(tmp_path / "dynamic.onnx"))
    assert {"w_conv_quantized", "w_mm_quantized"} <= set(int8_weights(tmp_path / "dynamic.onnx"))
    quantize_static(str(intake.path), str(tmp_path / "static.onnx"), Reader(), quant_format=QuantFormat.QDQ)
    assert len(int8_weights(tmp_path / "static.onnx")) >= 2


def test_small_shape_and_scalar_constants_are_folded_and_graph_output_constants_kept(tmp_path):
    nodes = [
        helper.make_node("Constant", [], ["shape"], value_ints=[-1, 4]),
        helper.make_node("Constant", [], ["scale"], value_float=0.5),
        helper.make_node("Reshape", ["x", "shape"], ["r"]),
        helper.make_node("Mul", ["r", "scale"], ["y"]),
        helper.make_node("Constant", [], ["version"], value=numpy_helper.from_array(np.array([3], np.int64), "v")),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4]),
                               helper.make_tensor_value_info("version", TensorProto.INT64, [1])])
    upload = save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path)
    intake = normalize(upload)
    folded = next(p for p in intake.record["passes"] if p["pass"] == "constants")
    assert folded["action"] == ("folded 2 Constant node(s) into initializers; 1 left as nodes "
                                "(graph outputs or sparse values)")
    normalized = onnx.load(str(intake.path))
    assert [n.output[0] for n in normalized.graph.node if n.op_type == "Constant"] == ["version"]
    feeds = {"x": f32(5, 2, 2)}
    for want, got in zip(run(upload, feeds), run(intake.path, feeds)):
        np.testing.assert_array_equal(want, got)


# --- opsets --------------------------------------------------------------------------------------------------------

def opset9_model() -> onnx.ModelProto:
    """Ops whose form changed between opset 9 and 13 (Unsqueeze/Slice attributes became inputs, Gemm, BN)."""
    inits = [numpy_helper.from_array(a, n) for n, a in [
        ("bn_scale", f32(3)), ("bn_bias", f32(3)), ("bn_mean", f32(3)),
        ("bn_var", RNG.uniform(0.5, 2.0, 3).astype(np.float32)), ("fc_w", f32(6, 3 * 4 * 4)), ("fc_b", f32(6))]]
    nodes = [
        helper.make_node("BatchNormalization", ["x", "bn_scale", "bn_bias", "bn_mean", "bn_var"], ["bn"]),
        helper.make_node("Slice", ["bn"], ["s"], axes=[2, 3], starts=[1, 1], ends=[5, 5]),
        helper.make_node("Flatten", ["s"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["g"], transB=1),
        helper.make_node("Unsqueeze", ["g"], ["y"], axes=[1]),
    ]
    graph = helper.make_graph(nodes, "opset9", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1, 6])], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)], ir_version=4)


def test_opset_9_model_is_raised_to_13_with_equal_outputs(tmp_path):
    upload = save(opset9_model(), tmp_path)
    intake = normalize(upload)
    assert intake.record["opset"] == {"uploaded": 9, "normalized": 13}
    assert intake.record["passes"][0] == {"pass": "opset", "status": "applied", "action": "opset 9 -> 13"}
    normalized = onnx.load(str(intake.path))
    assert [o.version for o in normalized.opset_import if o.domain in ("", "ai.onnx")] == [13]
    ops = {n.op_type: n for n in normalized.graph.node}
    assert len(ops["Unsqueeze"].input) == 2 and len(ops["Slice"].input) >= 3  # the opset-13 forms
    assert constant_nodes(normalized) == 0  # the converter's axes/starts Constants folded too
    feeds = {"x": f32(4, 3, 6, 6)}
    np.testing.assert_allclose(run(intake.path, feeds)[0], run(upload, feeds)[0], rtol=0, atol=1e-5)
    assert intake.note().startswith("intake: opset 9 -> 13;")


def test_conversion_that_changes_outputs_is_dropped_with_its_figures(tmp_path):
    # onnx's converter turns Upsample(linear) into a Resize whose default coordinate mode (half_pixel since
    # opset 11) is not Upsample's (asymmetric): the converted model computes something else.
    scales = numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")
    graph = helper.make_graph([helper.make_node("Upsample", ["x", "scales"], ["y"], mode="linear")], "up",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=[scales])
    upload = save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)], ir_version=4), tmp_path)
    intake = normalize(upload)
    assert intake.path == upload and not intake.normalized
    opset = intake.record["passes"][0]
    assert opset["status"] == "dropped" and opset["action"] == "opset 9 -> 13"
    assert "changed the model's outputs" in opset["reason"] and "output 'y': max abs diff" in opset["reason"]
    assert intake.record["opset"] == {"uploaded": 9, "normalized": 9}
    assert intake.note().startswith("intake: the steps took the upload as it came; opset dropped")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # no candidate left behind


def test_conversion_failure_keeps_the_opset_with_the_reason_and_the_other_passes_still_run(tmp_path):
    # BatchNormalization with spatial=0 (opset 8) has no opset-9+ form: onnx's converter refuses it.
    inits = [numpy_helper.from_array(a, n) for n, a in [
        ("s", f32(3, 4, 4)), ("b", f32(3, 4, 4)), ("m", f32(3, 4, 4)),
        ("v", RNG.uniform(0.5, 2.0, (3, 4, 4)).astype(np.float32))]]
    nodes = [constant("k", f32(1, 3, 4, 4)), helper.make_node("Mul", ["x", "k"], ["xk"]),
             helper.make_node("BatchNormalization", ["xk", "s", "b", "m", "v"], ["y"], spatial=0)]
    graph = helper.make_graph(nodes, "bn8", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4, 4])],
                              initializer=inits)
    upload = save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 8)], ir_version=4), tmp_path)
    intake = normalize(upload)
    opset, constants, _ = intake.record["passes"]
    assert opset["status"] == "failed" and opset["reason"].startswith("kept opset 8:")
    assert "spatial" in opset["reason"]
    assert constants["status"] == "applied" and intake.normalized
    assert intake.record["opset"] == {"uploaded": 8, "normalized": 8}
    feeds = {"x": f32(1, 3, 4, 4)}
    np.testing.assert_array_equal(run(intake.path, feeds)[0], run(upload, feeds)[0])
    assert "opset failed: kept opset 8" in intake.note()


# --- shape inference -----------------------------------------------------------------------------------------------

def stale_value_info_model() -> onnx.ModelProto:
    """A weight whose value_info annotation was not updated when the weight was (ONNX Runtime ignores it; ONNX
    shape inference raises on it, strict or not)."""
    weight = numpy_helper.from_array(f32(3, 5), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])]
    graph = helper.make_graph(nodes, "stale", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])], initializer=[weight],
                              value_info=[helper.make_tensor_value_info("w", TensorProto.FLOAT, [4, 4])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_shape_inference_that_raises_is_mended_with_the_reason(tmp_path):
    model = stale_value_info_model()
    for strict in (True, False):
        with pytest.raises(Exception, match="existing shape differ"):
            onnx.shape_inference.infer_shapes(model, strict_mode=strict)
    upload = save(model, tmp_path)
    intake = normalize(upload)
    shapes = intake.record["passes"][2]
    assert shapes["status"] == "applied" and shapes["action"].startswith("shape inference mended: dropped")
    assert "existing shape differ" in shapes["action"]
    normalized = onnx.load(str(intake.path))
    assert {vi.name: [d.dim_value or d.dim_param for d in vi.type.tensor_type.shape.dim]
            for vi in normalized.graph.value_info} == {"h": ["N", 5]}
    onnx.shape_inference.infer_shapes(normalized, strict_mode=True)  # raises no more
    assert intake.record["check"]["passed"] is True


def test_shape_inference_that_cannot_run_is_skipped_and_the_rest_goes_on(tmp_path, monkeypatch):
    # No small real model makes onnx's shape inference raise with strict mode off and stale annotations dropped
    # (a >2 GiB one does): make it raise to prove the job goes on without it.
    def refuse(*args, **kwargs):
        raise onnx.shape_inference.InferenceError("[ShapeInferenceError] simulated failure")

    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", refuse)
    upload = save(constant_weights_model(), tmp_path)
    intake = normalize(upload)
    shapes = intake.record["passes"][2]
    assert shapes == {"pass": "shape_inference", "status": "failed", "reason": (
        "shape inference skipped: it raises on this model even with strict mode off "
        "(InferenceError: [ShapeInferenceError] simulated failure)")}
    assert intake.normalized and constant_nodes(onnx.load(str(intake.path))) == 0
    assert "shape_inference failed: shape inference skipped" in intake.note()


def test_an_unexpected_failure_leaves_the_upload_to_the_steps_and_nothing_behind(tmp_path, monkeypatch):
    from workers import intake as intake_module

    def broken(self, candidate):
        raise RuntimeError("disk full")

    monkeypatch.setattr(intake_module.OutputCheck, "compare", broken)
    folder = tmp_path / "input"
    upload = save(constant_weights_model(), folder)
    (folder / "intake-model.onnx").write_bytes(b"the user's own file")  # a zip may hold anything
    intake = normalize(upload)
    assert intake.path == upload and intake.record["status"] == "skipped"
    assert intake.record["reason"] == "normalization failed: RuntimeError: disk full"
    assert intake.note() == ("intake: the uploaded model went to the steps as it came "
                             "(normalization failed: RuntimeError: disk full)")
    assert sorted(p.name for p in folder.iterdir()) == ["intake-model.onnx", "model.onnx"]
    assert (folder / "intake-model.onnx").read_bytes() == b"the user's own file"


# --- the check -----------------------------------------------------------------------------------------------------

def concat_model_needing_width() -> onnx.ModelProto:
    """x [N, W] concatenated with a [N, 5] Constant along axis 0: runs only at W = 5."""
    nodes = [constant("pad", f32(2, 5)), helper.make_node("Concat", ["x", "pad"], ["y"], axis=0)]
    graph = helper.make_graph(nodes, "needs-w", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "W"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", "W"])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_model_that_does_not_run_on_synthetic_inputs_is_normalized_unchecked(tmp_path):
    upload = save(concat_model_needing_width(), tmp_path / "a")
    intake = normalize(upload)
    assert intake.normalized
    assert intake.record["check"]["skipped"].startswith("the uploaded model does not run on synthetic inputs")
    assert "outputs not checked" in intake.note()
    # With the job's input shapes, the check runs at the size given.
    upload = save(concat_model_needing_width(), tmp_path / "b")
    intake = normalize(upload, input_shapes=InputShapes.parse({"dims": {"W": 5}}))  # as the job parses it
    check = intake.record["check"]
    assert check["passed"] is True and check["inputs"] == {"x": [1, 5]}


def test_nothing_to_do_is_said_in_one_line_and_leaves_no_file(tmp_path):
    model = onnx.shape_inference.infer_shapes(stale_value_info_model_fixed())
    upload = save(model, tmp_path)
    intake = normalize(upload)
    assert intake.path == upload and intake.record["status"] == "unchanged"
    assert intake.note() == "intake: nothing needed normalizing"
    assert intake.record["check"] == {"skipped": "no pass changed the model"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def stale_value_info_model_fixed() -> onnx.ModelProto:
    model = stale_value_info_model()
    del model.graph.value_info[:]
    return model


def test_output_comparison_follows_the_stated_tolerance():
    y = np.array([[10.0, -3.0, 0.5]], np.float32)
    allowed = ABS_SCALE * (1 + 10.0)
    assert compare_output("y", y, y + allowed * 0.9)["within"]
    assert not compare_output("y", y, y + allowed * 1.5)["within"]
    flipped = compare_output("y", y, -y)
    assert not flipped["within"] and flipped["cosine"] < MIN_COSINE
    ids = np.array([3, 1, 2], np.int64)
    assert compare_output("ids", ids, ids.copy())["within"]
    assert not compare_output("ids", ids, ids[::-1].copy())["within"]
    with_nan = np.array([1.0, np.nan], np.float32)
    assert compare_output("n", with_nan, with_nan.copy())["within"]
    assert not compare_output("n", with_nan, np.array([np.nan, 1.0], np.float32))["within"]
    assert not compare_output("s", y, y[:, :2])["within"]


# --- real models ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("relative,opset,folded", [
    ("mnist-cnn/opt-mnist.onnx", 8, None),
    ("ultraface-rfb320/version-RFB-320.onnx", 9, "folded 73 Constant node(s) into initializers"),
    ("yolox-nano/yolox_nano.onnx", 11, None),
])
def test_real_models_are_normalized_with_equal_outputs(tmp_path, relative, opset, folded):
    upload = tmp_path / "model.onnx"
    shutil.copyfile(shared_model(relative), upload)
    intake = normalize(upload)
    record = intake.record
    assert record["opset"] == {"uploaded": opset, "normalized": 13}
    assert record["check"]["passed"] is True, record["check"]
    constants = next(p for p in record["passes"] if p["pass"] == "constants")
    assert constants.get("action") == folded
    assert constant_nodes(onnx.load(str(intake.path))) == 0
    # Checked here too, on inputs of our own.
    session = ort.InferenceSession(str(upload), providers=["CPUExecutionProvider"])
    spec = session.get_inputs()[0]
    feeds = {spec.name: np.random.default_rng(3).uniform(0, 255, spec.shape).astype(np.float32)}
    for want, got in zip(session.run(None, feeds), run(intake.path, feeds)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * (1 + np.abs(want).max()))


def test_opt_mnist_still_reads_its_seven_after_intake(tmp_path):
    from PIL import Image

    upload = tmp_path / "model.onnx"
    shutil.copyfile(shared_model("mnist-cnn/opt-mnist.onnx"), upload)
    image = Image.open(SHARED_MODELS / "images" / "mnist_7.jpg").convert("L").resize((28, 28))
    feeds = {"Input3": np.asarray(image, np.float32)[None, None]}
    intake = normalize(upload)
    assert int(run(intake.path, feeds)[0].argmax()) == int(run(upload, feeds)[0].argmax()) == 7


# --- through the API on a real worker ------------------------------------------------------------------------------

def frozen_torch_export() -> bytes:
    """A small CNN exported by torch.onnx (TorchScript exporter, do_constant_folding=False) whose weights are plain
    tensors, not parameters, as frozen or scripted models keep them: every weight comes out as a Constant node."""
    import torch

    torch.manual_seed(0)

    class Frozen(torch.nn.Module):
        def __init__(self):
            super().__init__()
            conv, fc = torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.Linear(8 * 8 * 8, 64)
            head = torch.nn.Linear(64, 10)
            self.w = [t.detach().clone() for t in (conv.weight, conv.bias, fc.weight, fc.bias, head.weight, head.bias)]

        def forward(self, x):
            cw, cb, fw, fb, hw, hb = self.w
            x = torch.relu(torch.nn.functional.conv2d(x, cw, cb, padding=1))
            x = torch.relu(x.flatten(1) @ fw.t() + fb)
            return x @ hw.t() + hb

    buf = io.BytesIO()
    torch.onnx.export(Frozen().eval(), (torch.randn(1, 1, 8, 8),), buf, dynamo=False, do_constant_folding=False,
                      input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "N"}, "y": {0: "N"}},
                      opset_version=13)
    return buf.getvalue()


@pytest.mark.integration
def test_constant_weight_model_quantizes_end_to_end_on_a_real_worker(tmp_path):
    exported = frozen_torch_export()
    model = onnx.load_from_string(exported)
    assert len(model.graph.initializer) == 0 and constant_nodes(model) == 6
    with pytest.raises(ValueError, match="to be an initializer"):  # ONNX Runtime's own tool, without the intake
        from onnxruntime.quantization import quantize_dynamic

        (tmp_path / "raw.onnx").write_bytes(exported)
        quantize_dynamic(str(tmp_path / "raw.onnx"), str(tmp_path / "raw-q.onnx"))

    data_dir, port = tmp_path / "mp", free_port()
    with processes([str(BIN / "modelpress"), "run", "--port", str(port)], env=base_env(data_dir),
                   log_dir=tmp_path) as procs:
        base = f"http://127.0.0.1:{port}"
        try:
            wait_ready(base, procs)
            key = (data_dir / "api-key").read_text().strip()
            with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=60) as http:
                check_jobs(http, exported)
                if (SHARED_MODELS / "mnist-cnn" / "opt-mnist.onnx").is_file():
                    check_real_model_job(http)
        except BaseException:
            print(logs(tmp_path))
            raise


def check_jobs(http: httpx.Client, exported: bytes) -> None:
    up = http.post("/v1/models", files={"file": ("frozen.onnx", exported)})
    assert up.status_code == 201, up.text
    evaluate = {"batch_sizes": [1], "warmup": 1, "iterations": 5}
    steps = {"quantize.int8_dynamic": {}, "quantize.int8_static": {"allow_random_calibration": True}}
    jobs = {}
    for method, params in steps.items():
        resp = http.post("/v1/jobs", json={"model_id": up.json()["id"], "evaluate": evaluate,
                                           "steps": [{"method": method, "params": params}]},
                         headers={"Idempotency-Key": str(uuid.uuid4())})
        assert resp.status_code == 202, resp.text
        jobs[method] = resp.json()["id"]
    feeds = {"x": np.random.default_rng(5).standard_normal((4, 1, 8, 8)).astype(np.float32)}
    expected = run(onnx.load_from_string(exported), feeds)[0]
    for method, job_id in jobs.items():
        job = wait_for_job(http, job_id)
        assert job["status"] == "succeeded", (method, job)
        report = http.get(f"/v1/jobs/{job_id}/report").json()
        intake = report["intake"]
        assert intake["status"] == "normalized"
        assert {"pass": "constants", "status": "applied",
                "action": "folded 6 Constant node(s) into initializers"} in intake["passes"]
        assert intake["check"]["passed"] is True and intake["check"]["max_abs_diff"] == 0.0
        assert job["summary"]["notes"][0].startswith("intake: folded 6 Constant node(s) into initializers")
        # The measurement's baseline is the upload itself, not the normalized model.
        assert report["measurement"]["size"]["baseline"]["file_bytes"] == len(exported)
        result = http.get(f"/v1/jobs/{job_id}/artifacts/model.onnx").content
        quantized = onnx.load_from_string(result)
        weights = [t for g in graphs(quantized.graph) for t in g.initializer
                   if t.data_type in (TensorProto.INT8, TensorProto.UINT8) and len(t.dims) >= 2]
        assert len(weights) >= 3, (method, [t.name for t in weights])  # conv, fc and head weights
        assert len(result) < 0.6 * len(exported), (method, len(result), len(exported))
        got = run(quantized, feeds)[0]
        cosine = float(np.dot(got.ravel(), expected.ravel()) / (np.linalg.norm(got) * np.linalg.norm(expected)))
        assert cosine > 0.99, (method, cosine)


def check_real_model_job(http: httpx.Client) -> None:
    """opt-mnist (a CNTK export, opset 8, IR 3) goes to the steps at opset 13; the report says so."""
    upload = (SHARED_MODELS / "mnist-cnn" / "opt-mnist.onnx").read_bytes()
    up = http.post("/v1/models", files={"file": ("opt-mnist.onnx", upload)})
    assert up.status_code == 201, up.text
    resp = http.post("/v1/jobs", json={"model_id": up.json()["id"], "steps": [{"method": "quantize.int8_dynamic"}],
                                       "evaluate": {"batch_sizes": [1], "warmup": 1, "iterations": 5}})
    assert resp.status_code == 202, resp.text
    job = wait_for_job(http, resp.json()["id"])
    assert job["status"] == "succeeded", job
    intake = http.get(f"/v1/jobs/{job['id']}/report").json()["intake"]
    assert intake["opset"] == {"uploaded": 8, "normalized": 13} and intake["check"]["passed"] is True
    assert job["summary"]["notes"][0].startswith("intake: opset 8 -> 13;")
