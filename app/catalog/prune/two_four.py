"""prune.2_4: 2:4 semi-structured sparsity for the sparse tensor cores of NVIDIA GPUs (Ampere and newer).

Its params and spec, as the API validates, lists and publishes them; the implementation: workers/prune/two_four.py.
"""
from __future__ import annotations

from pydantic import Field

from app.catalog.base import MethodSpec
from app.catalog.prune.common import FineTuneParams, LayerName


class Prune24Params(FineTuneParams):
    ignored_layers: list[LayerName] = Field(
        default_factory=list, max_length=10_000,
        description="Layers left dense, by ONNX node name (or module name as listed in the report).",
    )


SPEC = MethodSpec(
    id="prune.2_4",
    version=1,
    description="2:4 semi-structured sparsity on Linear and 1x1 Conv weights (for GPUs with sparse tensor cores), "
    "then optional fine-tuning with the pattern held. No speedup on CPUs or dense runtimes.",
    params_model=Prune24Params,
    dataset_params=("train_dataset_id", "eval_dataset_id"),
)
