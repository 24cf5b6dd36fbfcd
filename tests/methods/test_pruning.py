"""workers.prune.algorithms on real data: a CNN trained here on scikit-learn's handwritten digits, eager and via onnx2torch."""
from __future__ import annotations

import copy
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from app.errors import StepFailed
from tests.helpers import digits_classifier
from workers.datasets import Dataset
from workers.prune.algorithms import (
    Masks,
    check_pattern,
    compressed_sizes,
    cuda_semi_structured_speedup,
    finetune,
    magnitude_masks,
    nm_masks,
    polynomial_sparsity,
    prune_channels,
    sparsity_report,
)

torch.set_num_threads(1)


def import_onnx2torch():
    """onnx2torch as the bridge imports it (without torchvision)."""
    from workers.bridge.loader import onnx2torch

    return onnx2torch()[0]


def to_torch(onnx_bytes: bytes) -> torch.fx.GraphModule:
    import onnx

    return import_onnx2torch().convert(onnx.load_from_string(onnx_bytes))


@pytest.fixture(scope="module")
def digits() -> dict[str, np.ndarray]:
    """The split conftest.digits_classifier uses: 1400 training images, 397 held out."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    y = data.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(x))
    train, test = order[:1400], order[1400:]
    return {"x_train": x[train], "y_train": y[train], "x_test": x[test], "y_test": y[test]}


def digits_cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 10),
    )


@pytest.fixture(scope="module")
def trained_cnn(digits) -> nn.Sequential:
    model = digits_cnn()
    x, y = torch.from_numpy(digits["x_train"]), torch.from_numpy(digits["y_train"])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _epoch in range(15):
        for batch in torch.randperm(len(x), generator=generator).split(64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
    return model.eval()


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        return float((model.eval()(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


EXAMPLE = (torch.zeros(2, 1, 8, 8),)


# --- channel pruning --------------------------------------------------------------------------------------

def test_ratio_half_removes_half_the_channels_and_keeps_the_head(trained_cnn):
    model = copy.deepcopy(trained_cnn)
    details = prune_channels(model, EXAMPLE, ratio=0.5)

    assert (model[0].out_channels, model[2].out_channels) == (8, 16)
    assert (model[6].in_features, model[6].out_features) == (16 * 4 * 4, 10)
    assert model[2].weight.shape == (16, 8, 3, 3)  # physically smaller, not masked
    assert details["layers"] == {"0": [16, 8], "2": [32, 16]}
    assert details["kept_whole"] == ["6"]
    assert details["kept_unprunable"] == {} and details["pruning_passes"] == 1  # traced once, no restart
    expected = (1 * 8 * 9 + 8) + (8 * 16 * 9 + 16) + (256 * 10 + 10)
    assert details["params_before"] == params(trained_cnn)
    assert details["params_after"] == params(model) == expected
    assert details["macs_after"] < details["macs_before"] / 3
    assert model(torch.zeros(5, 1, 8, 8)).shape == (5, 10)


def test_without_keep_head_the_classifier_loses_outputs(trained_cnn):
    model = copy.deepcopy(trained_cnn)
    details = prune_channels(model, EXAMPLE, ratio=0.5, keep_head=False)
    assert details["kept_whole"] == []
    assert model[6].out_features == 5


def test_onnx2torch_module_prunes_like_the_eager_one():
    onnx_bytes, x_test, y_test = digits_classifier("cnn")
    model = to_torch(onnx_bytes)
    before = accuracy(model, x_test, y_test)
    details = prune_channels(model, (torch.from_numpy(x_test[:2]),), ratio=0.5)

    assert details["layers"] == {"0/Conv": [16, 8], "2/Conv": [32, 16]}
    assert details["kept_whole"] == ["6/Gemm"]
    assert details["params_after"] == params(model) < details["params_before"] / 2
    assert model(torch.from_numpy(x_test)).shape == (len(x_test), 10)
    assert before > 0.9  # the model pruned was a real one


class BranchyNet(nn.Module):
    """Residual add, un-folded BatchNorm, a Reshape to a constant shape, and three heads (one a detection-like 1x1)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c2, self.b2 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c3 = nn.Conv2d(16, 32, 3, padding=1)
        self.box, self.cls = nn.Conv2d(32, 4, 1), nn.Conv2d(32, 3, 1)
        self.fc, self.ln = nn.Linear(32 * 4 * 4, 10), nn.LayerNorm(10)

    def forward(self, x):
        a = torch.relu(self.b1(self.c1(x)))
        a = a + torch.relu(self.b2(self.c2(a)))
        a = nn.functional.max_pool2d(torch.relu(self.c3(a)), 2)
        return self.ln(self.fc(a.reshape(-1, 512))), self.box(a), torch.sigmoid(self.cls(a))


