"""quantize.int8_static, quantize.int4_weight_only and quantize.fp16 on models built here and on the real ones.

Thresholds are the figures measured when these tests were written, with a margin; each test names them.
"""
from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from pydantic import ValidationError

from app.errors import StepFailed
from tests.helpers import SHARED_MODELS, mlp_onnx_bytes, shared_model
from workers import methods
from workers.datasets import Dataset
from workers.quantize import onnx_prep

STATIC, INT4, FP16 = "quantize.int8_static", "quantize.int4_weight_only", "quantize.fp16"


# --- helpers ---------------------------------------------------------------------------------------

def run_method(method_id: str, model: Path, out_dir: Path, calibration: Dataset | None = None, **params):
    method = methods.get(method_id)
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    reports: list[tuple[float, str]] = []
    ctx = methods.StepContext(calibration=calibration, progress=lambda f, m: reports.append((f, m)))
    output = method.run(model, method.params_model.model_validate(params), out_dir, ctx)
    assert output.model_path == out_dir / "model.onnx"
    assert sorted(p.name for p in out_dir.iterdir()) == ["model.onnx"]  # scratch files removed
    assert reports, "the method reports its progress"
    return output


def session(path: Path | str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def compare(original: Path, result: Path, feeds: dict) -> list[float]:
    """Same input and output names, loads, runs: the cosine of each output to the original's."""
    before, after = session(original), session(result)
    assert [i.name for i in after.get_inputs()] == [i.name for i in before.get_inputs()]
    assert [o.name for o in after.get_outputs()] == [o.name for o in before.get_outputs()]
    return [cosine(e, g) for e, g in zip(before.run(None, feeds), after.run(None, feeds))]


def ops(path: Path) -> dict[str, int]:
    return dict(onnx_prep.op_counts(onnx.load(str(path)).graph))


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def synthetic_digits(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """8x8 digit-like images (values 0..16 like scikit-learn's digits): 10 prototypes, shifted, scaled, noisy."""
    prototypes = (np.random.default_rng(1234).random((10, 8, 8)) < 0.35).astype(np.float32)
    prototypes += 0.5 * np.roll(prototypes, 1, axis=1)
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, count)
    shifts = rng.integers(-1, 2, (count, 2))
    images = np.stack([np.roll(np.roll(prototypes[label], dy, 0), dx, 1) for label, (dy, dx) in zip(labels, shifts)])
    images = images * rng.uniform(0.7, 1.3, (count, 1, 1)) + rng.normal(0, 0.35, images.shape)
    return np.clip(images * 8, 0, 16).astype(np.float32)[:, None], labels


@pytest.fixture(scope="module")
def mlp_path(tmp_path_factory) -> Path:
    """64-256-256-10 MLP exported by torch from 2-D input: its Linear layers are Gemm nodes."""
    path = tmp_path_factory.mktemp("mlp") / "mlp.onnx"
    path.write_bytes(mlp_onnx_bytes())
    return path


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> dict:
    """A small CNN (Conv-BN-ReLU, Conv, MaxPool, two Linear) trained for 4 epochs on synthetic digits: 99% top-1."""
    import torch

    train_x, train_y = synthetic_digits(3000, seed=1)
    test_x, test_y = synthetic_digits(500, seed=2)
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2), torch.nn.Flatten(),
        torch.nn.Linear(32 * 16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10),
    )
    optimizer = torch.optim.Adam(net.parameters(), 3e-3)
    inputs, targets = torch.from_numpy(train_x), torch.from_numpy(train_y)
    for _ in range(4):
        order = torch.randperm(len(inputs))
        for start in range(0, len(inputs), 64):
            batch = order[start:start + 64]
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(net(inputs[batch]), targets[batch]).backward()
            optimizer.step()
    net.eval()
    buffer = io.BytesIO()
    torch.onnx.export(net, (inputs[:2],), buffer, dynamo=False, opset_version=17, input_names=["pixels"],
                      output_names=["logits"], dynamic_axes={"pixels": {0: "batch"}, "logits": {0: "batch"}})
    path = tmp_path_factory.mktemp("digits") / "digits.onnx"
    path.write_bytes(buffer.getvalue())
    logits = session(path).run(None, {"pixels": test_x})[0]
    assert (logits.argmax(1) == test_y).mean() > 0.95
    return {"path": path, "test_x": test_x, "test_y": test_y, "logits": logits,
            "calibration": Dataset(inputs={"pixels": train_x[:200]}, labels=train_y[:200], name="digits-train")}


