"""quantize.int8_static: ONNX Runtime static quantization (QDQ), activations calibrated on data.

Its params and spec, as the API validates, lists and publishes them; the implementation: workers/quantize/int8_static.py.
"""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (
    Field,
    StringConstraints,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from app.catalog.base import MethodParams, MethodSpec, checked_op_types
from app.catalog.quantize.int8_dynamic import NodeName

# The op types quantize_static quantizes by default: the keys of ORT's QLinearOpsRegistry and
# QDQRegistry together. Hardcoded because the API process must not import onnxruntime;
# tests/methods/test_quant_methods.py checks them against it.
ORT_STATIC_OP_TYPES = (
    "Add", "ArgMax", "AveragePool", "BatchNormalization", "Clip", "Concat", "Conv", "ConvTranspose", "CumSum",
    "EmbedLayerNormalization", "Flatten", "Gather", "GatherElements", "Gemm", "GlobalAveragePool",
    "InstanceNormalization", "LayerNormalization", "LeakyRelu", "MatMul", "MaxPool", "Mul", "Pad", "Relu", "Reshape",
    "Resize", "Sigmoid", "Slice", "Softmax", "Split", "Squeeze", "TopK", "Transpose", "Unsqueeze", "Where",
)

DatasetId = Annotated[str, StringConstraints(min_length=1, max_length=200)]

OpType = Annotated[str, WithJsonSchema({"type": "string", "enum": list(ORT_STATIC_OP_TYPES)})]

class Int8StaticParams(MethodParams):
    calibration_dataset_id: DatasetId | None = Field(
        None,
        description="Dataset whose samples calibrate the activation ranges: arrays named after the model's inputs, "
        "first axis = samples, drawn like the data the model will see in use. Needed unless "
        "allow_random_calibration is set.",
    )
    allow_random_calibration: bool = Field(
        False,
        description="Without a calibration dataset, calibrate on random inputs generated from the model's input "
        "specs (standard-normal floats, small integer ids). Random activations rarely match real ones: the "
        "result may be far less accurate on real data, and the report says it was calibrated on random data.",
    )
    calibration_samples: int = Field(
        128, ge=1, le=100_000,
        description="Calibrate on the first this many samples of the dataset (all of them when it holds fewer), "
        "or on this many random samples.",
    )
    calibrate_method: Literal["minmax", "entropy", "percentile"] = Field(
        "minmax",
        description="How activation ranges are chosen: minmax takes the full observed range; entropy picks the "
        "clipping threshold that minimises the KL divergence of the quantized distribution; percentile clips at "
        "the given percentile of |activation|. Entropy and percentile keep histograms of every activation and "
        "take longer. Measured on YOLOX-nano calibrated on 18 crops of 3 COCO images: the top detection's score "
        "went 0.92 -> 0.88 with percentile, 0.68 with minmax, 0.06 with entropy (which clips detection heads too "
        "hard).",
    )
    percentile: float = Field(
        99.999, gt=50, le=100,
        description="Percentile of |activation| to clip at; only with calibrate_method 'percentile'.",
    )
    per_channel: bool = Field(
        True,
        description="One scale per output channel of each Conv/Gemm/MatMul weight instead of one per tensor; "
        "keeps accuracy closer to the original (filters of trained CNNs differ widely in range) at no measured "
        "run-time cost.",
    )
    reduce_range: bool = Field(
        False,
        description="Quantize weights to 7 bits. Only worth it on x86 CPUs without VNNI (before Cascade Lake / "
        "Zen 4), where int8 x uint8 products can saturate; it costs some accuracy elsewhere.",
    )
    # Measured on this service's CPU (Xeon with AVX512-VNNI), QDQ, per channel, against float32:
    # uint8 activations x int8 weights ran YOLOX-nano at 1.0-1.2x and a 256-1024-1024-10 MLP at 3.4x;
    # int8 x int8 ran them at 0.27x and 2.8x (x86 integer kernels are u8s8), uint8 x uint8 at
    # 0.52x and 1.7x. Cosine to the float outputs was the same within 0.001 for all three.
    activation_type: Literal["uint8", "int8"] = Field(
        "uint8",
        description="Type of quantized activations. uint8 (with int8 weights) is what x86 CPU kernels run fastest; "
        "int8 suits ARM CPUs and GPUs/TensorRT.",
    )
    weight_type: Literal["int8", "uint8"] = Field(
        "int8",
        description="Type of quantized weights. int8 (symmetric) with uint8 activations is ONNX Runtime's fast "
        "path on x86; uint8 weights ran 1.7-2x slower there. int8 activations need int8 weights.",
    )
    op_types: list[OpType] | None = Field(
        None, min_length=1, max_length=64,
        description="Quantize only these op types; null quantizes every type ONNX Runtime's static quantization "
        f"supports: {', '.join(ORT_STATIC_OP_TYPES)}.",
        examples=[["Conv", "Gemm", "MatMul"]],
    )
    nodes_to_exclude: list[NodeName] = Field(
        default_factory=list, max_length=10_000,
        description="Names of nodes to leave in float (for example the first and last layers, or a detection head). "
        "Unnamed nodes are named <op_type>_<index>, the index being the node's position in the graph.",
    )

    @field_validator("op_types")
    @classmethod
    def _supported_op_types(cls, value: list[str] | None) -> list[str] | None:
        return checked_op_types(value, ORT_STATIC_OP_TYPES, "static int8 quantization")

    @field_validator("nodes_to_exclude")
    @classmethod
    def _unique_names(cls, value: list[str]) -> list[str]:
        return list(dict.fromkeys(value))

    @model_validator(mode="after")
    def _consistent(self) -> Int8StaticParams:
        if self.calibration_dataset_id is None and not self.allow_random_calibration:
            raise ValueError(
                "static quantization needs a calibration dataset: set calibration_dataset_id to a dataset drawn "
                "like the model's real inputs, or set allow_random_calibration to true to calibrate on random "
                "inputs (less accurate on real data)"
            )
        # Compared with the default, not model_fields_set: accepted params are stored with their defaults
        # filled in and validated again by the worker.
        default = type(self).model_fields["percentile"].default
        if self.percentile != default and self.calibrate_method != "percentile":
            raise ValueError(
                f"percentile applies only to calibrate_method 'percentile' (calibrate_method is "
                f"{self.calibrate_method!r})"
            )
        if self.activation_type == "int8" and self.weight_type == "uint8":
            raise ValueError(
                "int8 activations with uint8 weights are not supported by ONNX Runtime; use weight_type 'int8'"
            )
        return self


SPEC = MethodSpec(
    id="quantize.int8_static",
    version=1,
    description="Static 8-bit quantization with ONNX Runtime (QDQ format): int8 weights (per output channel by default) and "
        "uint8 activations whose ranges are calibrated on a dataset (or, if allowed, on random inputs). ONNX Runtime "
        "runs the result with integer kernels (QLinearConv, QGemm, ...): usually the fastest int8 option on CPU for "
        "CNNs and MLPs. Needs calibration data drawn like real inputs.",
    params_model=Int8StaticParams,
    dataset_params=("calibration_dataset_id",),
)
