"""The catalog of compression methods and recipes: what the API lists, validates and publishes.

    spec = catalog.get("quantize.int8_dynamic")
    params = spec.params_model.model_validate({"per_channel": True})

One module per method, by family (app/catalog/quantize/int8_dynamic.py, ...), mirroring its implementation
in workers/<family>/; recipes in app/catalog/recipes.py. Imports nothing of the service and nothing heavy
(no onnxruntime, torch or numpy): the op lists a method's params accept are plain data here.
"""
from __future__ import annotations

from typing import Any

from app.catalog.base import MethodParams, MethodSpec, checked_op_types
from app.catalog.registry import Registry

__all__ = ["SPECS", "MethodParams", "MethodSpec", "catalog", "checked_op_types", "get", "register"]

_SPECS: Registry[MethodSpec] = Registry()
SPECS = _SPECS.entries  # id -> spec
get = _SPECS.get


def register(spec: MethodSpec) -> MethodSpec:
    """Add a method's spec; a second, different spec under a taken id is a bug."""
    return _SPECS.add(spec.id, spec)


def catalog() -> list[dict[str, Any]]:
    return [
        {
            "id": spec.id,
            "version": spec.version,
            "description": spec.description,
            "params_schema": spec.params_model.model_json_schema(),
        }
        for spec in sorted(SPECS.values(), key=lambda s: s.id)
    ]


def _register_builtins() -> None:
    from app.catalog.cluster import kmeans
    from app.catalog.distill import kd
    from app.catalog.prune import channels, magnitude, two_four
    from app.catalog.quantize import (
        auto,
        fp16,
        int4_weight_only,
        int8_dynamic,
        int8_static,
    )

    for module in (int8_dynamic, int8_static, int4_weight_only, fp16, auto, channels, magnitude, two_four, kd,
                   kmeans):
        register(module.SPEC)


_register_builtins()