def random_feeds(path: Path, batch: int = 4, scale: float = 1.0, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {i.name: (rng.standard_normal([d if isinstance(d, int) else batch for d in i.shape]) * scale)
            .astype(np.float32) for i in session(path).get_inputs()}


# --- catalog and params ----------------------------------------------------------------------------

def test_catalog_publishes_the_three_methods_with_described_params():
    from app import catalog as method_catalog

    catalog = {entry["id"]: entry for entry in method_catalog.catalog()}
    for method_id in (STATIC, INT4, FP16):
        schema = catalog[method_id]["params_schema"]
        assert catalog[method_id]["description"] and schema["additionalProperties"] is False
        assert all(prop.get("description") for prop in schema["properties"].values()), method_id
    assert methods.get(STATIC).dataset_params == ("calibration_dataset_id",)
    assert methods.get(INT4).dataset_params == ("calibration_dataset_id",)
    assert methods.get(FP16).dataset_params == ()


def test_hardcoded_lists_are_what_onnxruntime_has():
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry
    from onnxruntime.transformers import float16

    from app.catalog.quantize.fp16 import CONVERTER_DEFAULT_BLOCK_LIST
    from app.catalog.quantize.int8_static import ORT_STATIC_OP_TYPES

    assert set(ORT_STATIC_OP_TYPES) == set(QDQRegistry) | set(QLinearOpsRegistry)
    assert set(CONVERTER_DEFAULT_BLOCK_LIST) == set(float16.DEFAULT_OP_BLOCK_LIST)


def test_int8_static_params():
    params = methods.get(STATIC).params_model
    with pytest.raises(ValidationError, match="needs a calibration dataset.*allow_random_calibration"):
        params.model_validate({})
    defaults = params.model_validate({"calibration_dataset_id": "ds_1"}).model_dump()
    assert defaults == {
        "calibration_dataset_id": "ds_1", "allow_random_calibration": False, "calibration_samples": 128,
        "calibrate_method": "minmax", "percentile": 99.999, "per_channel": True, "reduce_range": False,
        "activation_type": "uint8", "weight_type": "int8", "op_types": None, "nodes_to_exclude": [],
    }
    assert params.model_validate({"allow_random_calibration": True}).calibration_dataset_id is None
    with pytest.raises(ValidationError, match="percentile applies only"):
        params.model_validate({"allow_random_calibration": True, "percentile": 99.9})
    assert params.model_validate({"allow_random_calibration": True, "calibrate_method": "percentile",
                                  "percentile": 99.9}).percentile == 99.9
    with pytest.raises(ValidationError, match="int8 activations with uint8 weights"):
        params.model_validate({"allow_random_calibration": True, "activation_type": "int8", "weight_type": "uint8"})
    with pytest.raises(ValidationError, match="'Erf'.*supported op types are"):
        params.model_validate({"allow_random_calibration": True, "op_types": ["Conv", "Erf"]})
    for bad in ({"calibration_samples": 0}, {"calibrate_method": "kl"}, {"calibration_dataset_id": ""}):
        with pytest.raises(ValidationError):
            params.model_validate({"allow_random_calibration": True, **bad})


def test_int4_params():
    params = methods.get(INT4).params_model
    defaults = params.model_validate({})
    assert (defaults.bits, defaults.block_size, defaults.algorithm, defaults.accuracy_level) == (4, 32, "rtn", None)
    assert defaults.is_symmetric() is True
    with pytest.raises(ValidationError, match="'gptq' needs a calibration dataset"):
        params.model_validate({"algorithm": "gptq"})
    gptq = params.model_validate({"algorithm": "gptq", "calibration_dataset_id": "ds_1"})
    assert gptq.is_symmetric() is False  # ORT's symmetric GPTQ lost accuracy (cosine 0.972 vs 0.992)
    with pytest.raises(ValidationError, match="bits=8 is not supported with algorithm 'gptq'.*supports 4 bit"):
        params.model_validate({"algorithm": "gptq", "calibration_dataset_id": "ds_1", "bits": 8})
    with pytest.raises(ValidationError, match="bits=8 is not supported with algorithm 'hqq'.*use algorithm 'rtn'"):
        params.model_validate({"algorithm": "hqq", "bits": 8})
    with pytest.raises(ValidationError, match="used only by algorithm 'gptq'"):
        params.model_validate({"calibration_dataset_id": "ds_1"})
    with pytest.raises(ValidationError, match="hqq quantizes asymmetrically"):
        params.model_validate({"algorithm": "hqq", "symmetric": True})
    for bad in ({"bits": 3}, {"block_size": 48}, {"accuracy_level": 5}, {"algorithm": "awq"}):
        with pytest.raises(ValidationError):
            params.model_validate(bad)


def test_fp16_params():
    params = methods.get(FP16).params_model
    assert params.model_validate({}).model_dump() == {"keep_io_types": True, "op_block_list": None}
    with pytest.raises(ValidationError):
        params.model_validate({"op_block_list": ["Soft max"]})
    with pytest.raises(ValidationError, match="extra"):
        params.model_validate({"min_positive_val": 1e-7})  # clamping stays at the converter's defaults


# --- quantize.int8_static --------------------------------------------------------------------------

def test_int8_static_with_a_calibration_dataset_keeps_the_predictions(digits, tmp_path):
    """Measured: size 0.30, cosine 0.9999 over the 500 test logits, top-1 agreement 100%."""
    output = run_method(STATIC, digits["path"], tmp_path / "out", digits["calibration"],
                        calibration_dataset_id="ds_digits", calibration_samples=150)
    assert output.model_path.stat().st_size < 0.35 * digits["path"].stat().st_size
    feeds = {"pixels": digits["test_x"]}
    assert compare(digits["path"], output.model_path, feeds)[0] > 0.999
    logits = session(output.model_path).run(None, feeds)[0]
    assert (logits.argmax(1) == digits["logits"].argmax(1)).mean() >= 0.98

    details = output.details
    assert details["calibrated_on"] == "dataset digits-train"
    assert details["calibration_samples"] == 150 and details["calibration_batch"] == 1
    assert details["calibrate_method"] == "minmax" and details["warnings"] == []
    quantized = details["quantized_ops"]
    assert quantized["Conv"] == {"before": 2, "after": 2, "quantized": 2}  # BatchNorm folded into the first
    assert quantized["Gemm"] == {"before": 2, "after": 2, "quantized": 2}
    assert quantized["QuantizeLinear"]["after"] == details["activations_quantized"] > 0
    assert details["weights_quantized"] == 4 and details["weights_per_channel"] == 4
    assert details["cpu_integer_ops"]["QLinearConv"] == 2 and details["cpu_integer_ops"]["QGemm"] == 2
    quantized_tensors = [i for i in onnx.load(str(output.model_path)).graph.initializer
                         if i.name.endswith("_quantized")]
    # int8 weights; the biases become int32 (scale = input scale x weight scale)
    assert sorted(t.data_type for t in quantized_tensors) == [TensorProto.INT8] * 4 + [TensorProto.INT32] * 4


def test_int8_static_on_random_data_says_so_and_is_worse(digits, tmp_path):
    """Random standard-normal calibration misses the 0..16 pixel range: measured cosine 0.62, agreement 56%."""
    output = run_method(STATIC, digits["path"], tmp_path / "out", allow_random_calibration=True,
                        calibration_samples=32)
    details = output.details
    assert details["calibrated_on"] == "random data" and details["calibration_samples"] == 32
    assert any("calibrated on random data" in w for w in details["warnings"])
    assert compare(digits["path"], output.model_path, {"pixels": digits["test_x"]})[0] < 0.95


@pytest.mark.parametrize("method, min_cosine", [("entropy", 0.995), ("percentile", 0.999)])
def test_int8_static_histogram_calibration(digits, tmp_path, method, min_cosine):
    """Measured cosine: entropy 0.9985, percentile 0.9999. Histograms are collected in memory-bounded chunks."""
    output = run_method(STATIC, digits["path"], tmp_path / "out", digits["calibration"],
                        calibration_dataset_id="ds_digits", calibrate_method=method, calibration_samples=100)
    assert output.details["calibrate_method"] == method
    assert 1 <= output.details["calibration_chunk_samples"] <= 64
    assert compare(digits["path"], output.model_path, {"pixels": digits["test_x"]})[0] > min_cosine


def test_int8_static_excluded_nodes_and_op_types(mlp_path, tmp_path):
    output = run_method(STATIC, mlp_path, tmp_path / "out", allow_random_calibration=True, calibration_samples=16,
                        op_types=["Gemm"], nodes_to_exclude=["/4/Gemm"])
    assert output.details["quantized_ops"]["Gemm"] == {"before": 3, "after": 3, "quantized": 2}
    assert output.details["weights_quantized"] == 2
    # Measured: 0.9999 on standard-normal inputs like the random calibration's.
    assert compare(mlp_path, output.model_path, random_feeds(mlp_path, batch=16))[0] > 0.999


def test_int8_static_dataset_that_does_not_fit_fails_clearly(digits, tmp_path):
    wrong_name = Dataset(inputs={"image": digits["test_x"][:10]}, name="wrong")
    with pytest.raises(StepFailed, match="no array named 'pixels'.*holds 'image'") as info:
        run_method(STATIC, digits["path"], tmp_path / "a", wrong_name, calibration_dataset_id="ds")
    assert info.value.code == "calibration_failed"
    wrong_shape = Dataset(inputs={"pixels": np.zeros((10, 1, 9, 9), np.float32)}, name="wrong")
    with pytest.raises(StepFailed, match=r"samples of shape \[1, 9, 9\]") as info:
        run_method(STATIC, digits["path"], tmp_path / "b", wrong_shape, calibration_dataset_id="ds")
    assert info.value.code == "calibration_failed"


def test_int8_static_feeds_whole_batches_to_a_fixed_batch_model(tmp_path):
    """A model declared [2, 32] gets 2 samples per calibration run; the odd one out is noted; int64 is cast."""
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "fixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])],
        [numpy_helper.from_array(rng.standard_normal((32, 8)).astype(np.float32), "w")],
    )
    model = save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "fixed.onnx")
    data = Dataset(inputs={"x": rng.integers(-3, 4, (5, 32))}, name="ints")  # int64: cast to the input's float
    output = run_method(STATIC, model, tmp_path / "out", data, calibration_dataset_id="ds")
    assert output.details["calibration_samples"] == 4 and output.details["calibration_batch"] == 2
    assert any("1 sample(s) left out" in note for note in output.details["calibration_notes"])
    assert output.details["quantized_ops"]["MatMul"]["quantized"] == 1


