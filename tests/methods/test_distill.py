"""distill.kd on real data: a digits CNN teaches width, depth and uploaded students; every accuracy the step
reports is checked against an independent ONNX Runtime run of the files."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from pydantic import ValidationError

from app.errors import StepFailed
from tests.helpers import digits_classifier
from tests.methods.factories import transformer_onnx
from workers import bridge, methods
from workers.datasets import Dataset
from workers.distill.blocks import drop_blocks, find_blocks
from workers.prune.algorithms import finetune

torch.set_num_threads(1)
KD = "distill.kd"


# --- helpers ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits() -> dict[str, np.ndarray]:
    """bench.common.digits_classifier's split: the teacher learnt on the first 1400 of `order`, 397 are held out.
    The students see 300 of the teacher's training images and choose their best epoch on 300 others."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    y = data.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(x))
    train, held_out = order[:1400], order[1400:]
    return {"x_train": x[train[:300]], "y_train": y[train[:300]], "x_val": x[train[300:600]],
            "y_val": y[train[300:600]], "x_test": x[held_out], "y_test": y[held_out], "x_all": x[train],
            "y_all": y[train]}


@pytest.fixture(scope="module")
def cnn_teacher(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("teacher") / "cnn.onnx"
    path.write_bytes(digits_classifier("cnn")[0])
    return path


def distill(model: Path, out_dir: Path, *, datasets: dict, models: dict | None = None, events: list | None = None,
            **params) -> methods.StepOutput:
    method = methods.get(KD)
    out_dir.mkdir(parents=True, exist_ok=True)

    def progress(fraction, message, milestone=False):
        if events is not None:
            events.append((fraction, message, milestone))

    ctx = methods.StepContext(datasets=datasets, models=models or {}, progress=progress)
    return method.run(model, method.params_model.model_validate(params), out_dir, ctx)


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ort_accuracy(path: Path, x: np.ndarray, y: np.ndarray, input_name: str = "images") -> float:
    return float((session(path).run(None, {input_name: x})[0].argmax(axis=1) == y).mean())


def export(model: torch.nn.Module, example: torch.Tensor, path: Path, *, input_name: str = "images",
           output_name: str = "logits") -> Path:
    torch.onnx.export(model.eval(), (example,), str(path), dynamo=False, opset_version=17, input_names=[input_name],
                      output_names=[output_name], dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}})
    return path


def op_count(path: Path, op_type: str) -> int:
    return sum(node.op_type == op_type for node in onnx.load(str(path)).graph.node)


def train_briefly(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, epochs: int) -> torch.nn.Module:
    torch.manual_seed(0)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        for batch in torch.randperm(len(xt)).split(64):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(xt[batch]), yt[batch]).backward()
            optimizer.step()
    return model.eval()


class Residual(torch.nn.Module):
    def __init__(self, channels: int = 16) -> None:
        super().__init__()
        self.a = torch.nn.Conv2d(channels, channels, 3, padding=1)
        self.b = torch.nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.b(torch.relu(self.a(x))))


def residual_net() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(), Residual(), Residual(), Residual(), Residual(),
        torch.nn.MaxPool2d(2), torch.nn.Flatten(), torch.nn.Linear(16 * 4 * 4, 10),
    )


def mlp_student(classes: int = 10) -> torch.nn.Sequential:
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 48), torch.nn.ReLU(),
                               torch.nn.Linear(48, classes))


# --- params ----------------------------------------------------------------------------------------

def test_params_need_training_data_and_a_student_model_for_student_model():
    params = methods.get(KD).params_model
    assert methods.get(KD).model_params == ("student_model_id",)
    with pytest.raises(ValidationError, match="train_dataset_id"):
        params.model_validate({})
    with pytest.raises(ValidationError, match="set student_model_id"):
        params.model_validate({"train_dataset_id": "d", "student": "model"})
    with pytest.raises(ValidationError, match="student 'model' only"):
        params.model_validate({"train_dataset_id": "d", "student_model_id": "m"})
    accepted = params.model_validate({"train_dataset_id": "d"})
    assert (accepted.student, accepted.width_ratio, accepted.keep_every, accepted.temperature, accepted.alpha,
            accepted.output_loss) == ("width", 0.5, 2, 4.0, 0.5, "auto")


