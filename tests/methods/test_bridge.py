"""The ONNX -> PyTorch -> ONNX bridge: real models convert, train, prune and come back unchanged."""
from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from tests.helpers import digits_classifier
from tests.methods.factories import transformer_onnx
from workers.bridge import (
    Bridged,
    ConversionMismatch,
    UnsupportedOp,
    compare,
    example_feeds,
    to_onnx,
    to_torch,
)
from workers.bridge.check import failures

SHARED_MODELS = Path(__file__).resolve().parents[3] / "shared" / "models"
needs_shared = pytest.mark.skipif(not SHARED_MODELS.is_dir(), reason=f"shared models not found at {SHARED_MODELS}")


def declared(value: onnx.ValueInfoProto) -> list[int | str | None]:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            for d in value.type.tensor_type.shape.dim]


def real_io(model: onnx.ModelProto) -> tuple[list[onnx.ValueInfoProto], list[onnx.ValueInfoProto]]:
    initializers = {t.name for t in model.graph.initializer}
    return [v for v in model.graph.input if v.name not in initializers], list(model.graph.output)


def assert_within_tolerance(check: dict) -> None:
    assert failures(check) == [], check
    assert check["cosine"] >= 0.9999


def assert_round_trip(original: Path, tmp_path: Path, *,
                      sample: dict[str, np.ndarray] | None = None) -> tuple[Bridged, Path]:
    """to_torch, to_onnx, and the exported file against the original: names, dynamic axes, outputs."""
    bridged = to_torch(original, sample=sample)
    assert_within_tolerance(bridged.check)
    assert set(bridged.check["outputs"]) == set(bridged.output_names)

    dst = tmp_path / "exported" / "model.onnx"
    details = to_onnx(bridged.module, bridged, dst)
    assert_within_tolerance(details["check"])
    assert [p.name for p in dst.parent.iterdir()] == ["model.onnx"]     # one file, no external data
    exported = onnx.load(str(dst))
    assert all(t.data_location != TensorProto.EXTERNAL for t in exported.graph.initializer)
    assert details["opset"] == next(e.version for e in exported.opset_import if e.domain in ("", "ai.onnx"))

    source = onnx.load(str(original))
    (src_in, src_out), (dst_in, dst_out) = real_io(source), real_io(exported)
    assert [v.name for v in dst_in] == [v.name for v in src_in] == bridged.input_names
    assert [v.name for v in dst_out] == [v.name for v in src_out] == bridged.output_names
    for before, after in zip(src_in + src_out, dst_in + dst_out):
        for old, new in zip(declared(before), declared(after), strict=True):
            if isinstance(old, int):
                assert new == old, (before.name, declared(before), declared(after))
            else:
                assert not isinstance(new, int), (before.name, declared(before), declared(after))
                if old:
                    assert new == old

    against_original = compare(original, dst, example_feeds(bridged, batch=3, seed=5))
    assert_within_tolerance(against_original)
    return bridged, dst


# --- the shared real models ------------------------------------------------------------------------

@needs_shared
@pytest.mark.parametrize("relative, rewrite", [
    ("mnist-cnn/opt-mnist.onnx", "auto_pad=SAME_UPPER rewritten to explicit pads"),
    ("ultraface-rfb320/version-RFB-320.onnx", "Slice-1 nodes rewritten to Slice-10"),
    ("yolox-nano/yolox_nano.onnx", None),
])
def test_shared_model_round_trip(relative: str, rewrite: str | None, tmp_path: Path) -> None:
    original = SHARED_MODELS / relative
    digest = hashlib.sha256(original.read_bytes()).hexdigest()
    bridged, _ = assert_round_trip(original, tmp_path)
    assert bridged.check["inputs"] == "generated"
    if rewrite:
        assert any(note.startswith(rewrite) for note in bridged.notes), bridged.notes
    else:
        assert not any("rewritten" in note for note in bridged.notes), bridged.notes
    assert any(isinstance(m, torch.nn.Conv2d) and m.weight.requires_grad for m in bridged.module.modules())
    assert hashlib.sha256(original.read_bytes()).hexdigest() == digest    # the upload is never modified


@needs_shared
def test_opt_mnist_reads_a_handwritten_seven(tmp_path: Path) -> None:
    from PIL import Image

    image = Image.open(SHARED_MODELS / "images" / "mnist_7.jpg").convert("L").resize((28, 28))
    pixels = np.asarray(image, dtype=np.float32).reshape(1, 1, 28, 28)
    bridged, exported = assert_round_trip(SHARED_MODELS / "mnist-cnn" / "opt-mnist.onnx", tmp_path)
    with torch.no_grad():
        logits = bridged.module(torch.from_numpy(pixels))
    assert int(logits.argmax()) == 7
    import onnxruntime as ort

    back = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"]).run(None, {"Input3": pixels})[0]
    assert int(back.argmax()) == 7