def test_int8_static_nothing_to_quantize(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Exp", ["x"], ["y"], name="exp")], "exp_only",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    model = save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "exp.onnx")
    with pytest.raises(StepFailed, match="nothing to quantize") as info:
        run_method(STATIC, model, tmp_path / "out", allow_random_calibration=True)
    assert info.value.code == "nothing_to_quantize"


def test_int8_static_never_swaps_a_named_dataset_for_random_data(digits, tmp_path):
    with pytest.raises(StepFailed, match="names a calibration dataset but none was loaded") as info:
        run_method(STATIC, digits["path"], tmp_path / "out", None, calibration_dataset_id="ds_gone",
                   allow_random_calibration=True)
    assert info.value.code == "calibration_failed"


def test_int8_static_calibrates_once_per_model_and_data(digits, tmp_path, monkeypatch):
    """A search's mixed-precision ladder quantizes one model again with more nodes left float: the ranges of the
    first calibration serve the others (the same bytes a fresh calibration gives), and other data calibrates anew."""
    from workers.quantize import int8_static

    monkeypatch.setattr(int8_static, "_RANGES", type(int8_static._RANGES)())
    calls = []
    real = int8_static._calibrate
    monkeypatch.setattr(int8_static, "_calibrate", lambda *a, **k: calls.append(1) or real(*a, **k))
    common = dict(calibration_dataset_id="ds_digits", calibration_samples=60)
    first = run_method(STATIC, digits["path"], tmp_path / "a", digits["calibration"], **common)
    node = next(n.name for n in onnx.load(str(first.model_path)).graph.node if n.op_type == "Conv")
    again = run_method(STATIC, digits["path"], tmp_path / "b", digits["calibration"], nodes_to_exclude=[node],
                       **common)
    assert len(calls) == 1 and not first.details["calibration_reused"] and again.details["calibration_reused"]
    assert again.details["quantized_ops"]["Conv"]["quantized"] == first.details["quantized_ops"]["Conv"]["quantized"] - 1

    monkeypatch.setattr(int8_static, "_RANGES", type(int8_static._RANGES)())
    fresh = run_method(STATIC, digits["path"], tmp_path / "c", digits["calibration"], nodes_to_exclude=[node],
                       **common)
    assert fresh.model_path.read_bytes() == again.model_path.read_bytes()

    # Other samples under the same id, another method, or random data: calibrated, not reused.
    other = Dataset(inputs={"pixels": digits["calibration"].inputs["pixels"][::-1].copy()}, name="reversed")
    for data, extra in ((other, {}), (digits["calibration"], {"calibrate_method": "percentile"}),
                        (None, {"allow_random_calibration": True, "calibration_dataset_id": None})):
        output = run_method(STATIC, digits["path"], tmp_path / "d", data, **{**common, **extra})
        assert not output.details["calibration_reused"]
    assert len(calls) == 5


# --- quantize.int4_weight_only ---------------------------------------------------------------------

def test_int4_rewrites_gemm_so_linear_layers_are_quantized(mlp_path, tmp_path):
    """Measured: size 0.17, cosine 0.994 on standard-normal inputs."""
    output = run_method(INT4, mlp_path, tmp_path / "out")
    assert ops(mlp_path)["Gemm"] == 3
    counts = ops(output.model_path)
    assert counts["MatMulNBits"] == 3 and "Gemm" not in counts and "MatMul" not in counts
    assert output.model_path.stat().st_size < 0.2 * mlp_path.stat().st_size
    assert compare(mlp_path, output.model_path, random_feeds(mlp_path, batch=16))[0] > 0.98
    details = output.details
    assert details["gemm_rewritten_as_matmul"] == 3
    assert details["weights_quantized"] == 3 and details["weights_left_float"] == 0
    assert [q["node"] for q in details["quantized"]] == ["/0/Gemm", "/2/Gemm", "/4/Gemm"]
    assert details["quantized"][0]["shape"] == [64, 256]
    assert (details["bits"], details["block_size"], details["symmetric"]) == (4, 32, True)
    assert any("size and memory bandwidth" in w for w in details["warnings"])
    attrs = [{a.name: helper.get_attribute_value(a) for a in n.attribute}
             for n in onnx.load(str(output.model_path)).graph.node if n.op_type == "MatMulNBits"]
    assert {(a["bits"], a["block_size"]) for a in attrs} == {(4, 32)}


def test_int4_counts_the_matrices_it_leaves_and_why(tmp_path):
    rng = np.random.default_rng(0)

    def init(name, *shape):
        return numpy_helper.from_array((rng.standard_normal(shape) / 6).astype(np.float32), name)

    nodes = [
        helper.make_node("MatMul", ["x", "w_40x48"], ["h1"], name="k40"),        # K 40: last block padded
        helper.make_node("MatMul", ["h1", "w_48x16"], ["h2"], name="excluded"),
        helper.make_node("MatMul", ["h1", "w_batched"], ["h3"], name="batched"),  # [2, 48, 8]
        helper.make_node("Transpose", ["h1"], ["h1t"], name="t", perm=[1, 0]),
        helper.make_node("MatMul", ["h1", "h1t"], ["h4"], name="dynamic"),
        helper.make_node("MatMul", ["w_3x5", "x5"], ["h5"], name="constant_left"),
    ]
    graph = helper.make_graph(
        nodes, "mixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 40]),
         helper.make_tensor_value_info("x5", TensorProto.FLOAT, [5, 4])],
        [helper.make_tensor_value_info("h2", TensorProto.FLOAT, [3, 16]),
         helper.make_tensor_value_info("h3", TensorProto.FLOAT, [2, 3, 8]),
         helper.make_tensor_value_info("h4", TensorProto.FLOAT, [3, 3]),
         helper.make_tensor_value_info("h5", TensorProto.FLOAT, [3, 4])],
        [init("w_40x48", 40, 48), init("w_48x16", 48, 16), init("w_batched", 2, 48, 8), init("w_3x5", 3, 5)],
    )
    model = save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "mixed.onnx")
    output = run_method(INT4, model, tmp_path / "out", nodes_to_exclude=["excluded"])
    details = output.details
    assert details["weights_quantized"] == 1 and [q["node"] for q in details["quantized"]] == ["k40"]
    reasons = {entry["node"]: entry["reason"] for entry in details["left_float"]}
    assert details["weights_left_float"] == len(reasons) == 4
    assert reasons["excluded"] == "excluded"
    assert "batch of matrices [2, 48, 8]" in reasons["batched"]
    assert "computed at run time" in reasons["dynamic"]
    assert "left operand" in reasons["constant_left"]
    assert any("K not a multiple of block_size 32" in note for note in details["notes"])
    feeds = {"x": rng.standard_normal((3, 40)).astype(np.float32), "x5": rng.standard_normal((5, 4)).astype(np.float32)}
    cosines = compare(model, output.model_path, feeds)
    assert min(cosines) > 0.98  # measured 0.995 on h2 (through the quantized k40); the others exact or nearly


