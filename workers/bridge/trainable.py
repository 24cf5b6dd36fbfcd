"""torch.fx rewrites that turn onnx2torch's constant weights into trainable modules.

onnx2torch keeps every initializer it does not fold into a layer as a buffer. Exports of
nn.Linear on inputs of rank > 2 arrive as MatMul(x, W) + Add(b), so transformer layers came out
with no trainable weights at all, and Torch-Pruning (which follows nn modules through autograd)
could not see them. MatMul with a constant 2-D weight, and the constant bias Add after it,
become one nn.Linear; an ONNX-level rewrite to Gemm would be wrong for inputs of rank > 2.
"""
from __future__ import annotations

import torch
from torch import fx, nn

# Consumers (onnx2torch module class names) whose constant float operands are weights worth
# training: a Gather's table is an embedding. Operands of Add/Mul/Sub stay buffers: they are as
# often fixed constants (UltraFace's anchor priors, attention scales) as learned offsets.
WEIGHT_CONSUMERS = {"OnnxMatMul": (0, 1), "OnnxGemm": (0, 1, 2), "OnnxGather": (0,), "OnnxLayerNorm": (1, 2)}


def make_trainable(module: fx.GraphModule) -> list[str]:
    """Rewrite `module` in place; returns notes on what changed."""
    notes: list[str] = []
    linears = _matmul_to_linear(module) + _gemm_to_linear(module)
    if linears:
        notes.append(f"MatMul with a constant 2-D weight (and its bias Add), or Gemm that onnx2torch left as a "
                     f"function, turned into nn.Linear ({linears})")
    promoted = _promote_weights(module)
    if promoted:
        notes.append(f"{promoted} constant weights (embedding tables, MatMul operands) made trainable parameters")
    _drop_unused_constants(module)
    for parameter in module.parameters():
        parameter.requires_grad_(True)
    return notes


def module_path(node: fx.Node) -> str:
    """The dotted path a get_attr or call_module node names (fx types a target as a str or a callable)."""
    if not isinstance(node.target, str):
        raise TypeError(f"the {node.op} node {node.name} names no attribute path")
    return node.target


def _constant(module: fx.GraphModule, node: object) -> torch.Tensor | None:
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    value = module
    for part in module_path(node).split("."):
        value = getattr(value, part)
    return value if isinstance(value, torch.Tensor) else None


def _is_add(module: nn.Module) -> bool:
    from onnx2torch.node_converters.binary_math_operations import OnnxBinaryMathOperation

    return (isinstance(module, OnnxBinaryMathOperation) and module.math_op_function is torch.add
            and not (module.broadcast == 1 and module.axis is not None))


def _matmul_to_linear(module: fx.GraphModule) -> int:
    from onnx2torch.node_converters.matmul import OnnxMatMul

    count = 0
    for node in list(module.graph.nodes):
        if node.op != "call_module" or not isinstance(module.get_submodule(node.target), OnnxMatMul):
            continue
        if len(node.args) != 2 or node.kwargs:
            continue
        weight = _constant(module, node.args[1])
        # A weight shared by several nodes stays shared (tied weights): left as a parameter instead.
        if (weight is None or weight.dim() != 2 or not weight.is_floating_point()
                or _constant(module, node.args[0]) is not None or len(node.args[1].users) != 1):
            continue
        in_features, out_features = weight.shape
        bias_node, bias = _bias_add(module, node, out_features)
        linear = nn.Linear(in_features, out_features, bias=bias is not None, dtype=weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight.T)
            if bias is not None:
                linear.bias.copy_(bias)
        module.add_submodule(node.target, linear)
        node.args = (node.args[0],)
        if bias_node is not None:
            bias_node.replace_all_uses_with(node)
            module.graph.erase_node(bias_node)
        count += 1
    if count:
        module.graph.eliminate_dead_code()
        module.recompile()
    return count


def _gemm_to_linear(module: fx.GraphModule) -> int:
    """Gemm with constant weights whose bias is [1, out] (CNTK exports) instead of onnx2torch's [out]."""
    from onnx2torch.node_converters.gemm import OnnxGemm

    count = 0
    for node in list(module.graph.nodes):
        if node.op != "call_module":
            continue
        gemm = module.get_submodule(node.target)
        if not isinstance(gemm, OnnxGemm) or gemm.trans_a or node.kwargs or len(node.args) not in (2, 3):
            continue
        weight = _constant(module, node.args[1])
        bias = _constant(module, node.args[2]) if len(node.args) == 3 else None
        if weight is None or weight.dim() != 2 or not weight.is_floating_point() or len(node.args[1].users) != 1:
            continue
        weight = weight if gemm.trans_b else weight.T          # [out, in]
        out_features, in_features = weight.shape
        if len(node.args) == 3 and (bias is None or bias.numel() not in (1, out_features)
                                    or len(node.args[2].users) != 1):
            continue
        linear = nn.Linear(in_features, out_features, bias=bias is not None, dtype=weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight * gemm.alpha)
            if bias is not None:
                linear.bias.copy_((bias * gemm.beta).reshape(-1).expand(out_features))
        module.add_submodule(node.target, linear)
        node.args = (node.args[0],)
        count += 1
    if count:
        module.graph.eliminate_dead_code()
        module.recompile()
    return count


def _bias_add(module: fx.GraphModule, matmul: fx.Node, out_features: int) -> tuple[fx.Node | None, torch.Tensor | None]:
    """The Add that only adds a constant [out_features] vector to `matmul`'s result, if there is one."""
    if len(matmul.users) != 1:
        return None, None
    user = next(iter(matmul.users))
    if user.op != "call_module" or not _is_add(module.get_submodule(module_path(user))) or len(user.args) != 2:
        return None, None
    other = user.args[1] if user.args[0] is matmul else user.args[0]
    bias = _constant(module, other)
    if bias is None or not isinstance(other, fx.Node) or tuple(bias.shape) != (out_features,) or len(other.users) != 1 \
            or other is matmul:
        return None, None
    return user, bias


def _promote_weights(module: fx.GraphModule) -> int:
    container = getattr(module, "initializers", None)   # absent when no node reads an initializer
    if container is None:
        return 0
    count = 0
    for node in module.graph.nodes:
        if node.op != "get_attr" or not node.target.startswith("initializers."):
            continue
        name = module_path(node).split(".", 1)[1]
        value = container._buffers.get(name)
        if value is None or not value.is_floating_point() or value.dim() == 0 or value.numel() < 2:
            continue
        if not all(_weight_operand(module, user, node) for user in node.users):
            continue
        del container._buffers[name]
        container.register_parameter(name, nn.Parameter(value.detach().clone()))
        count += 1
    return count


def _weight_operand(module: fx.GraphModule, user: fx.Node, operand: fx.Node) -> bool:
    if user.op != "call_module":
        return False
    positions = WEIGHT_CONSUMERS.get(type(module.get_submodule(module_path(user))).__name__, ())
    return any(i < len(user.args) and user.args[i] is operand for i in positions)


def _drop_unused_constants(module: fx.GraphModule) -> None:
    """Folded weights would otherwise stay in the state dict (and in every checkpoint) twice."""
    used = {node.target.split(".", 1)[1] for node in module.graph.nodes
            if node.op == "get_attr" and node.target.startswith("initializers.")}
    container = getattr(module, "initializers", None)
    if container is not None:
        for name in [n for n in container._buffers if n not in used]:
            del container._buffers[name]
        for name in [n for n in container._parameters if n not in used]:
            del container._parameters[name]
    module.delete_all_unused_submodules()
    module.recompile()
