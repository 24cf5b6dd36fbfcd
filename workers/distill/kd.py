"""distill.kd: knowledge distillation of the job's model (the teacher) into a smaller student.

The student is an uploaded model with the same inputs and output shapes, or is derived from the teacher:
"width" prunes every prunable layer's channels (workers.prune.algorithms.prune_channels), "depth" keeps every k-th of
the teacher's repeated blocks (transformer layers, residual blocks), found in the ONNX graph by
workers.distill.blocks, initialised from the teacher's weights as DistilBERT does. The student then trains on
the teacher's softened outputs (and the labels, when the data has them) with the fine-tuning loop of
workers.prune.algorithms.finetune. A teacher that cannot be converted to PyTorch runs in ONNX Runtime instead: it
needs no gradients.
"""
from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.catalog.distill.kd import DistillParams
from app.errors import StepFailed
from workers.methods import implements
from workers.methods.base import StepContext, StepOutput

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

EVAL_BATCH = 256


@implements("distill.kd")
def run(input_path: Path, params: DistillParams, out_dir: Path, ctx: StepContext) -> StepOutput:
    import torch

    from workers import bridge
    from workers.distill.losses import kd_loss
    from workers.prune.algorithms import finetune

    train = ctx.datasets.get("train_dataset_id")
    if train is None:
        raise StepFailed("distillation needs training data: set train_dataset_id", code="dataset_required")
    eval_data = ctx.datasets.get("eval_dataset_id")
    sample = train.take(bridge.CHECK_SAMPLES).inputs
    teacher, teacher_bridged, details = _teacher(input_path, sample, ctx)
    if teacher_bridged is None and params.student == "width":
        # A width student is the converted teacher with fewer channels: nothing to prune without a module.
        raise StepFailed(f"a width student is pruned from the teacher converted to PyTorch, and it cannot be "
                         f"converted ({details['teacher']['reason']}); upload a student (student 'model')",
                         code="unsupported_op")

    with tempfile.TemporaryDirectory(prefix="distill-") as scratch:
        if params.student == "width":
            student, student_bridged = _width_student(teacher_bridged, sample, details, params, ctx)
        elif params.student == "depth":
            student, student_bridged = _depth_student(input_path, Path(scratch), sample, details, params, ctx)
        else:
            student, student_bridged = _uploaded_student(input_path, ctx, sample, details)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    student.to(device)
    if isinstance(teacher, torch.nn.Module):
        teacher.to(device)
    epochs = params.epochs

    def on_epoch(entry: dict[str, Any]) -> None:
        metric = entry.get("eval_metric")
        shown = f", {entry.get('metric_name', 'metric')} {metric:.4f}" if isinstance(metric, float) else ""
        ctx.report(0.2 + 0.7 * entry["epoch"] / epochs,
                   f"distillation epoch {entry['epoch']}/{epochs}: loss {entry['train_loss']:.4f}{shown} "
                   f"({entry['seconds']:.1f} s)", milestone=True)

    ctx.report(0.2, f"distilling into the {params.student} student")
    details["loss"] = {"temperature": params.temperature, "alpha": params.alpha, "output_loss": params.output_loss,
                       "labels": train.labels is not None}
    loss = kd_loss(temperature=params.temperature, alpha=params.alpha, output_loss=params.output_loss)
    hints = None
    if params.hint_weight:
        hints = _hints(teacher, student, details, params)
        loss = hints.wrap(loss, params.hint_weight)
    # Models exported at a fixed batch that no rewrite frees are fed that batch at a time (workers.bridge.batching);
    # a teacher in ONNX Runtime splits its inputs itself.
    details["batch"] = {"student": student_bridged.batch}
    if teacher_bridged is not None:
        details["batch"]["teacher"] = teacher_bridged.batch
        teacher_fed = bridge.for_training(teacher, teacher_bridged.batch)
    else:
        teacher_fed = teacher
    try:
        details["training"] = finetune(
            bridge.for_training(student, student_bridged.batch), train=train, eval=eval_data,
            input_names=student_bridged.input_names,
            teacher=_in_order(teacher_fed, student_bridged.input_names, details["teacher"]["input_names"]),
            loss=loss, epochs=epochs, lr=params.lr, batch_size=params.batch_size, weight_decay=params.weight_decay,
            patience=params.patience, on_epoch=on_epoch, should_stop=ctx.should_stop, seed=ctx.seed,
        )
    finally:
        if hints is not None:
            hints.remove()
    student.to("cpu")
    if isinstance(teacher, torch.nn.Module):
        teacher.to("cpu")

    ctx.report(0.93, "exporting the student to ONNX")
    dst = out_dir / "model.onnx"
    details["export"] = bridge.to_onnx(student, student_bridged, dst, sample=sample)
    details["params"] = _params(input_path, dst)
    details["eval"] = _evaluate(input_path, dst, eval_data if eval_data is not None else train,
                                "eval" if eval_data is not None else "train")
    return StepOutput(model_path=dst, details=details)


