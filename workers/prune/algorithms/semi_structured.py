"""N:M semi-structured sparsity (2:4 by default): at most n non-zeros in each group of m consecutive weights.

Groups run along the input (reduction) dimension, the layout NVIDIA's sparse tensor cores (Ampere and
later) read: a 2:4 matrix multiply there does half the work. Only matmul-shaped weights qualify: Linear
weights and 1x1 convolutions. No CPU kernel exploits the pattern, so on CPU the model only gets zeros.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from app.errors import StepFailed
from workers.prune.algorithms.magnitude import WeightedLayer, weighted_layers

NO_CUDA_REASON = "no CUDA device: 2:4 sparsity needs sparse tensor cores; no CPU speedup is expected"


def _matrix(layer: WeightedLayer) -> tuple[torch.Tensor | None, str | None]:
    """The weight as [out, in] (a view), or None and why the layer does not qualify."""
    weight = layer.weight
    if isinstance(layer, nn.Linear):
        return weight, None
    if isinstance(layer, nn.Conv2d) and tuple(layer.kernel_size) == (1, 1):
        return weight.view(weight.shape[0], weight.shape[1]), None
    kernel = "x".join(map(str, getattr(layer, "kernel_size", ())))
    return None, f"{type(layer).__name__} with a {kernel} kernel: only Linear and 1x1 Conv2d weights are matmuls"


@torch.no_grad()
def nm_masks(module: nn.Module, n: int = 2, m: int = 4,
             ignored_layers: Iterable[str] = ()) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(masks, skipped): masks keep the n largest |w| of each m consecutive input weights; skipped says why not."""
    if not 0 < n < m:
        raise StepFailed(f"n:m sparsity needs 0 < n < m, got {n}:{m}", code="invalid_params")
    masks: dict[str, torch.Tensor] = {}
    skipped: dict[str, str] = {}
    for name, layer in weighted_layers(module, ignored_layers).items():
        matrix, reason = _matrix(layer)
        if matrix is None:
            skipped[name] = reason or "not a matmul weight"
            continue
        rows, cols = matrix.shape
        if cols % m:
            skipped[name] = f"input dimension {cols} is not divisible by {m}"
            continue
        if matrix.is_cuda and m in (4, 8, 16):
            import kernels  # the CUDA kernel; equal magnitudes keep the lower index

            masks[name] = kernels.nm_mask(matrix.detach(), n, m).reshape(layer.weight.shape)
            continue
        groups = matrix.detach().abs().float().reshape(rows, cols // m, m)
        keep = torch.zeros_like(groups, dtype=torch.bool)
        keep.scatter_(2, groups.topk(n, dim=2).indices, True)
        masks[name] = keep.reshape(layer.weight.shape)
    return masks, skipped


@torch.no_grad()
def check_pattern(module: nn.Module, n: int = 2, m: int = 4) -> dict[str, Any]:
    """Per qualifying layer, the fraction of m-groups with at most n non-zeros; and over all of them."""
    layers: dict[str, dict[str, Any]] = {}
    groups_total = satisfied_total = 0
    for name, layer in weighted_layers(module).items():
        matrix, _reason = _matrix(layer)
        if matrix is None or matrix.shape[1] % m:
            continue
        rows, cols = matrix.shape
        nonzeros = (matrix.reshape(rows, cols // m, m) != 0).sum(dim=2)
        groups, satisfied = nonzeros.numel(), int((nonzeros <= n).sum())
        layers[name] = {"groups": groups, "satisfying": satisfied, "fraction": satisfied / groups if groups else 1.0}
        groups_total += groups
        satisfied_total += satisfied
    return {"pattern": f"{n}:{m}", "layers": layers,
            "fraction": satisfied_total / groups_total if groups_total else 1.0}


def linear_shapes(module: nn.Module) -> list[tuple[int, int]]:
    """(out, in) of each qualifying Linear / 1x1 conv weight, once per distinct shape."""
    shapes: list[tuple[int, int]] = []
    for layer in weighted_layers(module).values():
        matrix, _reason = _matrix(layer)
        if matrix is not None and (matrix.shape[0], matrix.shape[1]) not in shapes:
            shapes.append((matrix.shape[0], matrix.shape[1]))
    return shapes


def cuda_semi_structured_speedup(module_or_linear_shapes: nn.Module | Sequence[tuple[int, int]], *,
                                 tokens: int = 4096, repeats: int = 50) -> dict[str, Any]:
    """Time dense vs 2:4 sparse fp16 matmuls for the model's weight shapes on the GPU; ratios > 1 are speedups.

    `tokens` is the row count of the activation (batch x sequence). Shapes the sparse kernels refuse (too
    small, not multiples of their tile) are listed with the reason.
    """
    if not torch.cuda.is_available():
        return {"available": False, "reason": NO_CUDA_REASON}
    from torch.sparse import to_sparse_semi_structured

    shapes = (linear_shapes(module_or_linear_shapes) if isinstance(module_or_linear_shapes, nn.Module)
              else [tuple(shape) for shape in module_or_linear_shapes])
    device = torch.device("cuda")
    results = []
    dense_total = sparse_total = 0.0
    for out_features, in_features in shapes:
        entry: dict[str, Any] = {"shape": [out_features, in_features]}
        try:
            weight = torch.randn(out_features, in_features, dtype=torch.float16, device=device)
            keep = torch.zeros_like(weight, dtype=torch.bool).view(out_features, -1, 4)
            keep.scatter_(2, weight.abs().view(out_features, -1, 4).topk(2, dim=2).indices, True)
            weight = weight * keep.view_as(weight)
            sparse = to_sparse_semi_structured(weight)
            x = torch.randn(tokens, in_features, dtype=torch.float16, device=device)
            dense_ms = _time_ms(lambda x=x, weight=weight: torch.nn.functional.linear(x, weight), repeats)
            sparse_ms = _time_ms(lambda x=x, sparse=sparse: torch.nn.functional.linear(x, sparse), repeats)
        except Exception as exc:  # shape or kernel refused: report, go on with the others
            entry["error"] = " ".join(str(exc).split())[:200]
            results.append(entry)
            continue
        entry.update(dense_ms=round(dense_ms, 4), sparse_ms=round(sparse_ms, 4), speedup=round(dense_ms / sparse_ms, 3))
        dense_total += dense_ms
        sparse_total += sparse_ms
        results.append(entry)
    return {
        "available": True,
        "device": torch.cuda.get_device_name(device),
        "tokens": tokens,
        "layers": results,
        "speedup": round(dense_total / sparse_total, 3) if sparse_total else None,
    }


def _time_ms(fn, repeats: int) -> float:
    for _ in range(5):
        fn()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        fn()
    stop.record()
    torch.cuda.synchronize()
    return start.elapsed_time(stop) / repeats
