"""Distillation losses and a teacher that runs in ONNX Runtime.

The loss is `alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T)) + (1 - alpha) * CE(labels)` on
class scores, the soft term alone without labels; outputs that are not class scores (embeddings,
regressions, detection maps) are matched by mean squared error or cosine distance instead.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from workers.prune.algorithms.finetune import cross_entropy, output_tensors

OUTPUT_LOSSES = ("auto", "kl", "mse", "cosine")
Loss = Callable[[Any, Any, torch.Tensor | None], torch.Tensor]


def kd_loss(*, temperature: float, alpha: float, output_loss: str) -> Loss:
    """A `(student_outputs, teacher_outputs, labels) -> loss` callable for workers.prune.algorithms.finetune."""
    if output_loss not in OUTPUT_LOSSES:
        raise ValueError(f"output_loss must be one of {', '.join(OUTPUT_LOSSES)}")

    def loss(student_outputs: Any, teacher_outputs: Any, labels: torch.Tensor | None) -> torch.Tensor:
        students, teachers = output_tensors(student_outputs), output_tensors(teacher_outputs)
        soft = torch.stack([soft_loss(s.float(), t.float(), output_loss, temperature)
                            for s, t in zip(students, teachers)]).mean()
        if labels is None:
            return soft
        return alpha * soft + (1.0 - alpha) * cross_entropy(students, labels)

    return loss


def soft_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str, temperature: float) -> torch.Tensor:
    if kind == "auto":
        kind = "kl" if student.dim() == 2 else "mse"
    if kind == "kl":
        if student.is_cuda and not teacher.requires_grad:
            import kernels  # fused loss + gradient in one kernel, no [rows x classes] softmax tensors kept

            return kernels.kd_loss(student, teacher, temperature)
        # KL over the last axis (classes); batchmean over everything before it.
        rows = student.reshape(-1, student.shape[-1]), teacher.reshape(-1, teacher.shape[-1])
        return nn.functional.kl_div(
            nn.functional.log_softmax(rows[0] / temperature, dim=-1),
            nn.functional.log_softmax(rows[1] / temperature, dim=-1),
            reduction="batchmean", log_target=True,
        ) * temperature ** 2
    if kind == "cosine":
        count = student.shape[0]
        return (1.0 - nn.functional.cosine_similarity(student.reshape(count, -1), teacher.reshape(count, -1),
                                                      dim=1, eps=1e-8)).mean()
    return nn.functional.mse_loss(student, teacher)


class OnnxRuntimeTeacher:
    """A teacher that cannot become a PyTorch module: called like one, it runs the ONNX file in ONNX Runtime
    (it needs no gradients) and hands back float32 tensors on the inputs' device."""

    def __init__(self, path: Path) -> None:
        from workers.bridge.check import session

        self.session = session(Path(path))
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.input_types = {i.name: _numpy_type(i.type) for i in self.session.get_inputs()}

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        device = inputs[0].device if inputs else torch.device("cpu")
        from workers.bridge.batching import run_in_batches

        feeds = {name: np.ascontiguousarray(t.detach().cpu().numpy().astype(self.input_types[name], copy=False))
                 for name, t in zip(self.input_names, inputs)}
        produced = run_in_batches(self.session, feeds, self.output_names)  # at the model's fixed batch, if any
        return tuple(torch.from_numpy(np.asarray(p, dtype=np.float32)).to(device) for p in produced)


def _numpy_type(ort_type: str) -> np.dtype:
    from workers.onnx_tools.inputs import ORT_DTYPES

    return np.dtype(ORT_DTYPES[ort_type])
