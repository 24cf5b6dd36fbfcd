"""cluster.kmeans: weight sharing, the second stage of Han et al.'s Deep Compression.

Its params and spec, as the API validates, lists and publishes them; the implementation: workers/cluster/kmeans.py.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from app.catalog.base import MethodParams, MethodSpec


class ClusterParams(MethodParams):
    clusters: int = Field(
        16, ge=2, le=256,
        description="Shared values per layer (k), zero included when the layer has pruned weights. 16 (4-bit "
        "indices) kept AlexNet's and VGG-16's accuracy in Deep Compression; fewer shrinks more and costs more.",
    )
    min_weights: int = Field(
        1024, ge=16, le=10**9,
        description="Layers with fewer weights stay as they are: their codebook would cost more than it saves.",
    )
    iterations: int = Field(30, ge=1, le=1000, description="Lloyd iterations of k-means (it stops when stable).")
    pack: Literal["none", "zstd"] = Field(
        "zstd",
        description="Also store the model zstd-packed (level 19) as an extra artifact (model.onnx.zst): the "
        "smallest file to store or ship; unpack with `zstd -d` before loading.",
    )
    min_cosine: float = Field(
        0.98, ge=0, le=1,
        description="Refuse the result when its outputs' cosine to the input model's, on generated inputs, is "
        "below this.",
    )


SPEC = MethodSpec(
    id="cluster.kmeans",
    version=1,
    description="Weight sharing (Deep Compression): k-means to `clusters` shared values per layer, zeros kept, "
    "stored as a codebook plus uint8 indices, and a zstd-packed artifact. Same speed, much smaller file.",
    params_model=ClusterParams,
)
