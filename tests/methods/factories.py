"""Models and job helpers the method tests share: a transformer encoder exported here, and jobs run
in process on the worker's pipeline (submit, run, download)."""
from __future__ import annotations

import io

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from workers.supervise import run_job

FAST = {"batch_sizes": [1], "warmup": 1, "iterations": 4}


class EncoderLayer(torch.nn.Module):
    """A post-norm transformer encoder layer written out: nn.TransformerEncoderLayer's TorchScript
    export bakes the traced sequence length into its Reshapes, so its ONNX fails on any other."""

    def __init__(self, width: int = 64, heads: int = 4, hidden: int = 128) -> None:
        super().__init__()
        self.heads = heads
        self.qkv, self.out = torch.nn.Linear(width, 3 * width), torch.nn.Linear(width, width)
        self.norm1, self.norm2 = torch.nn.LayerNorm(width), torch.nn.LayerNorm(width)
        self.ff = torch.nn.Sequential(torch.nn.Linear(width, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(x).reshape(batch, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        attention = torch.softmax(q @ k.transpose(-2, -1) / (width // self.heads) ** 0.5, dim=-1)
        x = self.norm1(x + self.out((attention @ v).transpose(1, 2).reshape(batch, length, width)))
        return self.norm2(x + self.ff(x))


def transformer_onnx(vocabulary: int = 50) -> bytes:
    """Embedding + 2 encoder layers + mean-pooled Linear head; input_ids [batch, sequence] int64."""
    torch.manual_seed(0)

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(vocabulary, 64)
            self.layers = torch.nn.Sequential(EncoderLayer(), EncoderLayer())
            self.head = torch.nn.Linear(64, 3)

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return self.head(self.layers(self.embed(input_ids)).mean(dim=1))

    buffer = io.BytesIO()
    torch.onnx.export(Encoder().eval(), (torch.randint(0, vocabulary, (2, 7)),), buffer, dynamo=False,
                      opset_version=17, input_names=["input_ids"], output_names=["logits"],
                      dynamic_axes={"input_ids": {0: "batch", 1: "sequence"}, "logits": {0: "batch"}})
    return buffer.getvalue()


def npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def submit_and_run(client, alice, model_id: str, steps: list[dict], evaluate: dict | None = None) -> dict:
    resp = client.post("/v1/jobs", json={"model_id": model_id, "steps": steps, "evaluate": evaluate or FAST},
                       headers=alice)
    assert resp.status_code == 202, resp.text
    run_job(resp.json()["id"])
    return client.get(f"/v1/jobs/{resp.json()['id']}", headers=alice).json()


def download(client, alice, job_id: str, name: str = "model.onnx") -> bytes:
    resp = client.get(f"/v1/jobs/{job_id}/artifacts/{name}", headers=alice)
    assert resp.status_code == 200, resp.text
    return resp.content


def weights(model_bytes: bytes) -> dict[str, np.ndarray]:
    """Weights of the Conv and Gemm nodes, by node name."""
    model = onnx.load_from_string(model_bytes)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return {node.name: inits[node.input[1]] for node in model.graph.node
            if node.op_type in ("Conv", "Gemm", "MatMul") and node.input[1] in inits}