# --- teacher and students -------------------------------------------------------------------------------

def _teacher(input_path: Path, sample: dict[str, np.ndarray], ctx: StepContext):
    """(teacher callable, its Bridged or None, details): a frozen PyTorch module, or ONNX Runtime when the
    model cannot be converted."""
    from workers import bridge
    from workers.distill.losses import OnnxRuntimeTeacher

    ctx.report(0.02, "converting the teacher to PyTorch")
    started = time.perf_counter()
    try:
        bridged = bridge.to_torch(input_path, sample=sample, shapes=ctx.input_shapes)
    except (bridge.UnsupportedOp, bridge.ConversionMismatch) as exc:
        runner = OnnxRuntimeTeacher(input_path)
        return runner, None, {"teacher": {
            "runtime": "onnxruntime", "input_names": runner.input_names, "output_names": runner.output_names,
            "reason": f"{exc.code}: {exc}",
        }}
    module = copy.deepcopy(bridged.module).eval()
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    return module, bridged, {"teacher": {
        "runtime": "pytorch", "input_names": bridged.input_names, "output_names": bridged.output_names,
        "conversion": {"check": bridged.check, "notes": bridged.notes,
                       "seconds": round(time.perf_counter() - started, 3)},
    }}


def _width_student(teacher_bridged, sample: dict[str, np.ndarray], details: dict[str, Any], params: DistillParams,
                   ctx: StepContext):
    import numpy as np
    import torch

    from workers.prune.algorithms import prune_channels

    student = teacher_bridged.module          # the teacher is a copy of its own
    count = teacher_bridged.micro_batch or 2  # Torch-Pruning's trace: a fixed-batch module takes its batch only
    example = tuple(torch.from_numpy(np.ascontiguousarray(sample[n][:count].astype(teacher_bridged.input_dtypes[n])))
                    for n in teacher_bridged.input_names)
    ctx.report(0.08, f"removing {params.width_ratio:.0%} of every layer's channels")
    details["student"] = {"kind": "width", "how": f"the teacher with {params.width_ratio:.0%} of every prunable "
                          "layer's channels removed (l2 ranking), heads kept whole, initialised from its weights",
                          "pruning": prune_channels(student, example, ratio=params.width_ratio,
                                                    round_to=params.round_to, keep_head=True)}
    return student, teacher_bridged


def _depth_student(input_path: Path, scratch: Path, sample: dict[str, np.ndarray], details: dict[str, Any],
                   params: DistillParams, ctx: StepContext):
    import onnx

    from workers import bridge
    from workers.distill.blocks import drop_blocks, find_blocks

    ctx.report(0.05, "looking for repeated blocks")
    model = onnx.load(str(input_path))
    found = find_blocks(model)
    if not found.blocks:
        raise StepFailed(f"found no run of repeated blocks to thin out: searched {found.searched}. A depth student "
                         "needs a stack of identical layers (transformer layers, residual blocks); try student "
                         "'width' or an uploaded student", code="no_repeated_blocks")
    keep = list(range(0, len(found.blocks), params.keep_every))
    path = scratch / "student.onnx"
    onnx.save(drop_blocks(model, found.blocks, keep), str(path))
    ctx.report(0.12, f"kept blocks {keep} of {len(found.blocks)}; converting the student to PyTorch")
    student_bridged = bridge.to_torch(path, sample=sample, shapes=ctx.input_shapes)
    producers = {out: node.name for node in model.graph.node for out in node.output}
    details["student"] = {"kind": "depth", "how": f"the teacher keeping every {params.keep_every}th of its "
                          f"{len(found.blocks)} repeated blocks, with their weights",
                          "blocks": found.summary(), "kept_blocks": keep,
                          "block_outputs": [{"tensor": b.output, "node": producers.get(b.output, "")}
                                            for b in found.blocks],
                          "conversion": {"check": student_bridged.check, "notes": student_bridged.notes}}
    return student_bridged.module, student_bridged


