"""Fixed-batch exports in every training path (issue 16 item 4), end to end through the API on a real worker.

Models exported at batch 1 with the batch baked into a Reshape's shape constant (as CNTK's opt-mnist does) used
to fail every training method with `step_failed: RuntimeError: shape '[1, 256]' is invalid for input of size
2048`. Here a digits CNN trained in the test is exported three ways: with `reshape(1, 256)` (the bridge rewrites
the constant to follow the batch: trained on mini-batches), with an extra reshape of the image to [8, 8] (no
rewrite frees it: trained one sample per forward pass), and with an output that has no batch axis (cannot be
trained per sample: refused with `fixed_batch_unsupported`). The compressed models keep batch 1 in their
declared inputs. The real opt-mnist runs every training method and recipe on real digits.
"""
from __future__ import annotations

import functools
import io
import uuid

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from tests.helpers import SHARED_MODELS
from tests.stack import wait_for_job

pytestmark = pytest.mark.integration

FAST = {"batch_sizes": [1], "warmup": 1, "iterations": 5}
TRAIN = {"epochs": 4, "lr": 2e-3, "batch_size": 32}


# --- models and data ------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's handwritten digits as [N, 1, 8, 8] float32 in 0..1, and their labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return (data.images / 16.0).astype(np.float32)[:, None], data.target.astype(np.int64)


@functools.lru_cache(maxsize=1)
def trained_cnn():
    """Conv(1->16) + ReLU + MaxPool + Linear(256->10), trained on 1000 digits."""
    import torch

    x, y = digits()
    torch.manual_seed(0)
    features = torch.nn.Sequential(torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2))
    head = torch.nn.Linear(256, 10)
    params = [*features.parameters(), *head.parameters()]
    optimizer = torch.optim.Adam(params, lr=3e-3)
    xt, yt = torch.from_numpy(x[:1000]), torch.from_numpy(y[:1000])
    for _ in range(15):
        for batch in torch.randperm(len(xt)).split(64):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(head(features(xt[batch]).flatten(1)), yt[batch]).backward()
            optimizer.step()
    return features.eval(), head.eval()


def fixed_batch_export(kind: str) -> bytes:
    """The trained CNN exported at batch 1 (no dynamic axes), its batch hard-coded in a Reshape:
    "reshape": features(x).reshape(1, 256), as opt-mnist; "image": also the image through reshape(8, 8),
    which no rewrite frees; "unbatched": logits of shape [10], no batch axis."""
    import torch

    features, head = trained_cnn()

    class Fixed(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features, self.head = features, head

        def forward(self, x):
            if kind == "image":  # relu: the pixels are >= 0, and it keeps the two reshapes apart
                x = torch.relu(x.reshape(8, 8)).reshape(1, 1, 8, 8)
            logits = self.head(self.features(x).reshape(1, 256))
            return logits.reshape(10) if kind == "unbatched" else logits

    buf = io.BytesIO()
    torch.onnx.export(Fixed(), (torch.zeros(1, 1, 8, 8),), buf, dynamo=False, opset_version=13,
                      input_names=["image"], output_names=["logits"])
    return buf.getvalue()


def declared(value: onnx.ValueInfoProto) -> list:
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in value.type.tensor_type.shape.dim]


def one_by_one(model: bytes, x: np.ndarray) -> np.ndarray:
    """Top-1 predictions of `model` fed one sample per run, as its batch of 1 demands."""
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.array([session.run(None, {name: x[i:i + 1]})[0].reshape(-1).argmax() for i in range(len(x))])


# --- the service ----------------------------------------------------------------------------------------

def upload_model(http: httpx.Client, data: bytes, name: str) -> str:
    resp = http.post("/v1/models", files={"file": (name, data)})
    assert resp.status_code == 201, resp.text
    return resp.json()["id"]


def upload_data(http: httpx.Client, name: str, **arrays: np.ndarray) -> str:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    resp = http.post("/v1/datasets", files={"file": (f"{name}.npz", buf.getvalue())})
    assert resp.status_code == 201, resp.text
    return resp.json()["id"]


def submit(http: httpx.Client, model_id: str, eval_id: str, *, steps: list | None = None, recipe: str | None = None,
           params: dict | None = None) -> dict:
    spec = {"model_id": model_id, "evaluate": FAST | {"eval_dataset_id": eval_id}}
    spec |= {"steps": steps} if steps is not None else {"recipe": recipe, "params": params}
    created = http.post("/v1/jobs", json=spec, headers={"Idempotency-Key": str(uuid.uuid4())})
    assert created.status_code == 202, created.text
    return wait_for_job(http, created.json()["id"], timeout=600)


