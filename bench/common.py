"""What benchmarks and tests both need, in code that is neither: models built here (no hub download) and the
few process helpers used to start a `modelpress` service on a free port. bench/ imports nothing of tests/."""
from __future__ import annotations

import functools
import io
import socket
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np


def snapshot(rev: str, folder: Path, repo: Path) -> tuple[Path, str]:
    """The repository at commit `rev`, unpacked into folder/src (git archive), and the commit's short hash: code for a
    service to run that others' uncommitted edits of the working tree cannot change mid-benchmark."""
    out = folder / "src"
    out.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", rev], cwd=repo, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True)
    commit = subprocess.run(["git", "rev-parse", "--short", rev], cwd=repo, check=True, capture_output=True,
                            text=True).stdout.strip()
    return out, commit


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(base_url: str, procs: list[subprocess.Popen], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        try:
            if httpx.get(f"{base_url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{base_url} not ready after {timeout}s")


@functools.lru_cache(maxsize=8)
def mlp_onnx_bytes(in_features: int = 64, hidden: int = 256, classes: int = 10, seed: int = 0) -> bytes:
    """A small MLP classifier with a dynamic batch axis, exported by torch as a user would."""
    import torch

    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(in_features, hidden), torch.nn.ReLU(),
        torch.nn.Linear(hidden, hidden), torch.nn.ReLU(),
        torch.nn.Linear(hidden, classes),
    ).eval()
    buf = io.BytesIO()
    torch.onnx.export(
        model, (torch.randn(2, in_features),), buf, dynamo=False, opset_version=17,
        input_names=["features"], output_names=["logits"], dynamic_axes={"features": {0: "batch"}, "logits": {0: "batch"}},
    )
    return buf.getvalue()


@functools.lru_cache(maxsize=2)
def digits_classifier(kind: str = "mlp") -> tuple[bytes, np.ndarray, np.ndarray]:
    """A classifier trained here on scikit-learn's load_digits (real handwritten digits), exported to ONNX.

    Returns (onnx bytes, held-out inputs, held-out labels). kind "mlp" takes features [N, 64];
    kind "cnn" takes images [N, 1, 8, 8]. Inputs are pixel values / 16, float32.
    """
    import torch
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(x))
    train, test = order[:1400], order[1400:]
    torch.manual_seed(0)
    if kind == "mlp":
        model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
        shape, name = (-1, 64), "features"
    else:
        model = torch.nn.Sequential(
            torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Flatten(), torch.nn.Linear(32 * 4 * 4, 10),
        )
        shape, name = (-1, 1, 8, 8), "images"
    xt, yt = torch.from_numpy(x[train]).reshape(shape), torch.from_numpy(y[train])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _epoch in range(25):
        for batch in torch.randperm(len(xt)).split(64):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(xt[batch]), yt[batch]).backward()
            optimizer.step()
    model.eval()
    buf = io.BytesIO()
    torch.onnx.export(model, (xt[:2],), buf, dynamo=False, opset_version=17, input_names=[name],
                      output_names=["logits"], dynamic_axes={name: {0: "batch"}, "logits": {0: "batch"}})
    return buf.getvalue(), x[test].reshape(shape), y[test]