@needs_shared
def test_yolox_finds_the_tv_on_real_images() -> None:
    from PIL import Image

    images = []
    for name in ("000000000139.jpg", "000000000285.jpg"):
        rgb = Image.open(SHARED_MODELS / "images" / name).convert("RGB").resize((416, 416))
        images.append(np.asarray(rgb, dtype=np.float32)[..., ::-1].transpose(2, 0, 1))   # BGR, NCHW, 0..255
    batch = np.ascontiguousarray(np.stack(images))
    bridged = to_torch(SHARED_MODELS / "yolox-nano" / "yolox_nano.onnx", sample={"images": batch})
    assert bridged.check["inputs"] == "dataset" and bridged.check["samples"] == 2   # fixed batch 1: two runs
    assert_within_tolerance(bridged.check)
    with torch.no_grad():
        detections = bridged.module(torch.from_numpy(batch[:1])).numpy()[0]
    scores = detections[:, 4:5] * detections[:, 5:]                      # objectness x class score
    classes = (SHARED_MODELS / "yolox-nano" / "coco_classes.txt").read_text().split("\n")
    assert classes[int(np.unravel_index(scores.argmax(), scores.shape)[1])] == "tvmonitor"
    assert scores.max() == pytest.approx(0.92, abs=0.02)


# --- models exported from torch here -------------------------------------------------------------------


def assert_trainable(bridged: Bridged, feeds: dict[str, np.ndarray], layer: type[torch.nn.Module]) -> None:
    module = bridged.module
    assert not module.training
    layers = [m for m in module.modules() if isinstance(m, layer)]
    assert layers and all(p.requires_grad for m in layers for p in m.parameters())
    assert all(p.requires_grad and p.dtype == torch.float32 for p in module.parameters())
    args = [torch.from_numpy(feeds[n]) for n in bridged.input_names]
    with torch.no_grad():
        before = module(*args).clone()
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    module(*args).square().mean().backward()
    optimizer.step()
    with torch.no_grad():
        after = module(*args)
    assert not torch.allclose(before, after)


@pytest.mark.parametrize("kind, layer", [("mlp", torch.nn.Linear), ("cnn", torch.nn.Conv2d)])
def test_digits_classifier_round_trip_and_training(kind: str, layer: type[torch.nn.Module], tmp_path: Path) -> None:
    model_bytes, inputs, labels = digits_classifier(kind)
    original = tmp_path / f"{kind}.onnx"
    original.write_bytes(model_bytes)
    name = "features" if kind == "mlp" else "images"
    bridged, _ = assert_round_trip(original, tmp_path, sample={name: inputs})
    assert bridged.check["inputs"] == "dataset" and bridged.check["samples"] == 8
    assert bridged.input_shapes == {name: ["batch", *inputs.shape[1:]]}

    with torch.no_grad():
        predicted = bridged.module(torch.from_numpy(inputs)).argmax(1).numpy()
    assert (predicted == labels).mean() > 0.9          # still the trained classifier
    assert_trainable(bridged, {name: inputs[:16]}, layer)


def test_transformer_encoder_round_trip_and_training(tmp_path: Path) -> None:
    original = tmp_path / "encoder.onnx"
    original.write_bytes(transformer_onnx())
    bridged, _ = assert_round_trip(original, tmp_path)
    assert bridged.input_shapes == {"input_ids": ["batch", "sequence"]}
    assert bridged.vocabularies == {"input_ids": 50}
    feeds = example_feeds(bridged, batch=2)
    assert feeds["input_ids"].dtype == np.int64 and feeds["input_ids"].max() < 50

    # Every Linear of the source (qkv, out, 2 x feed-forward per layer, and the head) is an nn.Linear again,
    # and every LayerNorm an nn.LayerNorm: Torch-Pruning and the optimizers see them.
    modules = list(bridged.module.modules())
    assert sum(isinstance(m, torch.nn.Linear) for m in modules) == 9
    assert sum(isinstance(m, torch.nn.LayerNorm) for m in modules) == 4
    assert not [name for name, b in bridged.module.named_buffers() if b.is_floating_point() and b.dim() == 2]
    assert_trainable(bridged, feeds, torch.nn.Linear)


def test_pruned_cnn_exports_at_its_new_width(tmp_path: Path) -> None:
    import torch_pruning as tp

    model_bytes, inputs, _ = digits_classifier("cnn")
    original = tmp_path / "cnn.onnx"
    original.write_bytes(model_bytes)
    bridged = to_torch(original)
    module = bridged.module
    first = next(m for m in module.modules() if isinstance(m, torch.nn.Conv2d))
    graph = tp.DependencyGraph().build_dependency(module, example_inputs=torch.from_numpy(inputs[:2]))
    graph.get_pruning_group(first, tp.prune_conv_out_channels, idxs=list(range(0, 16, 2))).prune()
    assert first.out_channels == 8

    dst = tmp_path / "pruned.onnx"
    details = to_onnx(module, bridged, dst, sample={"images": inputs})
    assert details["check"]["inputs"] == "dataset"
    assert_within_tolerance(details["check"])
    weights = {tuple(t.dims) for t in onnx.load(str(dst)).graph.initializer}
    assert (8, 1, 3, 3) in weights and (32, 8, 3, 3) in weights and (16, 1, 3, 3) not in weights

    import onnxruntime as ort

    exported = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"]).run(None, {"images": inputs})[0]
    with torch.no_grad():
        expected = module(torch.from_numpy(inputs)).numpy()
    np.testing.assert_allclose(exported, expected, atol=1e-4)


