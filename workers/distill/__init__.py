"""Knowledge distillation. Method: kd (distill.kd). Algorithms: repeated-block detection for shallower students
(blocks), and the distillation losses (losses).

`workers.distill.blocks` reads ONNX only; `workers.distill.losses` needs torch.
"""
from __future__ import annotations