def check_result(http: httpx.Client, job: dict, original: bytes, x: np.ndarray, y: np.ndarray,
                 *, min_top1: float) -> bytes:
    """A succeeded job whose model keeps the original's inputs and outputs (batch 1 included) and whose
    reported accuracy is the one we count ourselves, not collapsed."""
    assert job["status"] == "succeeded", job
    result = http.get(f"/v1/jobs/{job['id']}/artifacts/model.onnx").content
    before, after = onnx.load_from_string(original).graph, onnx.load_from_string(result).graph

    def contract(graph):  # real inputs (old exports list their weights as inputs too), outputs
        weights = {t.name for t in graph.initializer}
        return ([(v.name, v.type.tensor_type.elem_type, declared(v)) for v in graph.input if v.name not in weights],
                [(v.name, v.type.tensor_type.elem_type, declared(v)) for v in graph.output])

    assert contract(after) == contract(before)
    assert declared(after.input[0])[0] == 1
    accuracy = job["summary"]["accuracy"]
    assert accuracy["samples"] == len(y)
    assert accuracy["compressed_top1"] == pytest.approx(float((one_by_one(result, x) == y).mean()), abs=1e-6)
    assert accuracy["compressed_top1"] >= min_top1, accuracy
    return result


@pytest.fixture(scope="module")
def digit_sets(http):
    x, y = digits()
    return {"train": upload_data(http, "train", image=x[1000:1300], labels=y[1000:1300]),
            "eval": upload_data(http, "eval", image=x[1500:1700], labels=y[1500:1700]),
            "x": x[1500:1700], "y": y[1500:1700]}


# --- tests ----------------------------------------------------------------------------------------------

def test_prune_channels_fine_tunes_a_batch_1_reshape_export_on_mini_batches(http, digit_sets):
    original = fixed_batch_export("reshape")
    model_id = upload_model(http, original, "fixed-reshape.onnx")
    step = {"method": "prune.channels", "params": {"ratio": 0.5, "train_dataset_id": digit_sets["train"],
                                                   "eval_dataset_id": digit_sets["eval"], **TRAIN}}
    job = submit(http, model_id, digit_sets["eval"], steps=[step])
    result = check_result(http, job, original, digit_sets["x"], digit_sets["y"], min_top1=0.85)
    assert sorted(len(t.dims) and t.dims[0] for t in onnx.load_from_string(result).graph.initializer
                  if len(t.dims) == 4) == [8]   # 16 filters pruned to 8
    details = http.get(f"/v1/jobs/{job['id']}/report").json()["steps"][0]["details"]
    batch = details["batch"]
    assert batch["fixed"] == 1 and batch["feeding"] == "mini_batches", batch
    assert [(r["op"], r["shape"], r["now"]) for r in batch["rewrites"]] == [("Reshape", [1, 256], [0, 256])]
    assert batch["stacked_check"]["stacked_samples"] >= 2
    assert details["fine_tuning"]["epochs_run"] >= 1
    assert details["export"]["contract"]["kept"]


def test_distill_trains_a_model_that_runs_only_at_batch_1_one_sample_at_a_time(http, digit_sets):
    original = fixed_batch_export("image")
    model_id = upload_model(http, original, "fixed-image.onnx")
    step = {"method": "distill.kd", "params": {"student": "width", "width_ratio": 0.5,
                                               "train_dataset_id": digit_sets["train"],
                                               "eval_dataset_id": digit_sets["eval"], **TRAIN}}
    job = submit(http, model_id, digit_sets["eval"], steps=[step])
    check_result(http, job, original, digit_sets["x"], digit_sets["y"], min_top1=0.85)
    details = http.get(f"/v1/jobs/{job['id']}/report").json()["steps"][0]["details"]
    for role in ("student", "teacher"):
        batch = details["batch"][role]
        assert batch["fixed"] == 1 and batch["feeding"] == "fixed_batch_at_a_time", batch
        assert "error" in batch["stacked_check"] and batch["vectorized"]
        # Only the [1, 256] constant: the image's [8, 8] does not start with the batch, and [1, 1, 8, 8] reshapes
        # data whose first axis (8) is not the batch.
        assert [(r["shape"], r["now"]) for r in batch["rewrites"]] == [([1, 256], [0, 256])]
    assert details["training"]["epochs_run"] >= 1
    assert details["eval"]["student"] >= 0.85 and details["eval"]["samples"] == 200