@pytest.mark.parametrize("algorithm, extra, min_cosine", [
    ("hqq", {"accuracy_level": 4}, 0.98),       # measured 0.995
    ("gptq", {"calibration_dataset_id": "ds"}, 0.98),  # measured 0.992
    ("rtn", {"bits": 8}, 0.9999),                # measured 0.99998
])
def test_int4_algorithms(mlp_path, tmp_path, algorithm, extra, min_cosine):
    calibration = Dataset(inputs={"features": np.random.default_rng(5).standard_normal((48, 64)).astype(np.float32)},
                          name="normal") if algorithm == "gptq" else None
    output = run_method(INT4, mlp_path, tmp_path / "out", calibration, algorithm=algorithm,
                        nodes_to_exclude=["/4/Gemm"], **extra)
    details = output.details
    assert details["algorithm"] == algorithm
    assert details["weights_quantized"] == 2  # ORT's GPTQ ignores nodes_to_exclude; the method makes it listen
    assert details["left_float"] == [{"node": "/4/Gemm", "op_type": "MatMul", "shape": [256, 10], "reason": "excluded"}]
    nodes = [n for n in onnx.load(str(output.model_path)).graph.node if n.op_type == "MatMulNBits"]
    attrs = [{a.name: helper.get_attribute_value(a) for a in n.attribute} for n in nodes]
    assert len(nodes) == 2 and {a["bits"] for a in attrs} == {extra.get("bits", 4)}
    if "accuracy_level" in extra:
        assert {a["accuracy_level"] for a in attrs} == {4}  # HQQ writes none; the method sets it
    assert compare(mlp_path, output.model_path, random_feeds(mlp_path, batch=16))[0] > min_cosine


