"""The registry of method implementations, by catalog id.

    method = methods.get("quantize.int8_dynamic")
    params = method.params_model.model_validate({"per_channel": True})
    output = method.run(input_path, params, out_dir, methods.StepContext())

Each method's id, version, params model and description live in the catalog (app.catalog, which the API
imports); its implementation lives in workers/<family>/<method>.py and registers against the id:

    @implements("quantize.int8_dynamic")
    def quantize(input_path, params, out_dir, ctx): ...
"""
from __future__ import annotations

from collections.abc import Callable

from app import catalog
from app.catalog.registry import Registry
from workers.methods.base import Method, MethodParams, StepContext, StepOutput

__all__ = ["REGISTRY", "Method", "MethodParams", "StepContext", "StepOutput", "get", "implements", "register"]

_METHODS: Registry[Method] = Registry()
REGISTRY = _METHODS.entries  # id -> implementation
get = _METHODS.get


def register(method: Method) -> Method:
    """Add a method; registering a second, different method under a taken id is a bug."""
    return _METHODS.add(method.id, method)


def implements(method_id: str) -> Callable[[Callable], Callable]:
    """Register the decorated function as the implementation of the catalog's method `method_id`."""
    spec = catalog.get(method_id)

    def decorate(run: Callable) -> Callable:
        register(Method.implementing(spec, run))
        return run

    return decorate


def _register_builtins() -> None:
    from workers.cluster import kmeans  # noqa: F401  (each module registers its implementation on import)
    from workers.distill import kd  # noqa: F401
    from workers.prune import channels, magnitude, two_four  # noqa: F401
    from workers.quantize import auto, fp16, int4_weight_only, int8_dynamic, int8_static  # noqa: F401


_register_builtins()
