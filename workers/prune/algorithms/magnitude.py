"""Unstructured magnitude pruning: the smallest weights of Conv/Linear layers are set to zero.

The tensors keep their shapes, so the model is no faster on dense kernels; what shrinks is the compressed
file (runs of zeros compress well) and, with sparse runtimes, the work. Masks are kept so that fine-tuning
can re-zero the pruned weights after every optimizer step, and recomputed for gradual pruning
(Zhu & Gupta, "To prune, or not to prune", 2017: the polynomial schedule below).
"""
from __future__ import annotations

import gzip
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from app.errors import StepFailed

Scope = Literal["global", "layer"]
GZIP_LEVEL = 9
ZSTD_LEVEL = 19


WeightedLayer = nn.modules.conv._ConvNd | nn.Linear


def weighted_layers(module: nn.Module, ignored_layers: Iterable[str] = ()) -> dict[str, WeightedLayer]:
    """Conv*/Linear layers by name (each module once), less the ignored ones; unknown names are refused."""
    ignored = list(ignored_layers)
    known = dict(module.named_modules())
    unknown = [name for name in ignored if name not in known or name == ""]
    layers: dict[str, WeightedLayer] = {}
    seen: set[int] = set()
    for name, layer in known.items():
        if isinstance(layer, (nn.modules.conv._ConvNd, nn.Linear)) and id(layer) not in seen:
            seen.add(id(layer))
            if name not in ignored:
                layers[name] = layer
    if unknown:
        valid = [name for name, layer in known.items() if isinstance(layer, (nn.modules.conv._ConvNd, nn.Linear))]
        raise StepFailed(
            f"ignored_layers names no layer of the model: {', '.join(map(repr, unknown))}; name a layer by its "
            f"ONNX node or by its module name, such as {', '.join(map(repr, valid[:8]))}",
            code="invalid_params",
        )
    return layers


@torch.no_grad()
def magnitude_masks(module: nn.Module, sparsity: float, scope: Scope = "global",
                    ignored_layers: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """Boolean masks (True = kept) zeroing the `sparsity` fraction of smallest |w| of each Conv/Linear weight.

    "global" ranks all weights together (layers with many small weights lose more), "layer" gives every
    layer the same sparsity. Biases and norm layers are never masked.
    """
    if not 0.0 <= sparsity < 1.0:
        raise StepFailed(f"sparsity must be in [0, 1), got {sparsity}", code="invalid_params")
    if scope not in ("global", "layer"):
        raise StepFailed(f"scope must be 'global' or 'layer', got {scope!r}", code="invalid_params")
    layers = weighted_layers(module, ignored_layers)
    if not layers:
        raise StepFailed("the model has no Conv or Linear weight to prune", code="nothing_to_prune")
    if scope == "layer":
        return {name: _keep_largest(layer.weight.detach().abs(), sparsity) for name, layer in layers.items()}
    weights = [layer.weight.detach() for layer in layers.values()]
    if all(w.is_cuda for w in weights) and len({w.device for w in weights}) == 1:
        # On the GPU: a radix select over the weights where they are (kernels.magnitude_threshold), the same
        # k-th value kthvalue gives, without copying them all into one tensor on the CPU.
        import kernels

        count = int(round(sparsity * sum(w.numel() for w in weights)))
        threshold = kernels.magnitude_threshold(weights, count) if count else torch.tensor(-1.0)
    else:
        scores = torch.cat([w.abs().flatten().float().cpu() for w in weights])
        threshold = _threshold(scores, sparsity)
    return {name: layer.weight.detach().abs() > threshold.to(layer.weight.device) for name, layer in layers.items()}


def _threshold(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    count = int(round(sparsity * scores.numel()))
    if count == 0:
        return torch.tensor(-1.0)
    return scores.kthvalue(count).values


def _keep_largest(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    flat = scores.flatten().float()
    count = int(round(sparsity * flat.numel()))
    mask = torch.ones_like(flat, dtype=torch.bool)
    if count:
        # Exactly `count` zeros per layer, ties broken by position, so each layer hits its sparsity.
        mask[flat.topk(count, largest=False).indices] = False
    return mask.view_as(scores)


class Masks:
    """Weight masks applied in place; re-apply after each optimizer step so pruned weights stay zero.

    Built with `from_magnitude`, it remembers its scope and ignored layers and can `recompute` at a new
    sparsity (gradual pruning).
    """

    def __init__(self, module: nn.Module, masks: dict[str, torch.Tensor], *, scope: Scope | None = None,
                 ignored_layers: Iterable[str] = (), sparsity: float | None = None) -> None:
        self.module = module
        self.masks = masks
        self.scope = scope
        self.ignored_layers = list(ignored_layers)
        self.sparsity = sparsity

    @classmethod
    def from_magnitude(cls, module: nn.Module, sparsity: float, scope: Scope = "global",
                       ignored_layers: Iterable[str] = ()) -> Masks:
        ignored = list(ignored_layers)
        return cls(module, magnitude_masks(module, sparsity, scope, ignored), scope=scope, ignored_layers=ignored,
                   sparsity=sparsity)

    def recompute(self, sparsity: float) -> None:
        """New magnitude masks at `sparsity` from the current weights (needs from_magnitude's settings)."""
        if self.scope is None:
            raise ValueError("these masks were not built by magnitude: build new Masks instead")
        self.masks = magnitude_masks(self.module, sparsity, self.scope, self.ignored_layers)
        self.sparsity = sparsity
        self.apply()

    @torch.no_grad()
    def apply(self) -> None:
        layers = dict(self.module.named_modules())
        for name, mask in self.masks.items():
            weight = layers[name].weight
            if mask.device != weight.device:  # moved once, not on every step
                mask = self.masks[name] = mask.to(weight.device)
            weight.mul_(mask)


def polynomial_sparsity(step: int, *, initial: float, final: float, begin_step: int, end_step: int,
                        power: float = 3) -> float:
    """Sparsity at `step`, as TF Model Optimization's PolynomialDecay: fast at first, flat near the end."""
    if end_step <= begin_step:
        return final if step >= begin_step else initial
    progress = min(max((step - begin_step) / (end_step - begin_step), 0.0), 1.0)
    return final + (initial - final) * (1.0 - progress) ** power


@torch.no_grad()
def sparsity_report(module: nn.Module, ignored_layers: Iterable[str] = ()) -> dict[str, Any]:
    """Zeros in each Conv/Linear weight and over all of them."""
    layers = {}
    params = zeros = 0
    for name, layer in weighted_layers(module, ignored_layers).items():
        n = layer.weight.numel()
        z = int((layer.weight == 0).sum())
        layers[name] = {"params": n, "zeros": z, "sparsity": z / n if n else 0.0}
        params += n
        zeros += z
    return {"layers": layers, "total": {"params": params, "zeros": zeros, "sparsity": zeros / params if params else 0.0}}


def compressed_sizes(path: Path) -> dict[str, Any]:
    """Sizes in bytes of an ONNX file raw, gzipped (level 9) and zstd-compressed (level 19, if installed)."""
    data = Path(path).read_bytes()
    sizes: dict[str, Any] = {"raw": len(data), "gzip": len(gzip.compress(data, compresslevel=GZIP_LEVEL))}
    try:
        import zstandard
    except ImportError:
        sizes["zstd"] = None
        sizes["zstd_reason"] = "the zstandard package is not installed on this worker"
    else:
        sizes["zstd"] = len(zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(data))
    return sizes
