"""Quantization methods, one module per method, and the ONNX rewrites they share.

Methods: int8_dynamic (quantize.int8_dynamic), int8_static (quantize.int8_static), int4_weight_only
(quantize.int4_weight_only), fp16 (quantize.fp16), auto (quantize.auto: picks one of the others by measuring).
Algorithms: onnx_prep (graph preparation before ONNX Runtime's quantizer), transformer_fusion (attention fusion).
"""
from __future__ import annotations

import logging


def _drop_quantizer_chatter(record: logging.LogRecord) -> bool:
    # ONNX Runtime's quantizer logs one INFO line per tensor on the root logger (thousands per model).
    return not (record.levelno <= logging.INFO and str(record.msg).startswith("Quantization parameters"))


# Installed where the quantizer runs (the worker and its job process), never in the API process.
logging.getLogger().addFilter(_drop_quantizer_chatter)
