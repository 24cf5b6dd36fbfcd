"""Knowledge distillation: repeated-block detection for shallower students, and the distillation losses.

`workers.distill.blocks` reads ONNX only; `workers.distill.losses` needs torch.
"""
from __future__ import annotations
