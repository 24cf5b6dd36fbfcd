"""Compression methods: the registry, params validation, onnx_prep, and quantize.int8_dynamic on real models."""
from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from pydantic import ValidationError

from app import catalog as method_catalog
from app.catalog.quantize.int8_dynamic import ORT_DYNAMIC_OP_TYPES, SUPPORTED_OP_TYPES
from app.errors import StepFailed, UnknownMethod
from tests.helpers import ROOT, mlp_onnx_bytes, shared_model
from workers import methods
from workers.quantize import onnx_prep
from workers.quantize.int8_dynamic import CONV_INTEGER_WARNING

INT8 = "quantize.int8_dynamic"


# --- helpers ---------------------------------------------------------------------------------------

def quantize(model: Path, out_dir: Path, **params):
    method = methods.get(INT8)
    out_dir.mkdir(parents=True, exist_ok=True)
    return method.run(model, method.params_model.model_validate(params), out_dir, methods.StepContext())


def session(path: Path | str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def random_feeds(sess: ort.InferenceSession, *, batch: int = 3, scale: float = 1.0, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    feeds = {}
    for i in sess.get_inputs():
        shape = [d if isinstance(d, int) else batch for d in i.shape]
        feeds[i.name] = (rng.standard_normal(shape) * scale).astype(np.float32)
    return feeds


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def ops(path: Path) -> dict[str, int]:
    return dict(onnx_prep.op_counts(onnx.load(str(path)).graph))


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def linear_model(*, opset: int = 17, weight_in_constant: bool = False, seed: int = 0) -> onnx.ModelProto:
    """x[batch, 32] -> MatMul "mm" (W1 32x32) -> Gemm "gemm" (W2 16x32, transB, alpha 0.5, beta 2) -> y[batch, 16]."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((32, 32)).astype(np.float32) / 6
    w2 = rng.standard_normal((16, 32)).astype(np.float32) / 6
    bias = rng.standard_normal(16).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm"),
        helper.make_node("Gemm", ["h", "w2", "b"], ["y"], name="gemm", alpha=0.5, beta=2.0, transB=1),
    ]
    initializers = [numpy_helper.from_array(w2, "w2"), numpy_helper.from_array(bias, "b")]
    if weight_in_constant:
        constant = helper.make_node("Constant", [], ["w1"], name="w1_const", value=numpy_helper.from_array(w1, "w1"))
        nodes.insert(0, constant)
    else:
        initializers.append(numpy_helper.from_array(w1, "w1"))
    graph = helper.make_graph(
        nodes, "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16])],
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


@pytest.fixture(scope="module")
def mlp_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("mlp") / "mlp.onnx"
    path.write_bytes(mlp_onnx_bytes())
    return path


# --- registry and params ---------------------------------------------------------------------------

def test_catalog_lists_each_method_with_its_params_schema():
    catalog = method_catalog.catalog()
    assert [m["id"] for m in catalog] == sorted(m["id"] for m in catalog)
    entry = next(m for m in catalog if m["id"] == INT8)
    assert entry["version"] == 2 and entry["description"]
    schema = entry["params_schema"]
    assert schema["additionalProperties"] is False
    assert set(schema["properties"]) == {"per_channel", "weight_type", "reduce_range", "op_types", "keep_depthwise_conv_float",
                                              "nodes_to_exclude", "fuse_transformer"}
    assert all(prop.get("description") for prop in schema["properties"].values())
    op_enum = schema["properties"]["op_types"]["anyOf"][0]["items"]["enum"]
    assert set(op_enum) == set(SUPPORTED_OP_TYPES)


def test_unknown_method_names_the_known_ones():
    with pytest.raises(UnknownMethod) as info:
        methods.get("quantize.int3_magic")
    assert "quantize.int3_magic" in info.value.message and INT8 in info.value.message
    assert info.value.status == 422 and info.value.code == "unknown_method"


def test_params_defaults_and_validation():
    params_model = methods.get(INT8).params_model
    defaults = params_model.model_validate({})
    assert defaults.model_dump() == {
        "per_channel": True, "weight_type": "auto", "reduce_range": False, "op_types": None, "keep_depthwise_conv_float": True,
        "nodes_to_exclude": [], "fuse_transformer": "auto",
    }
    with pytest.raises(ValidationError, match="extra"):
        params_model.model_validate({"per_chanel": False})
    with pytest.raises(ValidationError, match="'Relu'.*supported op types are"):
        params_model.model_validate({"op_types": ["MatMul", "Relu"]})
    with pytest.raises(ValidationError):
        params_model.model_validate({"op_types": []})  # null means all; an empty list means nothing
    with pytest.raises(ValidationError):
        params_model.model_validate({"nodes_to_exclude": [""]})
    assert params_model.model_validate({"op_types": ["Gemm", "MatMul", "Gemm"]}).op_types == ["Gemm", "MatMul"]


def test_hardcoded_op_types_are_what_onnxruntime_dynamic_quantization_supports():
    from onnxruntime.quantization.registry import IntegerOpsRegistry

    assert set(ORT_DYNAMIC_OP_TYPES) == set(IntegerOpsRegistry)
    # Gemm is accepted because onnx_prep rewrites it as MatMul, which is in the registry.
    assert "Gemm" in SUPPORTED_OP_TYPES and "MatMul" in IntegerOpsRegistry


def test_importing_the_registry_stays_light():
    """The API process imports the catalog (app.catalog) to list methods and validate params; it must not drag
    in the runtimes or any implementation."""
    code = (
        "import sys, app.catalog as m; m.catalog(); "
        "m.get('quantize.int8_dynamic').params_model.model_validate({}); "
        "heavy = [n for n in ('onnx', 'onnxruntime', 'torch', 'numpy', 'workers') if n in sys.modules]; "
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# --- quantize.int8_dynamic on a torch-exported MLP -------------------------------------------------

def test_int8_dynamic_on_mlp_is_smaller_and_faithful(mlp_path, tmp_path):
    before = sha(mlp_path)
    output = quantize(mlp_path, tmp_path / "out")
    assert output.model_path == tmp_path / "out" / "model.onnx"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model.onnx"]  # one file, scratch removed
    assert sha(mlp_path) == before  # the input is never changed
    assert output.model_path.stat().st_size < 0.5 * mlp_path.stat().st_size

    original, quantized = session(mlp_path), session(output.model_path)
    assert [i.name for i in quantized.get_inputs()] == ["features"]
    assert [o.name for o in quantized.get_outputs()] == ["logits"]
    feeds = random_feeds(original, batch=16)
    assert cosine(original.run(None, feeds)[0], quantized.run(None, feeds)[0]) > 0.99

    details = output.details
    assert details["quantized_ops"]["MatMul"] == {"before": 3, "after": 0}  # the Gemms, rewritten by onnx_prep
    assert details["quantized_ops"]["MatMulInteger"] == {"before": 0, "after": 3}
    assert details["quantized_ops"]["DynamicQuantizeLinear"]["after"] == 3
    assert details["weights_quantized"] == 3 and details["weights_per_channel"] == 3
    assert details["weight_type"] == "int8"
    weights = [i for i in onnx.load(str(output.model_path)).graph.initializer if i.name.endswith("_quantized")]
    assert len(weights) == 3 and all(w.data_type == TensorProto.INT8 for w in weights)
    assert any("Gemm" in note and "MatMul" in note for note in details["preprocess"])
    assert details["warnings"] == []


def test_per_channel_off_gives_one_scale_per_weight(mlp_path, tmp_path):
    output = quantize(mlp_path, tmp_path / "out", per_channel=False)
    assert output.details["weights_quantized"] == 3 and output.details["weights_per_channel"] == 0


def test_excluded_node_stays_float(mlp_path, tmp_path):
    output = quantize(mlp_path, tmp_path / "out", nodes_to_exclude=["/4/Gemm"])
    counts = ops(output.model_path)
    assert counts["MatMulInteger"] == 2 and counts["MatMul"] == 1
    assert output.details["weights_quantized"] == 2


def test_excluding_an_unknown_node_fails_naming_real_ones(mlp_path, tmp_path):
    with pytest.raises(StepFailed) as info:
        quantize(mlp_path, tmp_path / "out", nodes_to_exclude=["/4/Gem", "no_such_node"])
    message = info.value.message
    assert info.value.code == "unknown_node"
    assert "'/4/Gem'" in message and "'no_such_node'" in message
    assert "'/0/Gemm'" in message  # examples of real names
    assert "did you mean '/4/Gemm'" in message


def test_nothing_to_quantize_fails_clearly(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"], name="relu")], "relu_only",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    model = save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "relu.onnx")
    with pytest.raises(StepFailed, match="nothing to quantize") as info:
        quantize(model, tmp_path / "out")
    assert info.value.code == "nothing_to_quantize"


# --- onnx_prep -------------------------------------------------------------------------------------

def test_gemm_rewrite_keeps_the_maths(tmp_path):
    """alpha, beta and transB are folded into the MatMul weight and the bias exactly."""
    model = save(linear_model(), tmp_path / "linear.onnx")
    prepared = onnx_prep.prepare(model, tmp_path / "prep")
    assert prepared.gemm_rewritten == ["gemm"]
    counts = ops(prepared.path)
    assert counts.get("Gemm", 0) == 0 and counts["MatMul"] == 2 and counts["Add"] == 1
    feeds = random_feeds(session(model), batch=5)
    np.testing.assert_allclose(session(prepared.path).run(None, feeds)[0], session(model).run(None, feeds)[0],
                               rtol=1e-5, atol=1e-5)


def test_op_types_gemm_alone_leaves_the_models_own_matmul_float(tmp_path):
    model = save(linear_model(), tmp_path / "linear.onnx")
    output = quantize(model, tmp_path / "out", op_types=["Gemm"])
    counts = ops(output.model_path)
    assert counts["MatMulInteger"] == 1 and counts["MatMul"] == 1
    assert output.details["weights_quantized"] == 1


def test_constant_weights_are_folded_so_they_get_quantized(tmp_path, monkeypatch):
    """Weights held in a Constant node; ORT's pre-processing is made to fail so the fold alone must do it."""
    import onnxruntime.quantization.shape_inference as shape_inference

    def broken(*args, **kwargs):
        raise RuntimeError("Incomplete symbolic shape inference")

    monkeypatch.setattr(shape_inference, "quant_pre_process", broken)
    model = save(linear_model(weight_in_constant=True), tmp_path / "const.onnx")
    output = quantize(model, tmp_path / "out", op_types=["MatMul"])
    notes = output.details["preprocess"]
    assert any(note.startswith("folded 1 Constant node") for note in notes)
    assert any(note.startswith("skipped ONNX Runtime's quantization pre-processing") and "Incomplete symbolic" in note
               for note in notes)
    counts = ops(output.model_path)
    assert counts["MatMulInteger"] == 1 and counts["Gemm"] == 1  # mm, whose weight was the Constant; Gemm not asked for
    feeds = random_feeds(session(model), batch=8)
    assert cosine(session(model).run(None, feeds)[0], session(output.model_path).run(None, feeds)[0]) > 0.99


def test_fold_constants_keeps_sparse_and_string_constants():
    sparse = helper.make_sparse_tensor(
        helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0]), helper.make_tensor("i", TensorProto.INT64, [1], [0]), [4],
    )
    graph = helper.make_graph([
        helper.make_node("Constant", [], ["s"], value_strings=["a", "b"]),
        helper.make_node("Constant", [], ["sp"], sparse_value=sparse),
        helper.make_node("Constant", [], ["f"], value_floats=[1.0, 2.0]),
        helper.make_node("Constant", [], ["t"], value=numpy_helper.from_array(np.ones((2, 2), np.float32), "t")),
    ], "consts", [], [helper.make_tensor_value_info("f", TensorProto.FLOAT, [2])])
    folded, kept = onnx_prep.fold_constants(graph)
    # "f" is a graph output, so it stays a node too.
    assert (folded, kept) == (1, 3)
    assert [i.name for i in graph.initializer] == ["t"]
    assert [n.output[0] for n in graph.node] == ["s", "sp", "f"]