class _Hints:
    """Forward hooks that keep the block outputs a hint loss compares, teacher's and student's, per forward."""

    def __init__(self, pairs: list[tuple[Any, Any]]) -> None:
        self.captured: dict[int, Any] = {}
        self.pairs = []
        self.handles = []
        for teacher_module, student_module in pairs:
            self.pairs.append((id(teacher_module), id(student_module)))
            for module in (teacher_module, student_module):
                self.handles.append(module.register_forward_hook(self._keep))

    def _keep(self, module, _inputs, output) -> None:
        self.captured[id(module)] = output[0] if isinstance(output, tuple) else output

    def wrap(self, loss, weight: float):
        import torch

        def with_hints(student_outputs, teacher_outputs, labels):
            terms = []
            for teacher_id, student_id in self.pairs:
                taught, learnt = self.captured.get(teacher_id), self.captured.get(student_id)
                if taught is None or learnt is None or taught.shape != learnt.shape:
                    continue
                count = learnt.shape[0]
                terms.append(1.0 - torch.nn.functional.cosine_similarity(
                    learnt.float().reshape(count, -1), taught.detach().float().reshape(count, -1), dim=1).mean())
            total = loss(student_outputs, teacher_outputs, labels)
            return total + weight * torch.stack(terms).mean() if terms else total

        return with_hints

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _hints(teacher, student, details: dict[str, Any], params: DistillParams) -> _Hints:
    """Pairs (teacher module, student module) producing the outputs a hint loss aligns: kept block j of the
    student stands in for teacher blocks j*k .. j*k+k-1, so its output is matched to the last of those."""
    import torch

    from workers import bridge

    if not isinstance(teacher, torch.nn.Module):
        raise StepFailed("hint_weight needs the teacher as a PyTorch module, and it runs in ONNX Runtime "
                         f"({details['teacher'].get('reason')}); set hint_weight to 0", code="invalid_params")
    outputs = details["student"]["block_outputs"]   # tensor name and producing node per teacher block
    kept = details["student"]["kept_blocks"]
    teacher_modules, student_modules = dict(teacher.named_modules()), dict(student.named_modules())
    pairs, missing = [], []
    for position, block in enumerate(kept):
        last = min(block + params.keep_every - 1, len(outputs) - 1)
        teacher_name = bridge.module_name(outputs[last]["node"])
        student_name = bridge.module_name(outputs[block]["node"])
        if teacher_name in teacher_modules and student_name in student_modules:
            pairs.append((teacher_modules[teacher_name], student_modules[student_name]))
        else:
            missing.append(position)
    details["loss"]["hints"] = {"weight": params.hint_weight, "pairs": len(pairs),
                                "matched": [{"student_block": b, "teacher_block": min(b + params.keep_every - 1,
                                                                                      len(outputs) - 1)}
                                            for i, b in enumerate(kept) if i not in missing]}
    if not pairs:
        raise StepFailed("no block output of the student could be matched to the teacher's for the hint loss "
                         "(the converted modules do not carry the blocks' output nodes); set hint_weight to 0",
                         code="invalid_params")
    return _Hints(pairs)


def _uploaded_student(input_path: Path, ctx: StepContext, sample: dict[str, np.ndarray], details: dict[str, Any]):
    import dataclasses

    from workers import bridge

    path = ctx.models.get("student_model_id")
    if path is None:
        raise StepFailed("student 'model' needs the uploaded student (student_model_id), and the step got none",
                         code="model_required")
    _check_student(input_path, Path(path), sample)
    ctx.report(0.1, "converting the student to PyTorch")
    student_bridged = bridge.to_torch(Path(path), sample=sample, shapes=ctx.input_shapes)
    teacher_outputs = details["teacher"]["output_names"]
    # The result stands in for the teacher in the job: it keeps the teacher's output names.
    renamed = dataclasses.replace(
        student_bridged, output_names=list(teacher_outputs),
        output_shapes=dict(zip(teacher_outputs, [student_bridged.output_shapes.get(n, [])
                                                 for n in student_bridged.output_names])),
    )
    details["student"] = {"kind": "model", "how": "the uploaded student model", "output_names": {
        "student": student_bridged.output_names, "exported_as": list(teacher_outputs)},
        "conversion": {"check": student_bridged.check, "notes": student_bridged.notes}}
    return student_bridged.module, renamed


