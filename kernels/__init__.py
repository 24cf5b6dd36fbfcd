"""Native CUDA kernels for the workers' heavy loops, each with the pure-PyTorch reference that runs elsewhere.

    import kernels
    packed, scales, zero_points = kernels.quantize_blockwise(w, bits=4, block_size=32, symmetric=True)
    threshold = kernels.magnitude_threshold([layer.weight for layer in layers], k)
    mask = kernels.nm_mask(w, 2, 4)
    loss = kernels.kd_loss(student_logits, teacher_logits, temperature=2.0)   # loss.backward() works
    centroids, labels, inertia = kernels.kmeans_1d(values, initial_centroids, iterations=30)
    kernels.backend()   # which implementation each op uses here, and why

The ops are torch.library custom ops (torch.ops.modelpress.*): on CUDA tensors they run the kernels of
kernels/build/libmodelpress_kernels.so (`make kernels`) when it is built and usable, on every other device (and
without the library) the references in kernels/reference.py. Importing this package never fails for want of
CUDA or of the library. It imports nothing of app or workers.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from kernels import _native, ops

__all__ = ["backend", "kd_loss", "kmeans_1d", "magnitude_threshold", "nm_mask", "quantize_blockwise"]


def backend() -> dict[str, Any]:
    """{"library": path or None, "reason": why the CUDA kernels are not in use (or None), "cuda": bool,
    "ops": {op: "cuda" | "reference"}}: what a CUDA tensor gets; CPU tensors always get the reference."""
    cuda = torch.cuda.is_available()
    reason = ops.native_reason()
    if reason is None and not cuda:
        reason = "no CUDA device: the ops run their PyTorch references"
    native = reason is None
    return {
        "library": str(_native.PATH) if _native.LIBRARY is not None else None,
        "reason": reason,
        "cuda": cuda,
        "ops": dict.fromkeys(ops.OPS, "cuda" if native else "reference"),
    }


def quantize_blockwise(weight: torch.Tensor, bits: int = 4, block_size: int = 32, symmetric: bool = True,
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed uint8 [N, blocks, block_size*bits/8], scales [N, blocks], zero_points uint8) of a [K, N] weight,
    blocked along K: the inputs B, scales and zero_points of com.microsoft.MatMulNBits, with the codes of ONNX
    Runtime's RTN quantizer. Symmetric blocks need no zero_points input (those returned are the implied ones)."""
    return ops.quantize_blockwise(weight, bits, block_size, symmetric)


def magnitude_threshold(tensors: Sequence[torch.Tensor], k: int, largest: bool = False) -> torch.Tensor:
    """The k-th smallest |w| (1-based, as torch.kthvalue; the k-th largest with largest=True) over all the
    tensors, as a float32 scalar on their device, without concatenating them."""
    return ops.magnitude_threshold(list(tensors), k, largest)


def nm_mask(weight: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """Bool mask keeping the n largest |w| of every m consecutive weights along the last dimension (m 4, 8 or 16;
    equal magnitudes: the lower index is kept)."""
    return ops.nm_mask(weight, n, m)


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)), batch mean over all rows of [..., classes] logits, as
    workers.distill.losses computes it; differentiable wrt the student (the teacher is a constant target)."""
    with_grad = torch.is_grad_enabled() and student.requires_grad
    if with_grad and teacher.requires_grad:
        raise ValueError("kd_loss treats the teacher's logits as constant targets: pass teacher.detach()")
    loss, _grad = ops.kd_loss(student, teacher, float(temperature), with_grad)
    return loss


def kmeans_1d(values: torch.Tensor, centroids: torch.Tensor, iterations: int,
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(centroids float32 [k] sorted, labels uint8 shaped like values, inertia float32) of Lloyd's 1-D k-means
    started from `centroids` (k <= 256), stopping early once no centroid moves. Labels are uint8: call .long()
    before indexing with them."""
    return ops.kmeans_1d(values, centroids, iterations)