def test_pre_process_falls_back_without_symbolic_shape_inference(tmp_path, monkeypatch):
    import onnxruntime.quantization.shape_inference as shape_inference

    real = shape_inference.quant_pre_process
    calls = []

    def symbolic_fails(src, dst, **kwargs):
        calls.append(kwargs)
        if not kwargs.get("skip_symbolic_shape"):
            raise Exception("Incomplete symbolic shape inference")
        return real(src, dst, **kwargs)

    monkeypatch.setattr(shape_inference, "quant_pre_process", symbolic_fails)
    model = save(linear_model(), tmp_path / "linear.onnx")
    prepared = onnx_prep.prepare(model, tmp_path / "prep")
    assert calls == [{}, {"skip_symbolic_shape": True}]
    assert any("without symbolic shape inference" in note and "Incomplete symbolic" in note for note in prepared.notes)


def test_opset_upgrade_and_its_failure_are_noted(tmp_path, monkeypatch):
    model = save(linear_model(opset=11), tmp_path / "old.onnx")
    prepared = onnx_prep.prepare(model, tmp_path / "prep")
    assert "upgraded the default opset from 11 to 13" in " ".join(prepared.notes)
    assert onnx_prep.default_opset(onnx.load(str(prepared.path))) >= 13

    from onnx import version_converter

    def refuse(model, target):
        raise RuntimeError("No Adapter For Gemm")

    monkeypatch.setattr(version_converter, "convert_version", refuse)
    output = quantize(model, tmp_path / "out")
    note = next(n for n in output.details["preprocess"] if n.startswith("kept opset 11"))
    assert "No Adapter For Gemm" in note
    session(output.model_path)  # still a loadable result