# --- width -----------------------------------------------------------------------------------------

def test_width_student_distilled_beats_the_same_architecture_trained_from_scratch(cnn_teacher, digits, tmp_path):
    train = Dataset({"images": digits["x_train"]}, digits["y_train"])
    val = Dataset({"images": digits["x_val"]}, digits["y_val"])
    settings = dict(epochs=8, lr=3e-3, batch_size=32, patience=None)
    events: list = []
    output = distill(cnn_teacher, tmp_path / "kd", datasets={"train_dataset_id": train, "eval_dataset_id": val},
                     events=events, train_dataset_id="t", eval_dataset_id="e", student="width", width_ratio=0.5,
                     **settings)
    details = output.details

    # The same architecture from random weights, on the labels alone, same epochs and best-epoch rule.
    scratch = bridge.to_torch(output.model_path, sample={"images": digits["x_val"][:8]})
    torch.manual_seed(0)
    for layer in scratch.module.modules():
        if hasattr(layer, "reset_parameters") and layer is not scratch.module:
            layer.reset_parameters()
    finetune(scratch.module, train=train, eval=val, input_names=["images"], **settings)
    scratch_path = export(scratch.module, torch.from_numpy(digits["x_val"][:2]), tmp_path / "scratch.onnx")

    # For the record: the same pruned start on the labels alone (alpha 0), to tell the soft targets' share
    # from the teacher-initialised weights' share.
    labels_only = distill(cnn_teacher, tmp_path / "labels-only", datasets={"train_dataset_id": train,
                          "eval_dataset_id": val}, train_dataset_id="t", eval_dataset_id="e", alpha=0.0, **settings)

    x, y = digits["x_test"], digits["y_test"]
    teacher_acc = ort_accuracy(cnn_teacher, x, y)
    distilled_acc = ort_accuracy(output.model_path, x, y)
    scratch_acc = ort_accuracy(scratch_path, x, y)
    print(f"held-out accuracy: teacher {teacher_acc:.3f}, width-0.5 student distilled {distilled_acc:.3f}, "
          f"same student from scratch {scratch_acc:.3f}, pruned start on labels only "
          f"{ort_accuracy(labels_only.model_path, x, y):.3f}; params {details['params']}")

    assert details["student"]["kind"] == "width" and details["teacher"]["runtime"] == "pytorch"
    assert details["student"]["pruning"]["layers"] == {"0/Conv": [16, 8], "2/Conv": [32, 16]}
    assert op_count(output.model_path, "Conv") == 2
    assert details["params"]["student"] < 0.6 * details["params"]["teacher"]
    assert distilled_acc >= scratch_acc - 0.01
    assert distilled_acc >= teacher_acc - 0.05
    # The reported figures are the files' own, on the eval data.
    assert details["eval"]["metric"] == "accuracy" and details["eval"]["dataset"] == "eval"
    assert details["eval"]["teacher"] == pytest.approx(ort_accuracy(cnn_teacher, digits["x_val"], digits["y_val"]))
    assert details["eval"]["student"] == pytest.approx(
        ort_accuracy(output.model_path, digits["x_val"], digits["y_val"]))
    history = details["training"]["history"]
    assert len(history) == 8 and all(e["train_loss"] > 0 and e["seconds"] >= 0 for e in history)
    milestones = [m for _, m, milestone in events if milestone]
    assert len(milestones) == 8 and milestones[0].startswith("distillation epoch 1/8: loss")
    assert details["loss"] == {"temperature": 4.0, "alpha": 0.5, "output_loss": "auto", "labels": True}
    assert details["export"]["check"]["inputs"] == "dataset"