def test_int4_on_a_model_without_matmul_says_why(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="conv")], "conv_only",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])],
        [numpy_helper.from_array(np.ones((4, 2, 3, 3), np.float32), "w")],
    )
    model = save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "conv.onnx")
    with pytest.raises(StepFailed, match="covers MatMul and Gemm weights, and the graph has none") as info:
        run_method(INT4, model, tmp_path / "out")
    assert info.value.code == "nothing_to_quantize"


# --- quantize.fp16 ---------------------------------------------------------------------------------

def test_fp16_halves_the_size_and_keeps_float32_io(digits, tmp_path):
    """Measured: size 0.51, cosine 1.00000, top-1 agreement 100%."""
    output = run_method(FP16, digits["path"], tmp_path / "out")
    assert output.model_path.stat().st_size < 0.55 * digits["path"].stat().st_size
    feeds = {"pixels": digits["test_x"]}
    assert compare(digits["path"], output.model_path, feeds)[0] > 0.9999
    result = session(output.model_path)
    assert result.get_inputs()[0].type == result.get_outputs()[0].type == "tensor(float)"
    details = output.details
    model = onnx.load(str(digits["path"]))
    floats = sum(1 for i in model.graph.initializer if i.data_type == TensorProto.FLOAT)
    assert details["float32_initializers_before"] == details["initializers_converted"] == floats
    assert details["initializers_kept_float32"] == 0 and details["ops_kept_float32"] == {}
    assert details["casts_inserted"] == 2  # one after the input, one before the output
    assert any("gain is size" in w for w in details["warnings"])