# --- the real pretrained models in ../shared/models ------------------------------------------------

SHARED = {
    "mnist-cnn/opt-mnist.onnx": ("upgraded the default opset from 8 to 13", 255.0),
    "ultraface-rfb320/version-RFB-320.onnx": ("initializer(s) from the graph inputs", 1.0),
    "yolox-nano/yolox_nano.onnx": ("upgraded the default opset from 11 to 13", 255.0),
}


@pytest.mark.parametrize("relative", list(SHARED))
def test_int8_dynamic_on_real_models(relative, tmp_path):
    path = shared_model(relative)
    expected_note, scale = SHARED[relative]
    output = quantize(path, tmp_path / "out")
    assert output.model_path.stat().st_size < path.stat().st_size
    assert any(expected_note in note for note in output.details["preprocess"]), output.details["preprocess"]
    assert CONV_INTEGER_WARNING in output.details["warnings"]
    assert output.details["weight_type"] == "uint8" and "feed Conv" in output.details["weight_type_reason"]
    ops, kept = output.details["quantized_ops"], output.details["depthwise_conv_kept_float"]
    assert ops["ConvInteger"]["after"] == ops["Conv"]["before"] - kept
    assert ops["Conv"]["after"] == kept

    original, quantized = session(path), session(output.model_path)
    assert [i.name for i in quantized.get_inputs()] == [i.name for i in original.get_inputs()]
    feeds = random_feeds(original, batch=1, scale=scale)
    expected, got = original.run(None, feeds), quantized.run(None, feeds)
    assert [o.name for o in quantized.get_outputs()] == [o.name for o in original.get_outputs()]
    assert [g.shape for g in got] == [e.shape for e in expected]
    assert all(np.isfinite(g).all() for g in got)


# The smallest valid params of each method; a new method must add its own.
MINIMAL_PARAMS = {
    "quantize.int8_dynamic": {},
    "quantize.int8_static": {"calibration_dataset_id": "d"},
    "quantize.int4_weight_only": {},
    "quantize.fp16": {},
    "quantize.auto": {"eval_dataset_id": "d", "min_cosine": 0.99},
    "prune.channels": {"ratio": 0.5},
    "prune.magnitude": {"sparsity": 0.8},
    "prune.2_4": {},
    "cluster.kmeans": {},
    "distill.kd": {"train_dataset_id": "d"},
}


@pytest.mark.parametrize("method_id", sorted(methods.REGISTRY))
def test_accepted_params_survive_the_round_trip_to_the_worker(method_id):
    # The API stores params with defaults filled in (model_dump); the worker validates them again.
    params_model = methods.get(method_id).params_model
    accepted = params_model.model_validate(MINIMAL_PARAMS[method_id]).model_dump(mode="json")
    assert params_model.model_validate(accepted).model_dump(mode="json") == accepted
