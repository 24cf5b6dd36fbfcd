"""Pruning: structured channel removal, unstructured and 2:4 masks, and the fine-tuning that recovers accuracy.

Everything here works on a torch.nn.Module (the ONNX bridge converts to and from it); nothing reads ONNX
except `compressed_sizes`, which measures a file on disk.
"""
from __future__ import annotations

from workers.prune.algorithms.channels import prune_channels
from workers.prune.algorithms.finetune import finetune
from workers.prune.algorithms.magnitude import Masks, compressed_sizes, magnitude_masks, polynomial_sparsity, sparsity_report
from workers.prune.algorithms.semi_structured import check_pattern, cuda_semi_structured_speedup, linear_shapes, nm_masks

__all__ = [
    "Masks",
    "check_pattern",
    "compressed_sizes",
    "cuda_semi_structured_speedup",
    "finetune",
    "linear_shapes",
    "magnitude_masks",
    "nm_masks",
    "polynomial_sparsity",
    "prune_channels",
    "sparsity_report",
]
