"""The registry of compression methods, by id.

    method = methods.get("quantize.int8_dynamic")
    params = method.params_model.model_validate({"per_channel": True})
    output = method.run(input_path, params, out_dir, methods.StepContext())

Importing this package must stay cheap: the API imports it to list methods and
validate params, so method modules import onnx, onnxruntime, torch and numpy
inside their run functions only.
"""
from __future__ import annotations

import logging
from typing import Any

from app.errors import UnknownMethod
from workers.methods.base import Method, MethodParams, StepContext, StepOutput

__all__ = ["REGISTRY", "Method", "MethodParams", "StepContext", "StepOutput", "catalog", "get", "register"]

REGISTRY: dict[str, Method] = {}


def _drop_quantizer_chatter(record: logging.LogRecord) -> bool:
    # ONNX Runtime's quantizer logs one INFO line per tensor on the root logger (thousands per model).
    return not (record.levelno <= logging.INFO and str(record.msg).startswith("Quantization parameters"))


logging.getLogger().addFilter(_drop_quantizer_chatter)


def register(method: Method) -> Method:
    """Add a method; registering a second, different method under a taken id is a bug."""
    existing = REGISTRY.get(method.id)
    if existing is not None and existing != method:
        raise ValueError(f"method id {method.id!r} is already registered")
    REGISTRY[method.id] = method
    return method


def get(method_id: str) -> Method:
    try:
        return REGISTRY[method_id]
    except KeyError:
        known = ", ".join(sorted(REGISTRY)) or "none"
        raise UnknownMethod(f"unknown method {method_id!r}; known methods: {known}", known=sorted(REGISTRY)) from None


def catalog() -> list[dict[str, Any]]:
    return [
        {
            "id": method.id,
            "version": method.version,
            "description": method.description,
            "params_schema": method.params_model.model_json_schema(),
        }
        for method in sorted(REGISTRY.values(), key=lambda m: m.id)
    ]


def _register_builtins() -> None:
    from workers.cluster import kmeans
    from workers.distill import kd
    from workers.prune import channels, magnitude, two_four
    from workers.quantize import auto, fp16, int4_weight_only, int8_dynamic, int8_static

    for module in (int8_dynamic, int8_static, int4_weight_only, fp16, auto, channels, magnitude, two_four, kd,
                   kmeans):
        register(module.METHOD)


_register_builtins()