def test_fp16_without_keep_io_types_takes_float16(mlp_path, tmp_path):
    output = run_method(FP16, mlp_path, tmp_path / "out", keep_io_types=False)
    result = session(output.model_path)
    assert result.get_inputs()[0].type == "tensor(float16)" and result.get_outputs()[0].type == "tensor(float16)"
    features = random_feeds(mlp_path, batch=8)["features"]
    got = result.run(None, {"features": features.astype(np.float16)})[0]
    assert cosine(session(mlp_path).run(None, {"features": features})[0], got) > 0.9999
    assert output.details["io_types"] == "float32 inputs and outputs became float16"


def test_fp16_keeps_ops_without_float16_in_float32(tmp_path):
    """Celu (opset 12) and TopK take no float16 / are in the converter's list: they stay float32 and the model runs."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
        helper.make_node("Celu", ["h"], ["c"], name="celu"),
        helper.make_node("TopK", ["c", "k"], ["values", "indices"], name="topk", axis=-1),
    ]
    graph = helper.make_graph(
        nodes, "celu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("values", TensorProto.FLOAT, ["batch", 3]),
         helper.make_tensor_value_info("indices", TensorProto.INT64, ["batch", 3])],
        [numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "w"),
         numpy_helper.from_array(np.array([3], np.int64), "k")],
    )
    model = save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 12)]), tmp_path / "celu.onnx")
    output = run_method(FP16, model, tmp_path / "out")
    details = output.details
    assert details["op_block_list_added"]["no_float16_in_onnx_schema"] == ["Celu"]
    assert details["ops_kept_float32"] == {"Celu": 1, "TopK": 1}
    assert details["initializers_converted"] == 1  # w
    assert compare(model, output.model_path, random_feeds(model))[0] > 0.999


def test_fp16_keeps_what_onnxruntime_refuses_in_float32(mlp_path, tmp_path, monkeypatch):
    """When ORT's CPU provider refuses a node in float16, its op type is kept float32 and the conversion retried."""
    from workers.quantize import fp16 as quantize_fp16

    real = quantize_fp16._load_and_run
    calls = []

    def refuses_relu_once(original, converted, **kwargs):
        calls.append(converted)
        if len(calls) == 1:
            return ("[ONNXRuntimeError] : 9 : NOT_IMPLEMENTED : Could not find an implementation for Relu(14) "
                    "node with name '/1/Relu'"), []
        return real(original, converted, **kwargs)

    monkeypatch.setattr(quantize_fp16, "_load_and_run", refuses_relu_once)
    output = run_method(FP16, mlp_path, tmp_path / "out")
    assert len(calls) == 2
    refused = output.details["op_block_list_added"]["refused_by_onnxruntime_cpu"]
    assert [(r["op_type"], r["node"]) for r in refused] == [("Relu", "/1/Relu")]
    assert output.details["ops_kept_float32"] == {"Relu": 2}
    assert any("refused Relu" in w for w in output.details["warnings"])

    def always_fails(original, converted, **kwargs):
        return "Could not find an implementation for Relu(14) node with name '/1/Relu'", []

    monkeypatch.setattr(quantize_fp16, "_load_and_run", always_fails)
    with pytest.raises(StepFailed, match="does not run on ONNX Runtime's CPU provider") as info:
        run_method(FP16, mlp_path, tmp_path / "out2")
    assert info.value.code == "conversion_failed"