def _check_student(teacher_path: Path, student_path: Path, sample: dict[str, np.ndarray]) -> None:
    """The student must take the teacher's inputs and give as many outputs of the same shapes."""
    import numpy as np

    from workers.bridge.batching import run_in_batches
    from workers.bridge.check import session

    teacher, student = session(teacher_path), session(student_path)
    wanted = {i.name: i.type for i in teacher.get_inputs()}
    taken = {i.name: i.type for i in student.get_inputs()}
    problems = []
    if set(wanted) != set(taken):
        missing, extra = sorted(set(wanted) - set(taken)), sorted(set(taken) - set(wanted))
        problems.append("inputs differ: " + "; ".join(
            ([f"the student lacks {', '.join(map(repr, missing))}"] if missing else [])
            + ([f"the student also takes {', '.join(map(repr, extra))}"] if extra else [])))
    else:
        problems += [f"input '{n}' is {taken[n]} in the student and {wanted[n]} in the teacher"
                     for n in wanted if taken[n] != wanted[n]]
    if not problems:
        feeds = {n: np.ascontiguousarray(sample[n][:2]) for n in wanted}
        expected = [np.shape(o) for o in run_in_batches(teacher, feeds)]
        produced = [np.shape(o) for o in run_in_batches(student, feeds)]
        if len(expected) != len(produced):
            problems.append(f"the teacher gives {len(expected)} outputs and the student {len(produced)}")
        else:
            names = [o.name for o in teacher.get_outputs()]
            problems += [f"output '{name}' is {list(e)} from the teacher and {list(p)} from the student (on 2 samples)"
                         for name, e, p in zip(names, expected, produced) if e != p]
    if problems:
        raise StepFailed("the student model does not fit the teacher: " + "; ".join(problems),
                         code="student_mismatch")


def _in_order(teacher, student_names: list[str], teacher_names: list[str]):
    """The teacher called with the student's positional inputs, reordered to its own."""
    if list(student_names) == list(teacher_names):
        return teacher
    order = [student_names.index(name) for name in teacher_names]
    return lambda *inputs: teacher(*[inputs[i] for i in order])


# --- report ---------------------------------------------------------------------------------------------

def _params(teacher_path: Path, student_path: Path) -> dict[str, Any]:
    """Weights of each, counted alike (shape constants of the graph are not parameters)."""
    from workers.onnx_tools.counting import count

    teacher, student = count(teacher_path)["params"], count(student_path)["params"]
    return {"teacher": teacher, "student": student, "ratio": student / teacher if teacher else None}


def _evaluate(teacher_path: Path, student_path: Path, data, role: str) -> dict[str, Any]:
    """Both files in ONNX Runtime: top-1 accuracy on the first output with labels, else the student's mean
    per-sample cosine to the teacher over all outputs."""
    import numpy as np

    from workers.bridge.batching import run_in_batches
    from workers.bridge.check import session

    runners = [session(teacher_path), session(student_path)]
    names = [[i.name for i in r.get_inputs()] for r in runners]
    correct, cosine_sum, count = [0, 0], 0.0, 0
    for start in range(0, len(data), EVAL_BATCH):
        outputs = []
        for runner, inputs in zip(runners, names):
            feeds = {n: np.ascontiguousarray(data.inputs[n][start:start + EVAL_BATCH]) for n in inputs}
            outputs.append(run_in_batches(runner, feeds))  # at the model's fixed batch, if it has one
        if data.labels is not None:
            labels = np.asarray(data.labels[start:start + EVAL_BATCH])
            for index, produced in enumerate(outputs):
                correct[index] += int((np.asarray(produced[0]).argmax(axis=1) == labels).sum())
        else:
            for t, s in zip(*outputs):
                rows = len(t)
                t, s = np.asarray(t, np.float64).reshape(rows, -1), np.asarray(s, np.float64).reshape(rows, -1)
                norms = np.maximum(np.linalg.norm(t, axis=1) * np.linalg.norm(s, axis=1), 1e-12)
                cosine_sum += float(((t * s).sum(axis=1) / norms).sum())
                count += rows
    if data.labels is not None:
        return {"metric": "accuracy", "dataset": role, "samples": len(data),
                "teacher": correct[0] / len(data) if len(data) else 0.0,
                "student": correct[1] / len(data) if len(data) else 0.0}
    return {"metric": "cosine_to_teacher", "dataset": role, "samples": len(data), "teacher": 1.0,
            "student": cosine_sum / count if count else 0.0}