def test_output_loss_mse_on_a_feature_map(tmp_path, digits):
    torch.manual_seed(0)
    features = torch.nn.Sequential(torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(),
                                   torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.ReLU(),
                                   torch.nn.Conv2d(16, 4, 1))
    teacher = export(features, torch.from_numpy(digits["x_train"][:2]), tmp_path / "features.onnx",
                     output_name="features")
    train = Dataset({"images": digits["x_train"]})
    output = distill(teacher, tmp_path / "out", datasets={"train_dataset_id": train}, train_dataset_id="t",
                     student="width", output_loss="mse", epochs=6, lr=3e-3, batch_size=32)
    details = output.details
    assert details["loss"]["output_loss"] == "mse" and not details["loss"]["labels"]
    assert details["training"]["metric_name"] == "cosine"
    assert details["eval"]["metric"] == "cosine_to_teacher"
    x = digits["x_test"]
    produced, expected = session(output.model_path).run(None, {"images": x})[0], session(teacher).run(None, {"images": x})[0]
    assert produced.shape == expected.shape == (len(x), 4, 8, 8)
    cosine = np.mean([np.dot(a.ravel(), b.ravel()) / (np.linalg.norm(a) * np.linalg.norm(b))
                      for a, b in zip(produced, expected)])
    assert cosine > 0.9 and details["eval"]["student"] > 0.9
    assert details["training"]["metric_after"] >= details["training"]["metric_before"]


# --- depth -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def residual_teacher(tmp_path_factory, digits) -> Path:
    model = train_briefly(residual_net(), digits["x_all"], digits["y_all"], epochs=5)
    return export(model, torch.from_numpy(digits["x_all"][:2]), tmp_path_factory.mktemp("res") / "residual.onnx")


def test_blocks_found_in_the_three_models(residual_teacher, cnn_teacher):
    residual = find_blocks(onnx.load(str(residual_teacher)))
    assert len(residual.blocks) == 4 and residual.side_tensors == []
    assert [b.output for b in residual.blocks] == [f"/{i}/Relu_1_output_0" for i in range(2, 6)]
    assert {len(b.nodes) for b in residual.blocks} == {5}       # Conv, Relu, Conv, Add, Relu

    encoder = find_blocks(onnx.load_from_string(transformer_onnx()))
    assert len(encoder.blocks) == 2
    assert encoder.blocks[0].input == "/embed/Gather_output_0"
    assert encoder.blocks[1].output == "/layers/layers.1/norm2/LayerNormalization_output_0"

    plain = find_blocks(onnx.load(str(cnn_teacher)))
    assert plain.blocks == [] and "topological order" in plain.searched