def test_onnx2torch_constant_reshape_and_batchnorm_are_rewritten():
    torch.manual_seed(0)
    net = BranchyNet().eval()
    buffer = io.BytesIO()
    # Training-mode export keeps BatchNorm as its own node, fed by constants (onnx2torch's OnnxBatchNorm).
    torch.onnx.export(net, (torch.randn(2, 1, 8, 8),), buffer, dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["f", "box", "cls"], dynamic_axes={"x": {0: "batch"}},
                      training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False)
    model = to_torch(buffer.getvalue())
    details = prune_channels(model, (torch.randn(2, 1, 8, 8),), ratio=0.5)

    assert sorted(details["kept_whole"]) == ["box/Conv", "cls/Conv", "fc/Gemm"]
    assert details["layers"] == {"c1/Conv": [16, 8], "c2/Conv": [16, 8], "c3/Conv": [32, 16]}
    assert any("Reshape" in note for note in details["notes"])
    assert sum("BatchNorm" in note for note in details["notes"]) == 2
    outputs = model(torch.randn(3, 1, 8, 8))
    assert [list(o.shape) for o in outputs] == [[3, 10], [3, 4, 4, 4], [3, 3, 4, 4]]
    assert model.get_submodule("b1/BatchNormalization").num_features == 8


def test_fixed_reshape_in_eager_code_keeps_its_group_whole():
    # A reshape hard-coded in Python cannot be rewritten: c3's channels feed it, so c3 stays whole, and the
    # residual pair c1/c2 is still pruned.
    torch.manual_seed(0)
    model = BranchyNet().eval()
    details = prune_channels(model, (torch.randn(2, 1, 8, 8),), ratio=0.5)

    assert details["layers"] == {"c1": [16, 8], "c2": [16, 8]}
    assert list(details["kept_unprunable"]) == ["c3"]
    assert details["kept_unprunable"]["c3"].startswith("the pruned model no longer runs: mat1 and mat2 shapes")
    assert any("1 layer in 1 dependency group kept whole" in note for note in details["notes"])
    outputs = model(torch.randn(3, 1, 8, 8))
    assert [list(o.shape) for o in outputs] == [[3, 10], [3, 4, 4, 4], [3, 3, 4, 4]]
    assert details["params_after"] == params(model)


