"""quantize.int4_weight_only: block-wise 4-bit (or 2/8-bit) weights for MatMul, with ONNX Runtime's MatMulNBits.

Its params and spec, as the API validates, lists and publishes them; the implementation: workers/quantize/int4_weight_only.py.
"""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, StringConstraints, field_validator, model_validator

from app.catalog.base import MethodParams, MethodSpec
from app.catalog.quantize.int8_dynamic import NodeName

# (algorithm -> bit widths whose result ONNX Runtime 1.32's CPU provider runs). Checked against ORT in
# tests/methods/test_quant_methods.py. GPTQ's port writes 4-bit weights whatever it is asked; HQQ's 8-bit
# weights carry float zero points, which the CPU MatMulNBits kernel refuses.
SUPPORTED_BITS = {"rtn": (2, 4, 8), "hqq": (2, 4), "gptq": (4,)}

DatasetId = Annotated[str, StringConstraints(min_length=1, max_length=200)]

class Int4WeightOnlyParams(MethodParams):
    bits: Literal[4, 8, 2] = Field(
        4,
        description="Bits per weight. 4 is the usual choice (about 1/6 of the float32 size with block_size 32); "
        "8 keeps nearly all accuracy at about 1/3.5 of the size; 2 is very lossy (cosine 0.72 to the float outputs "
        "on a test MLP with rtn). Supported: rtn 2, 4, 8; hqq 2, 4; gptq 4.",
    )
    block_size: Literal[32, 64, 128] = Field(
        32,
        description="Weights per block along K sharing one scale: smaller blocks are more accurate and a little "
        "larger. K need not be a multiple: ONNX Runtime pads the last block.",
    )
    symmetric: bool | None = Field(
        None,
        description="Symmetric blocks (no zero point) or asymmetric (a zero point per block). null picks per "
        "algorithm: symmetric for rtn (as accurate as asymmetric on the test MLP, and smaller), asymmetric for "
        "gptq (ONNX Runtime's GPTQ lost accuracy when symmetric: cosine 0.972 vs 0.992). hqq is always "
        "asymmetric, with float zero points.",
    )
    accuracy_level: Literal[0, 1, 2, 3, 4] | None = Field(
        None,
        description="MatMulNBits' accuracy_level: the lowest precision the kernel may compute in. 0 or null: "
        "unset, ONNX Runtime's default (float32 on CPU); 1: float32; 2: float16; 3: bfloat16 (2 and 3 fall back to "
        "float32 on CPUs without them); 4: int8, activations quantized per block on the fly, the fastest on x86 "
        "CPUs (a 1024-4096-4096-10 MLP at batch 1: 2.4 ms at level 0, 1.5 ms at level 4, float32 16.7 ms) with "
        "slightly more error.",
    )
    algorithm: Literal["rtn", "hqq", "gptq"] = Field(
        "rtn",
        description="rtn: round to nearest, fast, no data. hqq: Half-Quadratic Quantization, optimises scales and "
        "zero points without data; more accurate than rtn at 2-4 bits, slower to quantize. gptq: uses calibration "
        "data to compensate rounding errors; needs calibration_dataset_id.",
    )
    calibration_dataset_id: DatasetId | None = Field(
        None,
        description="Dataset for gptq (arrays named after the model's inputs, first axis = samples); only gptq "
        "uses one.",
    )
    quantize_embeddings: bool = Field(
        True,
        description="Also quantize embedding tables (a Gather from a constant float matrix) to 4 bits, blocked "
        "along the hidden axis (com.microsoft.GatherBlockQuantized). In a transformer the token embedding is often "
        "half the weights: BERT-6x384 went 90.8 MB -> 14.8 MB (6.1x) with it, cosine 0.994. rtn at 4 bits only.",
    )
    calibration_samples: int = Field(
        128, ge=1, le=100_000, description="gptq calibrates on the first this many samples of the dataset."
    )
    nodes_to_exclude: list[NodeName] = Field(
        default_factory=list, max_length=10_000,
        description="Names of MatMul/Gemm nodes to leave in float (for example the output layer). Unnamed nodes are "
        "named <op_type>_<index>, the index being the node's position in the graph.",
    )

    @field_validator("nodes_to_exclude")
    @classmethod
    def _unique_names(cls, value: list[str]) -> list[str]:
        return list(dict.fromkeys(value))

    @model_validator(mode="after")
    def _consistent(self) -> Int4WeightOnlyParams:
        supported = SUPPORTED_BITS[self.algorithm]
        if self.bits not in supported:
            raise ValueError(
                f"bits={self.bits} is not supported with algorithm {self.algorithm!r} by this ONNX Runtime: it "
                f"supports {', '.join(map(str, supported))} bit(s)"
                + ("; use algorithm 'rtn' for 8 bits" if self.bits == 8 else "")
                + ("; use algorithm 'rtn' or 'hqq' for 2 bits" if self.bits == 2 else "")
            )
        if self.algorithm == "gptq" and self.calibration_dataset_id is None:
            raise ValueError("algorithm 'gptq' needs a calibration dataset: set calibration_dataset_id "
                             "(or use algorithm 'rtn' or 'hqq', which need none)")
        if self.algorithm != "gptq" and self.calibration_dataset_id is not None:
            raise ValueError(f"calibration_dataset_id is used only by algorithm 'gptq'; algorithm "
                             f"{self.algorithm!r} needs no data")
        if self.algorithm == "hqq" and self.symmetric:
            raise ValueError("hqq quantizes asymmetrically (float zero points); leave symmetric unset or false")
        return self

    def is_symmetric(self) -> bool:
        if self.symmetric is not None:
            return self.symmetric
        return self.algorithm == "rtn"


SPEC = MethodSpec(
    id="quantize.int4_weight_only",
    version=1,
    description="Weight-only block quantization with ONNX Runtime's MatMulNBits: MatMul and Linear (Gemm) weights stored in "
        "4 bits (or 2/8) per block of 32-128 values with a scale each; activations stay float. Algorithms: rtn, hqq "
        "(no data) or gptq (calibration data). Shrinks transformer and MLP weights about 6x and speeds up large "
        "matrices at small batch; Conv layers stay float, and small models can run slower on CPU.",
    params_model=Int4WeightOnlyParams,
    dataset_params=("calibration_dataset_id",),
)
