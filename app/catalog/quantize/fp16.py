"""quantize.fp16: float16 weights and compute, inputs and outputs kept in their original types.

Its params and spec, as the API validates, lists and publishes them; the implementation: workers/quantize/fp16.py.
"""
from __future__ import annotations

from typing import Annotated

from pydantic import Field, StringConstraints, field_validator

from app.catalog.base import MethodParams, MethodSpec

# ONNX Runtime's float16.DEFAULT_OP_BLOCK_LIST (1.32): ops the converter keeps float32 unless told
# otherwise. Hardcoded for the params schema (the API process does not import onnxruntime);
# tests/methods/test_quant_methods.py checks it against ORT.
CONVERTER_DEFAULT_BLOCK_LIST = (
    "ArrayFeatureExtractor", "Binarizer", "CastMap", "CategoryMapper", "CumSum", "DictVectorizer",
    "FeatureVectorizer", "Imputer", "LabelEncoder", "LinearClassifier", "LinearRegressor", "Max", "Min",
    "NonMaxSuppression", "Normalizer", "OneHotEncoder", "RandomUniformLike", "Range", "RoiAlign", "SVMClassifier",
    "SVMRegressor", "Scaler", "TopK", "TreeEnsemble", "TreeEnsembleClassifier", "TreeEnsembleRegressor", "Upsample",
    "ZipMap",
)

OpTypeName = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z][A-Za-z0-9_]*$")]

class Fp16Params(MethodParams):
    keep_io_types: bool = Field(
        True,
        description="Keep float32 model inputs and outputs float32 (Casts at the edges), so callers feed and read "
        "the same types as before; false makes them float16.",
    )
    op_block_list: list[OpTypeName] | None = Field(
        None, max_length=256,
        description="Op types to keep in float32. null uses the converter's default list ("
        f"{', '.join(CONVERTER_DEFAULT_BLOCK_LIST)}). Either way, ops whose ONNX schema has no float16 type and "
        "nodes ONNX Runtime's CPU provider refuses in float16 are kept float32 too, and the report names them.",
        examples=[["Softmax", "LayerNormalization"]],
    )

    @field_validator("op_block_list")
    @classmethod
    def _unique(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else list(dict.fromkeys(value))


SPEC = MethodSpec(
    id="quantize.fp16",
    version=1,
    description="Convert weights and compute to float16 (ONNX Runtime's float16 converter), keeping float32 inputs and "
        "outputs and the ops that cannot run in float16. Halves the file size with near-identical outputs; "
        "faster on GPUs, usually not on CPUs.",
    params_model=Fp16Params,
)