# --- the real pretrained models in ../shared/models ------------------------------------------------

REAL = {
    # relative path: (input scale for random inputs, int4 quantizes any matrix?)
    "mnist-cnn/opt-mnist.onnx": (255.0, True),
    "ultraface-rfb320/version-RFB-320.onnx": (1.0, False),
    "yolox-nano/yolox_nano.onnx": (255.0, False),
}


@pytest.mark.parametrize("relative", list(REAL))
def test_real_models(relative, tmp_path):
    """fp16 (measured cosine >= 0.99999), int8 static on random data, int4 where there is a matrix."""
    path = shared_model(relative)
    scale, has_matrix = REAL[relative]
    feeds = random_feeds(path, batch=1, scale=scale)

    half = run_method(FP16, path, tmp_path / "fp16")
    assert half.model_path.stat().st_size < 0.65 * path.stat().st_size
    assert min(compare(path, half.model_path, feeds)) > 0.9999

    static = run_method(STATIC, path, tmp_path / "int8", allow_random_calibration=True, calibration_samples=4)
    assert static.model_path.stat().st_size < 0.55 * path.stat().st_size
    assert static.details["calibrated_on"] == "random data"
    assert static.details["cpu_integer_ops"].get("QLinearConv", 0) > 0
    outputs = session(static.model_path).run(None, feeds)
    assert all(np.isfinite(o).all() for o in outputs)

    if has_matrix:
        int4 = run_method(INT4, path, tmp_path / "int4")
        assert int4.details["weights_quantized"] == 1 and int4.details["gemm_rewritten_as_matmul"] == 1
        assert min(compare(path, int4.model_path, feeds)) > 0.99  # measured 0.9986
    else:
        with pytest.raises(StepFailed) as info:
            run_method(INT4, path, tmp_path / "int4")
        assert info.value.code == "nothing_to_quantize"


def test_real_mnist_calibrated_on_sevens_still_reads_seven(tmp_path):
    """opt-mnist reads images/mnist_7.jpg as 7; int8 calibrated on shifted copies of it too (cosine 0.99998)."""
    from PIL import Image

    path = shared_model("mnist-cnn/opt-mnist.onnx")
    image = np.asarray(Image.open(SHARED_MODELS / "images" / "mnist_7.jpg").convert("L").resize((28, 28)))
    image = image.astype(np.float32)
    shifted = np.stack([np.roll(np.roll(image, dy, 0), dx, 1)[None] for dy in (-2, 0, 2) for dx in (-2, 0, 2)])
    output = run_method(STATIC, path, tmp_path / "out", Dataset(inputs={"Input3": shifted}, name="sevens"),
                        calibration_dataset_id="ds_sevens")
    assert output.details["calibrated_on"] == "dataset sevens" and output.details["calibration_samples"] == 9
    assert any("Gemm bias" in note for note in output.details["preprocess"])
    feeds = {"Input3": image[None, None]}
    assert compare(path, output.model_path, feeds)[0] > 0.999
    assert int(session(output.model_path).run(None, feeds)[0].argmax()) == 7