# --- what the bridge refuses ------------------------------------------------------------------------------

def single_op_model(tmp_path: Path, node: onnx.NodeProto, *, opset: int = 13, extra_opsets=(),
                    inputs=None, outputs=None, initializers=()) -> Path:
    inputs = inputs or [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])]
    outputs = outputs or [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    graph = helper.make_graph([node], "single", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), *extra_opsets])
    model.ir_version = 8
    path = tmp_path / f"{node.op_type}.onnx"
    onnx.save(model, str(path))
    return path


def test_custom_and_missing_ops_are_named(tmp_path: Path) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu_1"),
             helper.make_node("Mystery", ["r"], ["m"], name="mystery_1", domain="com.example"),
             helper.make_node("Hardmax", ["m"], ["y"], name="hardmax_1")]
    graph = helper.make_graph(nodes, "g", [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("com.example", 1)])
    path = tmp_path / "mystery.onnx"
    onnx.save(model, str(path))
    with pytest.raises(UnsupportedOp) as raised:
        to_torch(path)
    assert raised.value.code == "unsupported_op"
    message = raised.value.message
    assert "op 'Mystery' (com.example opset 1) at node 'mystery_1'" in message
    assert "op 'Hardmax' (ai.onnx opset 13) at node 'hardmax_1'" in message
    assert "Relu" not in message


def test_unsupported_attribute_combination_names_the_node(tmp_path: Path) -> None:
    # onnx2torch's MaxPool converter raises NotImplementedError for column-major storage.
    node = helper.make_node("MaxPool", ["x"], ["y"], name="pool_colmajor", kernel_shape=[2, 2], storage_order=1)
    path = single_op_model(tmp_path, node, inputs=[helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])])
    with pytest.raises(UnsupportedOp, match="'MaxPool' at node 'pool_colmajor'"):
        to_torch(path)


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None, reason="torchvision is installed")
def test_non_max_suppression_is_unsupported_without_torchvision(tmp_path: Path) -> None:
    node = helper.make_node("NonMaxSuppression", ["boxes", "scores"], ["y"], name="nms_1")
    path = single_op_model(
        tmp_path, node, opset=11,
        inputs=[helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [1, 5, 4]),
                helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 1, 5])],
        outputs=[helper.make_tensor_value_info("y", TensorProto.INT64, None)])
    with pytest.raises(UnsupportedOp) as raised:
        to_torch(path)
    assert "op 'NonMaxSuppression' (ai.onnx opset 11) at node 'nms_1' cannot be converted" in raised.value.message


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None, reason="torchvision is installed")
def test_torchvision_stub_does_not_leak(tmp_path: Path) -> None:
    model_bytes, _, _ = digits_classifier("mlp")
    path = tmp_path / "mlp.onnx"
    path.write_bytes(model_bytes)
    to_torch(path)
    assert "torchvision" not in sys.modules and "torchvision.ops" not in sys.modules
    assert importlib.util.find_spec("torchvision") is None


def test_upsample_becomes_resize(tmp_path: Path) -> None:
    scales = helper.make_tensor("scales", TensorProto.FLOAT, [4], [1, 1, 2, 2])
    node = helper.make_node("Upsample", ["x", "scales"], ["y"], name="up", mode="nearest")
    path = single_op_model(tmp_path, node, opset=9, initializers=[scales],
                           inputs=[helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2, 3, 3])])
    bridged = to_torch(path)
    assert any(note.startswith("Upsample nodes rewritten to Resize") for note in bridged.notes)
    assert bridged.check["max_abs_diff"] == 0.0
    details = to_onnx(bridged.module, bridged, tmp_path / "back.onnx")
    assert details["opset"] == 13 and details["dynamic_axes"]["x"] == {"0": "batch"}


def test_a_conversion_that_changes_outputs_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import workers.bridge as bridge

    trainable = bridge.make_trainable

    def damaging(module: torch.nn.Module) -> list[str]:
        notes = trainable(module)
        with torch.no_grad():
            next(module.parameters()).mul_(1.05)
        return notes

    monkeypatch.setattr(bridge, "make_trainable", damaging)
    model_bytes, inputs, _ = digits_classifier("mlp")
    path = tmp_path / "mlp.onnx"
    path.write_bytes(model_bytes)
    with pytest.raises(ConversionMismatch, match="output 'logits'") as raised:
        to_torch(path, sample={"features": inputs})
    assert raised.value.code == "conversion_mismatch"
    assert raised.value.extra["check"]["outputs"]["logits"]["max_abs_diff"] > 1e-3
