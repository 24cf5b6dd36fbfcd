"""Importing onnx2torch without torchvision, and asking its converter registry what it can convert.

onnx2torch imports torchvision at import time only for its NonMaxSuppression and RoiAlign
converters. torchvision is not installed here, so a stub stands in for the length of the import
and is removed afterwards: libraries that probe for torchvision later (transformers, timm) must
not find a module that cannot do anything. The two ops it would have served are reported as
unsupported instead.
"""
from __future__ import annotations

import importlib
import sys
import types
from functools import lru_cache
from typing import Any

# Ops whose onnx2torch converters call into torchvision.
TORCHVISION_OPS = frozenset({"NonMaxSuppression", "RoiAlign"})
_STUB_NAMES = ("torchvision", "torchvision.ops")


def _unavailable(*_args: Any, **_kwargs: Any) -> Any:
    raise NotImplementedError("torchvision is not installed")


def _stub_modules() -> dict[str, types.ModuleType]:
    package = types.ModuleType("torchvision")
    ops = types.ModuleType("torchvision.ops")
    ops.__dict__.update(nms=_unavailable, roi_align=_unavailable, box_convert=_unavailable)
    package.__dict__["ops"] = ops
    package.__path__ = []  # a package, so `from torchvision.ops import x` resolves the submodule
    return {"torchvision": package, "torchvision.ops": ops}


@lru_cache(maxsize=1)
def onnx2torch() -> tuple[types.ModuleType, bool]:
    """The onnx2torch package, and whether torchvision is really there (False: a stub served the import)."""
    try:
        import torchvision  # noqa: F401
    except Exception:  # absent, or a build that cannot load beside this torch ("torchvision::nms does not exist")
        sys.modules.pop("torchvision", None)
        has_torchvision = False
    else:
        has_torchvision = True
    if has_torchvision:
        return importlib.import_module("onnx2torch"), True

    stubs = _stub_modules()
    for name, module in stubs.items():
        sys.modules.setdefault(name, module)
    try:
        module = importlib.import_module("onnx2torch")
    finally:
        for name, stub in stubs.items():
            if sys.modules.get(name) is stub:
                del sys.modules[name]
    return module, False


def converter_registry() -> set[tuple[str, str, int]]:
    """(domain, op_type, since_version) for every op onnx2torch converts here."""
    _, has_torchvision = onnx2torch()
    from onnx2torch.node_converters.registry import _CONVERTER_REGISTRY

    return {(key.domain, key.operation_type, key.version) for key in _CONVERTER_REGISTRY
            if has_torchvision or key.operation_type not in TORCHVISION_OPS}