def test_real_yolox_calibrated_on_coco_images_keeps_its_detection(tmp_path):
    """YOLOX-nano's top detection on image 139 is tvmonitor (0.92); int8 calibrated on 6 COCO images: 0.93."""
    from PIL import Image

    path = shared_model("yolox-nano/yolox_nano.onnx")

    def load(name: str) -> np.ndarray:  # 416x416, BGR, 0..255, NCHW, as the models README says
        image = Image.open(SHARED_MODELS / "images" / name).convert("RGB").resize((416, 416))
        return np.asarray(image)[:, :, ::-1].transpose(2, 0, 1).astype(np.float32)

    images = [load(name) for name in ("000000000139.jpg", "000000000285.jpg", "000000000632.jpg")]
    calibration = Dataset(inputs={"images": np.stack(images + [i[:, :, ::-1] for i in images])}, name="coco")
    output = run_method(STATIC, path, tmp_path / "out", calibration, calibration_dataset_id="ds_coco")
    raw = session(output.model_path).run(None, {"images": images[0][None]})[0]
    scores = raw[0, :, 4:5] * raw[0, :, 5:]  # objectness x class score
    classes = (SHARED_MODELS / "yolox-nano" / "coco_classes.txt").read_text().split("\n")
    assert classes[int(np.unravel_index(scores.argmax(), scores.shape)[1])].strip() == "tvmonitor"
    assert scores.max() > 0.8



def test_int4_quantizes_embedding_tables(tmp_path):
    import torch

    torch.manual_seed(0)

    class Tagger(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(2000, 64)
            self.head = torch.nn.Linear(64, 64)

        def forward(self, ids):
            return self.head(self.embed(ids))

    path = tmp_path / "tagger.onnx"
    torch.onnx.export(Tagger().eval(), (torch.randint(0, 2000, (2, 16)),), str(path), dynamo=False,
                      opset_version=17, input_names=["ids"], output_names=["out"],
                      dynamic_axes={"ids": {0: "batch", 1: "sequence"}, "out": {0: "batch", 1: "sequence"}})
    feeds = {"ids": np.random.default_rng(0).integers(0, 2000, (4, 16)).astype(np.int64)}
    out = run_method("quantize.int4_weight_only", path, tmp_path / "q")
    assert out.details["embeddings_quantized"] == 1 and out.details["weights_quantized"] == 1
    assert ops(out.model_path)["GatherBlockQuantized"] == 1
    assert out.model_path.stat().st_size < path.stat().st_size / 5  # the 2000x64 table dominates
    assert min(compare(path, out.model_path, feeds)) > 0.98

    kept = run_method("quantize.int4_weight_only", path, tmp_path / "kept", quantize_embeddings=False)
    assert kept.details["embeddings_quantized"] == 0
    assert "1 embedding table(s) stay float (quantize_embeddings is off)" in kept.details["notes"]
    assert kept.model_path.stat().st_size > path.stat().st_size * 0.8


def _reduce_then_matmul(path: Path) -> Path:
    """x -> ReduceMean(axes=[1] as an attribute, opset 13) -> MatMul(64x64): opset 18 moved `axes` to an input."""
    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32), "w")
    nodes = [helper.make_node("ReduceMean", ["x"], ["m"], axes=[1], keepdims=1),
             helper.make_node("Sub", ["x", "m"], ["c"]), helper.make_node("MatMul", ["c", "w"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 64])], [weight])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return path


def test_int4_keeps_the_models_opset_so_older_ops_still_load(tmp_path):
    """ONNX Runtime's quantizer stamps opset 21 on the model without converting its ops; PP-OCRv4's recognizer
    and Magika (ReduceMean/ReduceMax with an `axes` attribute) then failed to load. The result keeps opset 13."""
    out = run_method("quantize.int4_weight_only", _reduce_then_matmul(tmp_path / "m.onnx"), tmp_path / "out")
    result = onnx.load(str(out.model_path))
    assert {o.domain or "": o.version for o in result.opset_import}[""] == 13
    assert any(node.op_type == "MatMulNBits" for node in result.graph.node)
    x = np.random.default_rng(1).standard_normal((2, 64)).astype(np.float32)
    ort.InferenceSession(str(out.model_path), providers=["CPUExecutionProvider"]).run(None, {"x": x})


def test_static_refuses_a_model_that_is_quantized_already(tmp_path):
    dynamic, static = methods.get("quantize.int8_dynamic"), methods.get("quantize.int8_static")
    for folder in ("dyn", "static"):
        (tmp_path / folder).mkdir()
    source = dynamic.run(_reduce_then_matmul(tmp_path / "m.onnx"), dynamic.params_model.model_validate({}),
                         tmp_path / "dyn", methods.StepContext())
    with pytest.raises(StepFailed) as failed:
        static.run(source.model_path, static.params_model.model_validate({"allow_random_calibration": True}),
                   tmp_path / "static", methods.StepContext())
    assert failed.value.code == "already_quantized" and "MatMulInteger" in failed.value.message