def test_recipe_prune_finetune_int8_on_a_model_that_runs_only_at_batch_1(http, digit_sets):
    original = fixed_batch_export("image")
    model_id = upload_model(http, original, "fixed-image-recipe.onnx")
    job = submit(http, model_id, digit_sets["eval"], recipe="prune-finetune-int8",
                 params={"train_dataset_id": digit_sets["train"], "eval_dataset_id": digit_sets["eval"],
                         "ratio": 0.5, **TRAIN})
    check_result(http, job, original, digit_sets["x"], digit_sets["y"], min_top1=0.85)
    steps = http.get(f"/v1/jobs/{job['id']}/report").json()["steps"]
    assert steps[0]["details"]["batch"]["feeding"] == "fixed_batch_at_a_time"


def test_output_without_a_batch_axis_fails_with_a_code_and_stores_no_model(http, digit_sets):
    model_id = upload_model(http, fixed_batch_export("unbatched"), "fixed-unbatched.onnx")
    step = {"method": "prune.channels", "params": {"ratio": 0.5, "train_dataset_id": digit_sets["train"], **TRAIN}}
    job = submit(http, model_id, digit_sets["eval"], steps=[step])
    assert job["status"] == "failed", job
    assert job["error"]["code"] == "fixed_batch_unsupported", job["error"]
    assert "batch axis" in job["error"]["message"] and "RuntimeError" not in job["error"]["message"]
    names = {a["name"] for a in http.get(f"/v1/jobs/{job['id']}/artifacts").json()}
    assert "model.onnx" not in names, names


# --- the real opt-mnist (CNTK export, Reshape to [1, 256]) -------------------------------------------

def mnist_like_digits() -> tuple[np.ndarray, np.ndarray]:
    """load_digits upscaled to 20x20 in a 28x28 frame, 0..255, as MNIST was made and opt-mnist expects."""
    import torch

    x, y = digits()
    up = torch.nn.functional.interpolate(torch.from_numpy(x), size=(20, 20), mode="bilinear", align_corners=False)
    return (torch.nn.functional.pad(up, (4, 4, 4, 4)).clamp(0, 1) * 255).numpy().astype(np.float32), y


@pytest.fixture(scope="module")
def mnist(http):
    path = SHARED_MODELS / "mnist-cnn" / "opt-mnist.onnx"
    if not path.is_file():
        pytest.skip(f"{path} is absent (the real pretrained models live in ../shared/models)")
    x, y = mnist_like_digits()
    original = path.read_bytes()
    return {"original": original, "model": upload_model(http, original, "opt-mnist.onnx"),
            "train": upload_data(http, "mnist-train", Input3=x[:600], labels=y[:600]),
            "eval": upload_data(http, "mnist-eval", Input3=x[1500:1700], labels=y[1500:1700]),
            "x": x[1500:1700], "y": y[1500:1700]}


OPT_MNIST_JOBS = {
    "prune.channels": {"steps": [{"method": "prune.channels", "params": {"ratio": 0.3, "round_to": 1}}]},
    "distill.kd": {"steps": [{"method": "distill.kd", "params": {"student": "width", "width_ratio": 0.3,
                                                                 "round_to": 1}}]},
    "prune-finetune-int8": {"recipe": "prune-finetune-int8", "params": {"ratio": 0.3}},
    "distill-int8": {"recipe": "distill-int8", "params": {"width_ratio": 0.3}},
    "deep-compression": {"recipe": "deep-compression", "params": {"sparsity": 0.5}},
}


@pytest.mark.parametrize("name", list(OPT_MNIST_JOBS))
def test_opt_mnist_trains_in_every_training_path(http, mnist, name):
    job = OPT_MNIST_JOBS[name]
    training = {"train_dataset_id": mnist["train"], "eval_dataset_id": mnist["eval"], "epochs": 4, "lr": 2e-3}
    if "steps" in job:
        steps = [{"method": s["method"], "params": {**s["params"], **training}} for s in job["steps"]]
        done = submit(http, mnist["model"], mnist["eval"], steps=steps)
    else:
        done = submit(http, mnist["model"], mnist["eval"], recipe=job["recipe"], params={**job["params"], **training})
    # The original scores about 0.89 on these digits; what training gives back is held to 0.75.
    check_result(http, done, mnist["original"], mnist["x"], mnist["y"], min_top1=0.75)
    accuracy = done["summary"]["accuracy"]
    print(f"opt-mnist {name}: top-1 {accuracy['original_top1']:.3f} -> {accuracy['compressed_top1']:.3f}")
    first = http.get(f"/v1/jobs/{done['id']}/report").json()["steps"][0]["details"]
    batch = first["batch"]["student"] if name.startswith("distill") else first["batch"]
    assert batch["feeding"] == "mini_batches" and batch["rewrites"][0]["node"] == "Times212_reshape0"


