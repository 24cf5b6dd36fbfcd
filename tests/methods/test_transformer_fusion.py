"""quantize.int8_dynamic's transformer fusion: found from the graph alone, checked, refused when in doubt.

The encoder here is hand-written (no transformers): 2 layers, hidden 64, 4 heads, q/k/v Linear,
softmax attention with an additive padding mask, LayerNorm and GELU, exported by the TorchScript
exporter at opset 17, the classic graph most exported BERTs have.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from tests.helpers import digits_classifier
from workers import methods
from workers.quantize import transformer_fusion

DYNAMIC = "quantize.int8_dynamic"
HIDDEN, HEADS, LAYERS, VOCAB, SEQ = 64, 4, 2, 100, 16


def tiny_encoder(path: Path) -> Path:
    import torch
    from torch import nn

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.query, self.key, self.value = (nn.Linear(HIDDEN, HIDDEN) for _ in range(3))
            self.out = nn.Linear(HIDDEN, HIDDEN)
            self.norm1, self.norm2 = nn.LayerNorm(HIDDEN), nn.LayerNorm(HIDDEN)
            self.up, self.down = nn.Linear(HIDDEN, 4 * HIDDEN), nn.Linear(4 * HIDDEN, HIDDEN)

        def split(self, x):
            batch, seq, _ = x.shape
            return x.view(batch, seq, HEADS, HIDDEN // HEADS).transpose(1, 2)

        def forward(self, x, bias):
            q, k, v = self.split(self.query(x)), self.split(self.key(x)), self.split(self.value(x))
            scores = q @ k.transpose(-1, -2) / (HIDDEN // HEADS) ** 0.5 + bias
            context = (scores.softmax(-1) @ v).transpose(1, 2).reshape(x.shape)
            x = self.norm1(x + self.out(context))
            return self.norm2(x + self.down(nn.functional.gelu(self.up(x))))

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(VOCAB, HIDDEN)
            self.norm = nn.LayerNorm(HIDDEN)
            self.layers = nn.ModuleList(Layer() for _ in range(LAYERS))

        def forward(self, input_ids, attention_mask):
            x = self.norm(self.embed(input_ids))
            bias = (1.0 - attention_mask[:, None, None, :].float()) * -10000.0
            for layer in self.layers:
                x = layer(x, bias)
            return x

    torch.manual_seed(0)
    ids = torch.randint(0, VOCAB, (1, SEQ))
    with torch.no_grad():
        torch.onnx.export(Encoder().eval(), (ids, torch.ones_like(ids)), str(path), dynamo=False, opset_version=17,
                          input_names=["input_ids", "attention_mask"], output_names=["hidden"],
                          dynamic_axes={"input_ids": {0: "batch", 1: "sequence"},
                                        "attention_mask": {0: "batch", 1: "sequence"}, "hidden": {0: "batch"}})
    return path


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> Path:
    return tiny_encoder(tmp_path_factory.mktemp("encoder") / "encoder.onnx")


def run_dynamic(model: Path, out_dir: Path, **params):
    method = methods.get(DYNAMIC)
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    output = method.run(model, method.params_model.model_validate(params), out_dir, methods.StepContext())
    assert sorted(p.name for p in out_dir.iterdir()) == ["model.onnx"]  # fusion scratch files removed
    return output


def padded_feeds() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    ids = rng.integers(0, VOCAB, (3, SEQ)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, SEQ // 2:] = 0
    mask[2, SEQ - 3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def outputs(path: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def op_types(path: Path) -> set[str]:
    return {node.op_type for node in onnx.load(str(path)).graph.node}


def test_heads_and_hidden_size_are_read_from_the_graph(encoder):
    shape, reason = transformer_fusion.detect_attention(onnx.load(str(encoder)).graph)
    assert reason == ""
    assert (shape.num_heads, shape.hidden_size, shape.layers) == (HEADS, HIDDEN, LAYERS)


def test_encoder_is_fused_then_quantized_and_stays_close(encoder, tmp_path):
    output = run_dynamic(encoder, tmp_path / "out")
    fusion = output.details["transformer_fusion"]
    assert fusion["applied"] is True, fusion
    assert (fusion["num_heads"], fusion["hidden_size"]) == (HEADS, HIDDEN)
    assert fusion["fused_ops"]["Attention"] == LAYERS
    assert fusion["fused_output_cosine"] >= 0.9999
    assert output.details["quantized_ops"]["QAttention"] == {"before": 0, "after": LAYERS}
    assert "QAttention" in op_types(output.model_path) and "Softmax" not in op_types(output.model_path)
    assert not any("fusion" in w for w in output.details["warnings"])
    feeds = padded_feeds()  # padding: the fused op must apply the mask as the graph did
    assert cosine(outputs(encoder, feeds), outputs(output.model_path, feeds)) >= 0.99


def test_fusion_off_quantizes_the_graph_as_it_is(encoder, tmp_path):
    output = run_dynamic(encoder, tmp_path / "out", fuse_transformer="off")
    assert output.details["transformer_fusion"] == {"applied": False, "reason": "fuse_transformer is off"}
    assert "QAttention" not in op_types(output.model_path)
    assert "MatMulInteger" in op_types(output.model_path)


def test_cnn_is_not_fused(tmp_path):
    onnx_bytes, _, _ = digits_classifier("cnn")
    model = tmp_path / "cnn.onnx"
    model.write_bytes(onnx_bytes)
    output = run_dynamic(model, tmp_path / "out")
    fusion = output.details["transformer_fusion"]
    assert fusion["applied"] is False
    assert "no attention pattern" in fusion["reason"]
    assert not any("fusion" in w for w in output.details["warnings"])


def test_fusion_that_changes_outputs_is_refused(encoder, tmp_path, monkeypatch):
    real = transformer_fusion.output_cosines
    monkeypatch.setattr(transformer_fusion, "output_cosines",
                        lambda original, candidate, **kwargs: {name: 0.98 for name in
                                                               real(original, candidate, **kwargs)})
    output = run_dynamic(encoder, tmp_path / "out")
    fusion = output.details["transformer_fusion"]
    assert fusion["applied"] is False
    assert fusion["fused_output_cosine"] == 0.98
    assert any("transformer fusion skipped" in w and "outputs differ" in w for w in output.details["warnings"])
    assert "QAttention" not in op_types(output.model_path)
    feeds = padded_feeds()
    assert cosine(outputs(encoder, feeds), outputs(output.model_path, feeds)) >= 0.99


def test_fusion_that_would_swallow_an_excluded_node_is_refused(encoder, tmp_path):
    graph = onnx.load(str(encoder)).graph
    query = next(n.name for n in graph.node if n.op_type == "MatMul" and "query" in n.name)
    output = run_dynamic(encoder, tmp_path / "out", nodes_to_exclude=[query])
    fusion = output.details["transformer_fusion"]
    assert fusion["applied"] is False and "excluded node" in fusion["reason"]
    assert "QAttention" not in op_types(output.model_path)
