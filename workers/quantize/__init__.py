"""Quantization methods, one module per method, and the ONNX rewrites they share.

Methods: int8_dynamic (quantize.int8_dynamic), int8_static (quantize.int8_static), int4_weight_only
(quantize.int4_weight_only), fp16 (quantize.fp16), auto (quantize.auto: picks one of the others by measuring).
Algorithms: onnx_prep (graph preparation before ONNX Runtime's quantizer), transformer_fusion (attention fusion).
"""