def test_blocks_that_all_read_a_mask_are_found_with_the_mask_as_side_input():
    class Masked(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = torch.nn.ModuleList(torch.nn.Linear(16, 16) for _ in range(3))
            self.head = torch.nn.Linear(16, 2)

        def forward(self, x, mask):
            for layer in self.layers:
                x = x + torch.relu(layer(x)) * mask
            return self.head(x.sum(dim=1))

    buffer = io.BytesIO()
    torch.onnx.export(Masked().eval(), (torch.randn(2, 5, 16), torch.ones(2, 5, 1)), buffer, dynamo=False,
                      opset_version=17, input_names=["x", "mask"], output_names=["y"],
                      dynamic_axes={"x": {0: "b", 1: "s"}, "mask": {0: "b", 1: "s"}, "y": {0: "b"}})
    model = onnx.load_from_string(buffer.getvalue())
    found = find_blocks(model)
    assert len(found.blocks) == 3 and found.side_tensors == ["mask"]
    student = drop_blocks(model, found.blocks, keep=[0, 2])
    assert sum(n.op_type == "MatMul" for n in student.graph.node) == 2
    feeds = {"x": np.random.default_rng(0).standard_normal((3, 4, 16)).astype(np.float32),
             "mask": np.ones((3, 4, 1), np.float32)}
    assert ort.InferenceSession(student.SerializeToString()).run(None, feeds)[0].shape == (3, 2)


def test_depth_student_keeps_every_other_residual_block(residual_teacher, digits, tmp_path):
    train = Dataset({"images": digits["x_train"]}, digits["y_train"])
    val = Dataset({"images": digits["x_val"]}, digits["y_val"])
    output = distill(residual_teacher, tmp_path / "out", datasets={"train_dataset_id": train, "eval_dataset_id": val},
                     train_dataset_id="t", eval_dataset_id="e", student="depth", epochs=4, lr=2e-3, batch_size=32)
    details = output.details
    assert details["student"]["kind"] == "depth" and details["student"]["blocks"]["count"] == 4
    assert details["student"]["kept_blocks"] == [0, 2]
    assert op_count(residual_teacher, "Conv") == 9 and op_count(output.model_path, "Conv") == 5
    runner = session(output.model_path)
    assert [i.name for i in runner.get_inputs()] == ["images"] and [o.name for o in runner.get_outputs()] == ["logits"]
    teacher_acc = ort_accuracy(residual_teacher, digits["x_test"], digits["y_test"])
    student_acc = ort_accuracy(output.model_path, digits["x_test"], digits["y_test"])
    print(f"residual net held-out accuracy: teacher (4 blocks) {teacher_acc:.3f}, depth student (2) {student_acc:.3f}")
    assert teacher_acc > 0.9 and student_acc >= teacher_acc - 0.05
    assert details["params"]["student"] < details["params"]["teacher"]


def test_depth_student_of_the_transformer_has_one_layer(tmp_path):
    teacher = tmp_path / "encoder.onnx"
    teacher.write_bytes(transformer_onnx())
    tokens = np.random.default_rng(0).integers(0, 50, (64, 7))
    output = distill(teacher, tmp_path / "out", datasets={"train_dataset_id": Dataset({"input_ids": tokens})},
                     train_dataset_id="t", student="depth", epochs=2, lr=1e-3, batch_size=16)
    details = output.details
    assert details["student"]["kept_blocks"] == [0] and details["student"]["blocks"]["count"] == 2
    assert op_count(teacher, "LayerNormalization") == 4 and op_count(output.model_path, "LayerNormalization") == 2
    longer = np.random.default_rng(1).integers(0, 50, (3, 11))   # another batch size and sequence length
    assert session(output.model_path).run(["logits"], {"input_ids": longer})[0].shape == (3, 3)
    assert details["eval"]["metric"] == "cosine_to_teacher" and details["eval"]["student"] > 0.5


def test_depth_without_repeated_blocks_says_what_it_searched(cnn_teacher, digits, tmp_path):
    with pytest.raises(StepFailed) as failure:
        distill(cnn_teacher, tmp_path / "out", datasets={"train_dataset_id": Dataset({"images": digits["x_train"]})},
                train_dataset_id="t", student="depth")
    assert failure.value.code == "no_repeated_blocks"
    assert "cuts" in str(failure.value) and "identical layers" in str(failure.value)


# --- uploaded students and teachers that stay in ONNX Runtime -----------------------------------------

def test_uploaded_student_learns_from_the_teacher_and_keeps_its_output_names(cnn_teacher, digits, tmp_path):
    student = export(mlp_student(), torch.from_numpy(digits["x_train"][:2]), tmp_path / "student.onnx",
                     output_name="scores")
    before = ort_accuracy(student, digits["x_test"], digits["y_test"])
    train = Dataset({"images": digits["x_train"]}, digits["y_train"])
    output = distill(cnn_teacher, tmp_path / "out", datasets={"train_dataset_id": train},
                     models={"student_model_id": student}, train_dataset_id="t", student="model",
                     student_model_id="m", epochs=20, lr=1e-2, batch_size=32, patience=None)
    after = ort_accuracy(output.model_path, digits["x_test"], digits["y_test"])
    print(f"uploaded MLP student held-out accuracy: before {before:.3f}, distilled {after:.3f}")
    assert output.details["student"]["kind"] == "model"
    assert [o.name for o in session(output.model_path).get_outputs()] == ["logits"]
    assert before < 0.3 and after > 0.85
    assert output.details["params"]["student"] == 64 * 48 + 48 + 48 * 10 + 10


def test_mismatching_student_fails_naming_the_difference(cnn_teacher, digits, tmp_path):
    example = torch.from_numpy(digits["x_train"][:2])
    five_classes = export(mlp_student(classes=5), example, tmp_path / "five.onnx")
    other_input = export(mlp_student(), example, tmp_path / "pixels.onnx", input_name="pixels")
    train = Dataset({"images": digits["x_train"]})
    for student, expected in ((five_classes, "output 'logits' is [2, 10] from the teacher and [2, 5]"),
                              (other_input, "the student lacks 'images'")):
        with pytest.raises(StepFailed) as failure:
            distill(cnn_teacher, tmp_path / "out", datasets={"train_dataset_id": train},
                    models={"student_model_id": student}, train_dataset_id="t", student="model", student_model_id="m")
        assert failure.value.code == "student_mismatch" and expected in str(failure.value)


def with_hardmax(path: Path, dst: Path) -> Path:
    """The classifier plus 0 x Hardmax(logits): the same outputs, through an op onnx2torch cannot convert."""
    model = onnx.load(str(path))
    graph = model.graph
    for node in graph.node:
        node.output[:] = ["raw_logits" if o == "logits" else o for o in node.output]
    graph.initializer.append(helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]))
    graph.node.extend([helper.make_node("Hardmax", ["raw_logits"], ["hard"], axis=1),
                       helper.make_node("Mul", ["hard", "zero"], ["nothing"]),
                       helper.make_node("Add", ["raw_logits", "nothing"], ["logits"])])
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))
    return dst


