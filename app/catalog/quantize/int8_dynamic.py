"""quantize.int8_dynamic: ONNX Runtime dynamic quantization, int8 weights and uint8 activations.

Its params and spec, as the API validates, lists and publishes them; the implementation: workers/quantize/int8_dynamic.py.
"""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, StringConstraints, WithJsonSchema, field_validator

from app.catalog.base import MethodParams, MethodSpec, checked_op_types

# The op types ONNX Runtime's dynamic (IntegerOps) quantization handles: the keys of
# onnxruntime.quantization.registry.IntegerOpsRegistry. Hardcoded because the API
# process must not import onnxruntime; tests/methods/test_methods.py checks them against it.
ORT_DYNAMIC_OP_TYPES = ("Attention", "Conv", "EmbedLayerNormalization", "Gather", "LSTM", "MatMul", "Transpose")

# Gemm is not among them; onnx_prep rewrites Gemm with constant weights as MatMul + Add.
SUPPORTED_OP_TYPES = tuple(sorted((*ORT_DYNAMIC_OP_TYPES, "Gemm")))

NodeName = Annotated[str, StringConstraints(min_length=1, max_length=512)]

# Checked by the validator below (its message lists the supported types); the schema shows them as an enum.
OpType = Annotated[str, WithJsonSchema({"type": "string", "enum": list(SUPPORTED_OP_TYPES)})]

class Int8DynamicParams(MethodParams):
    per_channel: bool = Field(
        True,
        description="One scale per output channel of each weight instead of one per tensor; usually keeps accuracy "
        "closer to the original at no run-time cost. ONNX Runtime applies it to MatMul/Gemm weights; it quantizes "
        "Conv weights per tensor in dynamic mode.",
    )
    weight_type: Literal["auto", "int8", "uint8"] = Field(
        "auto",
        description="Type of the stored weights. int8 runs ONNX Runtime's fast u8s8 MatMul kernels (BERT-6x384 on "
        "a VNNI Xeon: 1.7x faster than fp32, against no gain with uint8); ConvInteger runs faster with uint8 "
        "(YOLOX-nano: 1.8x slower than fp32 with uint8, 3.4x with int8). auto picks int8 when most quantized "
        "weights feed MatMul/Gemm, uint8 when most feed Conv. On x86 CPUs without VNNI u8s8 can saturate: set "
        "reduce_range there, or use uint8.",
    )
    reduce_range: bool = Field(
        False,
        description="Quantize weights to 7 bits instead of 8: avoids the u8s8 saturation of x86 CPUs without "
        "VNNI at some accuracy cost. The report warns when the worker's CPU lacks VNNI and this is off.",
    )
    op_types: list[OpType] | None = Field(
        None,
        min_length=1,
        max_length=32,
        description="Quantize only these op types; null quantizes every supported type. "
        f"Supported: {', '.join(SUPPORTED_OP_TYPES)}.",
        examples=[["MatMul", "Gemm"]],
    )
    keep_depthwise_conv_float: bool = Field(
        True,
        description="Leave grouped (depthwise) Conv layers in float. Dynamic quantization gives a Conv weight one "
        "scale for the whole tensor, which wrecks depthwise filters: on YOLOX-nano quantizing them turned the top "
        "detection of a COCO image from 'tvmonitor' (0.92) into a wrong class; keeping them float restored it.",
    )
    fuse_transformer: Literal["auto", "off"] = Field(
        "auto",
        description="auto: where the graph has transformer self-attention (Softmax over Q·Kᵀ), fuse each layer's "
        "attention into ONNX Runtime's Attention op before quantizing, so it runs as one QAttention; the head "
        "count and hidden size are read from the graph. The fused model is used only if its outputs match the "
        "original's (cosine >= 0.9999), and the report says what was fused or why not. The Q/K/V MatMuls then "
        "live inside Attention, which is quantized whenever MatMul is. off: quantize the graph as it is.",
    )
    nodes_to_exclude: list[NodeName] = Field(
        default_factory=list,
        max_length=10_000,
        description="Names of nodes to leave in float (for example the first and last layers). "
        "Unnamed nodes are named <op_type>_<index>, the index being the node's position in the graph.",
    )

    @field_validator("op_types")
    @classmethod
    def _supported_op_types(cls, value: list[str] | None) -> list[str] | None:
        return checked_op_types(value, SUPPORTED_OP_TYPES, "dynamic int8 quantization")

    @field_validator("nodes_to_exclude")
    @classmethod
    def _unique_names(cls, value: list[str]) -> list[str]:
        return list(dict.fromkeys(value))


SPEC = MethodSpec(
    id="quantize.int8_dynamic",
    version=2,
    description="Dynamic 8-bit quantization with ONNX Runtime: weights stored as int8 (per output channel by default), "
        "activations quantized to uint8 at run time. Needs no calibration data. Suits MatMul/Gemm-heavy models "
        "(transformers, MLPs, RNNs) on CPU; convolutions become ConvInteger, which is often slower than float Conv.",
    params_model=Int8DynamicParams,
)