# --- feeding a fixed batch at a time (no service) ------------------------------------------------------

@pytest.mark.parametrize("vectorized", [True, False])
def test_sample_split_gives_the_gradient_of_a_batched_forward(vectorized):
    """A module that takes exactly 2 samples, fed 5 (the last piece padded): outputs and the gradient of the
    mean loss equal those of the same layer run on all 5 at once."""
    import torch

    from workers.bridge.batching import SampleSplit

    torch.manual_seed(0)
    linear = torch.nn.Linear(6, 3)

    class TwoOnly(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = linear

        def forward(self, x):
            if x.shape[0] != 2:
                raise RuntimeError(f"shape '[2, 6]' is invalid for input of size {x.numel()}")
            return self.linear(x.reshape(2, 6))

    x, target = torch.randn(5, 6), torch.randn(5, 3)
    split = SampleSplit(TwoOnly(), 2, vectorized=vectorized)
    split.train()
    loss = torch.nn.functional.mse_loss(split(x), target)
    loss.backward()
    got = [p.grad.clone() for p in linear.parameters()]
    linear.zero_grad()
    expected = torch.nn.functional.mse_loss(linear(x), target)
    expected.backward()
    assert torch.allclose(loss, expected)
    for have, want in zip(got, [p.grad for p in linear.parameters()]):
        assert torch.allclose(have, want, atol=1e-6)
    assert split.vectorized is vectorized   # vmap took it, or the loop was asked for


def test_a_model_failing_on_a_training_batch_fails_with_a_code_naming_the_shape():
    """Without the bridge's batch handling (a module handed to the loop as it is), torch's error is not the message."""
    import torch

    from app.errors import StepFailed
    from workers.datasets import Dataset
    from workers.prune.algorithms import finetune

    class BatchOne(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(64, 10)

        def forward(self, x):
            return self.linear(x.reshape(1, 64))

    x, y = digits()
    with pytest.raises(StepFailed) as caught:
        finetune(BatchOne(), train=Dataset({"image": x[:40]}, y[:40]), eval=None, input_names=["image"],
                 epochs=1, lr=1e-3, batch_size=8)
    assert caught.value.code == "training_failed"
    assert "[40, 1, 8, 8]" in caught.value.message and "hard-code a batch size" in caught.value.message


def test_bridge_frees_reshape_and_expand_holding_a_fixed_batch_of_2(tmp_path):
    """onnx.helper model at batch 2: Reshape to [2, 2, 3], Expand to [2, 2, 3], Reshape to [2, 6]. All three
    constants follow the batch after the rewrite; the module then gives each sample's own result at batch 6."""
    import torch
    from onnx import TensorProto, helper, numpy_helper

    from workers import bridge

    shapes = {"to3d": [2, 2, 3], "expand": [2, 2, 3], "to2d": [2, 6]}
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "to3d"], ["a"], name="split"),
         helper.make_node("Expand", ["a", "expand"], ["b"], name="widen"),
         helper.make_node("Mul", ["b", "scale"], ["c"], name="scale_it"),
         helper.make_node("Reshape", ["c", "to2d"], ["y"], name="join")],
        "fixed2", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 6])],
        [numpy_helper.from_array(np.array(v, np.int64), k) for k, v in shapes.items()]
        + [numpy_helper.from_array(np.arange(1, 4, dtype=np.float32), "scale")])
    path = tmp_path / "fixed2.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))

    bridged = bridge.to_torch(path)
    batch = bridged.batch
    assert batch["fixed"] == 2 and batch["feeding"] == "mini_batches", batch
    assert [(r["node"], r["now"]) for r in batch["rewrites"]] == [
        ("split", [0, 2, 3]), ("widen", [1, 2, 3]), ("join", [0, 6])]
    x = np.random.default_rng(0).standard_normal((6, 6)).astype(np.float32)
    with torch.no_grad():
        got = bridged.module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, x * np.tile(np.arange(1, 4, dtype=np.float32), 2), rtol=1e-6)

    exported = bridge.to_onnx(bridged.module, bridged, tmp_path / "out" / "model.onnx")
    written = onnx.load(str(tmp_path / "out" / "model.onnx")).graph
    assert declared(written.input[0]) == [2, 6] and declared(written.output[0]) == [2, 6]
    assert exported["contract"]["kept"]