def test_a_teacher_that_cannot_be_converted_teaches_from_onnx_runtime(cnn_teacher, digits, tmp_path):
    teacher = with_hardmax(cnn_teacher, tmp_path / "hardmax.onnx")
    with pytest.raises(bridge.UnsupportedOp):
        bridge.to_torch(teacher)
    student = export(mlp_student(), torch.from_numpy(digits["x_train"][:2]), tmp_path / "student.onnx")
    unlabelled = Dataset({"images": digits["x_train"]})
    output = distill(teacher, tmp_path / "out", datasets={"train_dataset_id": unlabelled},
                     models={"student_model_id": student}, train_dataset_id="t", student="model",
                     student_model_id="m", epochs=20, lr=1e-2, batch_size=32, patience=None)
    details = output.details
    assert details["teacher"]["runtime"] == "onnxruntime" and "Hardmax" in details["teacher"]["reason"]
    assert not details["loss"]["labels"]
    # Without labels it learnt the digits from the teacher alone.
    learnt = ort_accuracy(output.model_path, digits["x_test"], digits["y_test"])
    print(f"MLP student taught by the Hardmax teacher in ONNX Runtime, no labels: held-out accuracy {learnt:.3f}")
    assert learnt > 0.85

    with pytest.raises(StepFailed) as failure:
        distill(teacher, tmp_path / "width", datasets={"train_dataset_id": unlabelled}, train_dataset_id="t")
    assert failure.value.code == "unsupported_op" and "student 'model'" in str(failure.value)


def test_hint_loss_aligns_each_kept_block_with_the_end_of_the_blocks_it_replaces(residual_teacher, digits, tmp_path):
    train = Dataset({"images": digits["x_train"]}, digits["y_train"])
    val = Dataset({"images": digits["x_val"]}, digits["y_val"])
    output = distill(residual_teacher, tmp_path / "out", datasets={"train_dataset_id": train, "eval_dataset_id": val},
                     train_dataset_id="t", eval_dataset_id="e", student="depth", epochs=4, lr=2e-3, batch_size=32,
                     hint_weight=1.0)
    hints = output.details["loss"]["hints"]
    # 4 blocks, every 2nd kept: student block 0 stands in for teacher blocks 0-1, block 2 for 2-3.
    assert hints["pairs"] == 2
    assert hints["matched"] == [{"student_block": 0, "teacher_block": 1}, {"student_block": 2, "teacher_block": 3}]
    assert ort_accuracy(output.model_path, digits["x_test"], digits["y_test"]) > 0.9
    # The hint term is really in the loss: a heavier weight raises the first epoch's training loss.
    heavier = distill(residual_teacher, tmp_path / "heavier", datasets={"train_dataset_id": train},
                      train_dataset_id="t", student="depth", epochs=1, lr=2e-3, batch_size=32, hint_weight=50.0)
    lighter = distill(residual_teacher, tmp_path / "lighter", datasets={"train_dataset_id": train},
                      train_dataset_id="t", student="depth", epochs=1, lr=2e-3, batch_size=32)
    first = [d.details["training"]["history"][-1]["train_loss"] for d in (heavier, lighter)]
    assert first[0] > first[1] + 0.1, first


def test_hint_loss_is_for_depth_students_only():
    with pytest.raises(ValidationError, match="student 'depth'"):
        methods.get(KD).params_model.model_validate({"train_dataset_id": "t", "student": "width", "hint_weight": 1})