class FixedReshapeNet(nn.Module):
    """One conv whose every channel feeds a reshape hard-coded to its width: nothing can be pruned."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, 16, 3, padding=1), nn.Linear(16 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).reshape(-1, 16 * 8 * 8))


def test_nothing_prunable_is_a_clear_error():
    model = FixedReshapeNet().eval()
    with pytest.raises(StepFailed) as failure:
        prune_channels(model, (torch.randn(2, 1, 8, 8),), ratio=0.5)
    assert failure.value.code == "pruning_unsupported"
    assert "no dependency group" in failure.value.message and "first: conv: " in failure.value.message


@pytest.mark.parametrize("target", ["target_params_ratio", "target_macs_ratio"])
def test_target_ratio_is_reached(trained_cnn, target):
    model = copy.deepcopy(trained_cnn)
    details = prune_channels(model, EXAMPLE, **{target: 0.5})
    reached = details["params_ratio" if target == "target_params_ratio" else "macs_ratio"]
    assert 0.47 <= reached <= 0.53
    assert details["params_after"] == params(model)
    assert details["search"] and details["search"][0]["pruning_ratio"] == 0.9
    assert details["pruning_passes"] == len(details["search"]) + 1  # one trace per trial, one for the result
    assert model[6].out_features == 10


def test_round_to_keeps_multiples(trained_cnn):
    model = copy.deepcopy(trained_cnn)
    prune_channels(model, EXAMPLE, ratio=0.3, round_to=8)  # 16 -> 11 -> 8, 32 -> 22 -> 16
    assert (model[0].out_channels, model[2].out_channels) == (8, 16)


def test_ignored_layers_keep_their_channels(trained_cnn):
    model = copy.deepcopy(trained_cnn)
    details = prune_channels(model, EXAMPLE, ratio=0.5, ignored_layers=["0"])
    assert model[0].out_channels == 16
    assert model[2].out_channels == 16
    assert details["layers"] == {"2": [32, 16]}


def test_unknown_ignored_layer_is_refused(trained_cnn):
    with pytest.raises(StepFailed) as failure:
        prune_channels(copy.deepcopy(trained_cnn), EXAMPLE, ratio=0.5, ignored_layers=["backbone.conv9"])
    assert failure.value.code == "invalid_params"
    assert "backbone.conv9" in failure.value.message and "'0'" in failure.value.message


def test_parameter_checks(trained_cnn):
    for kwargs in ({}, {"ratio": 0.5, "target_params_ratio": 0.5}, {"ratio": 1.2}):
        with pytest.raises(StepFailed) as failure:
            prune_channels(copy.deepcopy(trained_cnn), EXAMPLE, **kwargs)
        assert failure.value.code == "invalid_params"
    with pytest.raises(StepFailed) as failure:
        prune_channels(copy.deepcopy(trained_cnn), EXAMPLE, ratio=0.5, importance="bn_scale")
    assert failure.value.code == "invalid_params" and "BatchNorm" in failure.value.message


def test_taylor_needs_data_and_uses_it(trained_cnn, digits):
    with pytest.raises(StepFailed) as failure:
        prune_channels(copy.deepcopy(trained_cnn), EXAMPLE, ratio=0.5, importance="taylor")
    assert failure.value.code == "dataset_required"

    x, y = torch.from_numpy(digits["x_train"][:256]), torch.from_numpy(digits["y_train"][:256])
    steps = []
    model = copy.deepcopy(trained_cnn)
    details = prune_channels(model, EXAMPLE, ratio=0.5, importance="taylor", iterative_steps=2,
                             taylor_batches=lambda: [((x[i:i + 64],), y[i:i + 64]) for i in range(0, 256, 64)],
                             on_step=lambda step, info: steps.append((step, info["params"])))
    assert (model[0].out_channels, model[2].out_channels) == (8, 16)
    assert [s for s, _ in steps] == [1, 2] and steps[0][1] > steps[1][1] == params(model)
    assert len(details["steps"]) == 2
    assert all(p.grad is None for p in model.parameters())


# --- transformers: the FFN width prunes, the head-splitting hidden size cannot ------------------------

TRANSFORMER_BLOCKS = ("layers/layers/0", "layers/layers/1")


@pytest.fixture(scope="module")
def transformer_path(tmp_path_factory) -> Path:
    from tests.methods.factories import transformer_onnx

    path = tmp_path_factory.mktemp("transformer") / "encoder.onnx"
    path.write_bytes(transformer_onnx())
    return path


def test_transformer_prunes_the_ffn_and_keeps_attention_whole(transformer_path, tmp_path):
    import onnxruntime as ort

    from workers.bridge import to_onnx
    from workers.bridge import to_torch as bridge_to_torch

    bridged = bridge_to_torch(transformer_path)
    module = bridged.module
    params_before = params(module)
    reported = []
    details = prune_channels(module, (torch.randint(0, 50, (2, 7)),), ratio=0.5,
                             on_step=lambda step, info: reported.append(step))

    assert bridged.module is module
    layers = dict(module.named_modules())
    for block in TRANSFORMER_BLOCKS:
        up, down = layers[f"{block}/ff/ff/0/MatMul"], layers[f"{block}/ff/ff/2/MatMul"]
        assert (up.in_features, up.out_features, down.in_features, down.out_features) == (64, 64, 64, 64)
        assert up.weight.shape == (64, 64) and down.weight.shape == (64, 64)
        assert (layers[f"{block}/qkv/MatMul"].in_features, layers[f"{block}/qkv/MatMul"].out_features) == (64, 192)
        assert (layers[f"{block}/out/MatMul"].in_features, layers[f"{block}/out/MatMul"].out_features) == (64, 64)
        assert layers[f"{block}/norm1/LayerNormalization"].normalized_shape == (64,)
        for name in ("qkv/MatMul", "out/MatMul"):
            assert details["kept_unprunable"][f"{block}/{name}"]
    assert details["layers"] == {f"{block}/ff/ff/0/MatMul": [128, 64] for block in TRANSFORMER_BLOCKS}
    assert not any("ff/ff/0" in name for name in details["kept_unprunable"])
    assert any("6 layers in 3 dependency groups kept whole" in note for note in details["notes"])
    ffn_half = 2 * (64 * 64 + 64 + 64 * 64)  # per block: half of Linear 64->128's rows and bias, of 128->64's columns
    assert details["params_after"] == params(module) == params_before - ffn_half
    state = module.state_dict()
    assert all(state[f"{block}/ff/ff/0/MatMul.weight"].shape == (64, 64) for block in TRANSFORMER_BLOCKS)
    assert reported == [1]  # the restarts do not report the round again

    longer = torch.randint(0, 50, (3, 11))
    with torch.no_grad():
        logits = module(longer)
    assert logits.shape == (3, 3)
    dst = tmp_path / "pruned.onnx"
    to_onnx(module, bridged, dst)
    session = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids"]
    assert [o.name for o in session.get_outputs()] == ["logits"]
    exported = session.run(None, {"input_ids": longer.numpy()})[0]
    np.testing.assert_allclose(exported, logits.numpy(), rtol=1e-4, atol=1e-5)
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(dst)).graph
    assert sum(numpy_helper.to_array(t).size for t in graph.initializer) < params_before - ffn_half // 2


@pytest.mark.parametrize("target, reachable", [(0.8, True), (0.5, False)])
def test_transformer_params_target_counts_the_groups_kept_whole(transformer_path, target, reachable):
    from workers.bridge import to_torch as bridge_to_torch

    module = bridge_to_torch(transformer_path).module
    details = prune_channels(module, (torch.randint(0, 50, (2, 7)),), target_params_ratio=target)

    # The first trial finds the 3 unprunable groups (3 passes); every later trial and the result reuse them.
    assert details["pruning_passes"] == len(details["search"]) + 3
    assert len(details["kept_unprunable"]) == 6
    reached = details["params_ratio"]
    if reachable:
        assert abs(reached - target) <= 0.03
    else:
        # Only the FFNs can shrink: 90% of their width goes and the note says where that leaves the model.
        assert details["pruning_ratio"] == 0.9 and reached > target + 0.03
        assert any(f"reached {reached:.3f} for a target of 0.500" in note for note in details["notes"])
    assert details["params_after"] == params(module)


def test_prune_channels_method_succeeds_on_a_transformer(transformer_path, tmp_path):
    import onnxruntime as ort

    from workers import methods

    method = methods.get("prune.channels")
    out = tmp_path / "out"
    out.mkdir()
    result = method.run(transformer_path, method.params_model.model_validate({"ratio": 0.5}), out,
                        methods.StepContext())
    pruning = result.details["pruning"]
    assert pruning["params_ratio"] < 1
    assert any(name.endswith("qkv/MatMul") for name in pruning["kept_unprunable"])
    session = ort.InferenceSession(str(result.model_path), providers=["CPUExecutionProvider"])
    ids = np.random.default_rng(0).integers(0, 50, size=(2, 9)).astype(np.int64)
    assert session.run(None, {"input_ids": ids})[0].shape == (2, 3)


# --- fine-tuning ------------------------------------------------------------------------------------------

def test_finetune_recovers_accuracy_after_half_the_channels_go(trained_cnn, digits):
    x_test, y_test = digits["x_test"], digits["y_test"]
    original = accuracy(trained_cnn, x_test, y_test)
    model = copy.deepcopy(trained_cnn)
    prune_channels(model, EXAMPLE, ratio=0.5)
    pruned = accuracy(model, x_test, y_test)
    epochs = []
    result = finetune(
        model, train=Dataset({"images": digits["x_train"]}, digits["y_train"]),
        eval=Dataset({"images": x_test}, y_test), input_names=["images"], teacher=None,
        epochs=6, lr=3e-3, batch_size=64, on_epoch=epochs.append,
    )
    recovered = accuracy(model, x_test, y_test)
    print(f"digits CNN accuracy: original {original:.3f}, 50% channels pruned {pruned:.3f}, fine-tuned {recovered:.3f}")

    assert original > 0.95
    assert recovered == pytest.approx(result["metric_after"], abs=1e-9)
    assert result["metric_before"] == pytest.approx(pruned, abs=1e-9)
    assert recovered >= original - 0.03 and recovered > pruned
    assert result["metric_after"] == max([result["metric_before"]] + [e["eval_metric"] for e in result["history"]])
    assert epochs == result["history"] and result["history"][0]["metric_name"] == "accuracy"
    assert 1 <= result["epochs_run"] <= 6 and result["device"] == "cpu"


def test_finetune_without_labels_distills_from_the_teacher(trained_cnn, digits):
    student = copy.deepcopy(trained_cnn)
    prune_channels(student, EXAMPLE, ratio=0.5)
    result = finetune(
        student, train=Dataset({"images": digits["x_train"][:600]}), eval=None, input_names=["images"],
        teacher=trained_cnn, epochs=3, lr=2e-3, batch_size=64,
    )
    assert result["metric_name"] == "cosine"
    assert result["metric_after"] >= result["metric_before"] or result["metric_after"] >= 0.99
    assert result["metric_after"] > 0.9
    # the teacher was only read
    assert trained_cnn[0].out_channels == 16


def test_finetune_stops_when_asked(trained_cnn, digits):
    calls = iter(range(1000))
    result = finetune(
        copy.deepcopy(trained_cnn), train=Dataset({"images": digits["x_train"]}, digits["y_train"]), eval=None,
        input_names=["images"], epochs=5, lr=1e-3, batch_size=64, should_stop=lambda: next(calls) >= 3,
    )
    assert result["stopped"] and result["epochs_run"] == 1


def test_finetune_refuses_a_dataset_without_the_input(trained_cnn, digits):
    with pytest.raises(StepFailed) as failure:
        finetune(copy.deepcopy(trained_cnn), train=Dataset({"pixels": digits["x_train"]}, digits["y_train"]),
                 eval=None, input_names=["images"], epochs=1, lr=1e-3, batch_size=64)
    assert failure.value.code == "dataset_mismatch"


# --- unstructured magnitude -------------------------------------------------------------------------------

def test_global_magnitude_masks_reach_the_sparsity_and_survive_finetuning(trained_cnn, digits):
    model = copy.deepcopy(trained_cnn)
    masks = Masks.from_magnitude(model, 0.8, "global")
    masks.apply()
    report = sparsity_report(model)
    assert report["total"]["sparsity"] == pytest.approx(0.8, abs=0.01)
    assert set(report["layers"]) == {"0", "2", "6"}
    assert all(layer.bias.ne(0).all() for layer in (model[0], model[2], model[6]))  # biases untouched

    finetune(model, train=Dataset({"images": digits["x_train"]}, digits["y_train"]),
             eval=Dataset({"images": digits["x_test"]}, digits["y_test"]), input_names=["images"],
             epochs=2, lr=1e-3, batch_size=64, masks=masks)
    layers = dict(model.named_modules())
    for name, mask in masks.masks.items():
        assert not layers[name].weight[~mask].any()
    assert sparsity_report(model)["total"]["sparsity"] >= 0.79


def test_layer_scope_gives_every_layer_the_sparsity(trained_cnn):
    masks = magnitude_masks(trained_cnn, 0.5, "layer", ignored_layers=["6"])
    assert set(masks) == {"0", "2"}
    for mask in masks.values():
        assert (~mask).float().mean().item() == pytest.approx(0.5, abs=0.01)


def test_gradual_pruning_follows_the_schedule(trained_cnn, digits):
    model = copy.deepcopy(trained_cnn)
    masks = Masks.from_magnitude(model, 0.0, "global")
    train = Dataset({"images": digits["x_train"][:512]}, digits["y_train"][:512])
    total = 2 * 8  # 2 epochs of 8 batches
    result = finetune(model, train=train, eval=None, input_names=["images"], epochs=2, lr=1e-3, batch_size=64,
                      masks=masks, sparsity_schedule=lambda step: polynomial_sparsity(
                          step, initial=0.0, final=0.7, begin_step=0, end_step=total))
    assert [e["sparsity"] for e in result["history"]][-1] == pytest.approx(0.7)
    assert result["best_epoch"] == 2  # epochs before the final sparsity cannot win
    assert sparsity_report(model)["total"]["sparsity"] == pytest.approx(0.7, abs=0.01)


def test_polynomial_schedule():
    schedule = dict(initial=0.1, final=0.9, begin_step=100, end_step=300)
    assert polynomial_sparsity(0, **schedule) == pytest.approx(0.1)
    assert polynomial_sparsity(100, **schedule) == pytest.approx(0.1)
    assert polynomial_sparsity(200, **schedule) == pytest.approx(0.9 - 0.8 * 0.5 ** 3)
    assert polynomial_sparsity(300, **schedule) == pytest.approx(0.9)
    assert polynomial_sparsity(1000, **schedule) == pytest.approx(0.9)


def test_sparse_onnx_compresses_smaller(tmp_path: Path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)).eval()

    def export(path: Path) -> Path:
        torch.onnx.export(model, (torch.randn(1, 256),), str(path), dynamo=False, opset_version=17)
        return path

    dense = compressed_sizes(export(tmp_path / "dense.onnx"))
    Masks.from_magnitude(model, 0.8).apply()
    sparse = compressed_sizes(export(tmp_path / "sparse.onnx"))
    assert sparse["raw"] == pytest.approx(dense["raw"], rel=0.01)  # same shapes, same bytes uncompressed
    assert sparse["gzip"] < 0.6 * dense["gzip"]
    if dense["zstd"] is None:
        assert "zstandard" in dense["zstd_reason"]
    else:
        assert sparse["zstd"] < 0.6 * dense["zstd"]


# --- 2:4 --------------------------------------------------------------------------------------------------

def test_two_four_masks_zero_two_of_every_four():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 1), nn.Conv2d(16, 6, 3), nn.Flatten(), nn.Linear(6, 32), nn.Linear(32, 8))
    masks, skipped = nm_masks(model, 2, 4)
    assert set(masks) == {"0", "4"}
    assert "not divisible by 4" in skipped["3"] and "3x3" in skipped["1"]
    Masks(model, masks).apply()
    for name in masks:
        weight = dict(model.named_modules())[name].weight
        groups = weight.reshape(weight.shape[0], -1, 4)
        assert ((groups == 0).sum(dim=2) >= 2).all()
    pattern = check_pattern(model, 2, 4)
    assert pattern["fraction"] == 1.0 and set(pattern["layers"]) == {"0", "4"}
    assert check_pattern(nn.Sequential(nn.Linear(8, 8)), 2, 4)["fraction"] < 1.0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU answer")
def test_semi_structured_speedup_says_unavailable_on_cpu():
    result = cuda_semi_structured_speedup(nn.Linear(64, 64))
    assert result["available"] is False and "no CUDA device" in result["reason"]


def test_finetune_feeds_token_ids_as_int64():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(20, 8), nn.Flatten(), nn.Linear(8 * 5, 4))
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 20, size=(128, 5)).astype(np.int32)  # int32 ids: nn.Embedding needs int64
    labels = (ids[:, 0] % 4).astype(np.int64)
    data = Dataset({"input_ids": ids}, labels)
    result = finetune(model, train=data, eval=data, input_names=["input_ids"], epochs=8, lr=1e-2, batch_size=32,
                      patience=None)
    assert result["epochs_run"] == 8
    assert result["metric_after"] > result["metric_before"]
