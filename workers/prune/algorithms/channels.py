"""Structured channel pruning with Torch-Pruning: whole filters are removed, so the model gets smaller and faster.

Torch-Pruning's dependency graph finds the layers that must lose the same channels (a conv, its BatchNorm,
the next layer's inputs, both sides of a residual add) and removes them together; the result is a dense model
with physically smaller weights. The heads (layers whose output reaches a model output with no other
Conv/Linear in between) keep all their output channels so the model's outputs keep their shapes.

Models converted from ONNX by onnx2torch are fx GraphModules with a few ops Torch-Pruning cannot follow;
`_normalise_graph` rewrites the ones that can be rewritten (constant-shape flattening Reshapes, BatchNorms
fed by constant tensors). The others (a transformer's head-splitting Reshapes to constant head sizes) make
some dependency groups unprunable: those groups are found by pruning group by group and running the model,
kept whole, and reported, while every other group (a transformer's FFN width) is pruned.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from typing import Any, cast

import torch
from torch import nn

from app.errors import StepFailed
from workers.bridge.trainable import module_path

IMPORTANCES = ("l1", "l2", "taylor", "bn_scale")
TARGET_TOLERANCE = 0.03         # the reached params/MACs ratio is within this of the target
SEARCH_TOLERANCE = 0.01         # the bisection stops early once this close
SEARCH_ITERATIONS = 12
# Channel ratio tried at most. Beyond it, a layer of under ten channels would lose all of them, which
# Torch-Pruning refuses by leaving that layer whole: the model would get bigger as the ratio grows.
MAX_SEARCH_RATIO = 0.9

Batches = Callable[[], Iterable[tuple[tuple[torch.Tensor, ...], torch.Tensor | None]]]
LossFn = Callable[[Any, torch.Tensor | None], torch.Tensor]


def prune_channels(
    module: nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    *,
    importance: str = "l2",
    ratio: float | None = None,
    target_params_ratio: float | None = None,
    target_macs_ratio: float | None = None,
    ignored_layers: Iterable[str] = (),
    keep_head: bool = True,
    round_to: int | None = None,
    iterative_steps: int = 1,
    taylor_batches: Batches | None = None,
    loss_fn: LossFn | None = None,
    on_step: Callable[[int, dict], None] | None = None,
) -> dict[str, Any]:
    """Remove output channels of Conv/Linear layers of `module` in place; returns JSON-able details.

    `ratio` removes that fraction of the channels of every prunable layer (local ranking).
    `target_params_ratio` / `target_macs_ratio` bisect that uniform ratio on copies until the pruned model
    keeps that fraction of the parameters / MACs (MACs counted at the example input shape). The ratio stays
    uniform rather than global: global ranking can empty a layer, which Torch-Pruning then leaves whole.
    Exactly one of the three is given. Taylor importance needs `taylor_batches` (a callable returning an
    iterable of (inputs, labels)); the loss is `loss_fn(outputs, labels)`, by default cross-entropy on the
    first output against the labels, or against the model's own top class when there are none.
    A dependency group whose pruning breaks the model (a Reshape to a fixed head size, say) is kept whole and
    reported in "kept_unprunable"; the others are pruned. `module` ends up pruned in place, but finding such a
    group restarts from an unpruned copy whose state then moves into `module`: references held to its
    submodules may then point at stale layers. A params/MACs target that the groups kept whole put out of reach
    prunes at the largest ratio tried and notes the ratio reached. On a StepFailed raised after pruning
    started, `module` may be left half-pruned: prune a copy to keep it.
    """
    given = {"ratio": ratio, "target_params_ratio": target_params_ratio, "target_macs_ratio": target_macs_ratio}
    chosen = [(name, value) for name, value in given.items() if value is not None]
    if len(chosen) != 1:
        raise StepFailed(
            "give exactly one of ratio, target_params_ratio and target_macs_ratio"
            + (f" (got {', '.join(name for name, _ in chosen)})" if chosen else ""),
            code="invalid_params",
        )
    mode, amount = chosen[0][0], float(chosen[0][1])
    if not 0.0 < amount < 1.0:
        raise StepFailed(f"{mode} must be between 0 and 1 (exclusive), got {amount}", code="invalid_params")
    if importance not in IMPORTANCES:
        raise StepFailed(f"importance must be one of {', '.join(IMPORTANCES)}, got {importance!r}",
                         code="invalid_params")
    if iterative_steps < 1:
        raise StepFailed("iterative_steps must be at least 1", code="invalid_params")
    if round_to is not None and round_to < 1:
        raise StepFailed("round_to must be at least 1", code="invalid_params")
    if importance == "taylor" and taylor_batches is None:
        raise StepFailed("taylor importance weighs channels by loss gradients and needs a dataset",
                         code="dataset_required")
    if importance == "bn_scale" and not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules()):
        raise StepFailed(
            "bn_scale importance ranks channels by BatchNorm scales, and the model has no BatchNorm layer "
            "(ONNX exports usually fold BatchNorm into the convolutions); use l1, l2 or taylor",
            code="invalid_params",
        )
    example_inputs = tuple(example_inputs)
    module.eval()
    notes = _normalise_graph(module, example_inputs)
    names = _prunable_names(module)
    if not names:
        raise StepFailed("the model has no Conv or Linear layer whose channels could be pruned",
                         code="nothing_to_prune")
    ignored = _resolve_ignored(module, list(ignored_layers))
    kept_whole = _head_layers(module, example_inputs) if keep_head else []
    with torch.no_grad():
        reference = _output_shapes(module(*example_inputs))
    params_before = _count_params(module)
    macs_before = _count_macs(module, example_inputs)
    channels_before = {name: _out_channels(layer) for name, layer in names.items()}

    # "unsafe" collects the groups found to break the model, shared by the search's trials and the final pass.
    settings: dict[str, Any] = dict(importance=importance, ignored=sorted(set(ignored) | set(kept_whole)), round_to=round_to,
                    iterative_steps=iterative_steps, taylor_batches=taylor_batches, loss_fn=loss_fn,
                    reference=reference, keep_head=keep_head, unsafe=[], passes=0)
    search: list[dict[str, float]] = []
    if mode == "ratio":
        pruning_ratio = amount
    else:
        metric = "params" if mode == "target_params_ratio" else "macs"
        before = params_before if metric == "params" else macs_before
        pruning_ratio = _search_ratio(module, example_inputs, metric, before, amount, search, settings)

    pristine = copy.deepcopy(module)  # what a restart starts again from, should a group break the model
    steps = _prune(module, example_inputs, pruning_ratio, settings, on_step, pristine=pristine, count_macs=True)

    params_after = _count_params(module)
    macs_after = _count_macs(module, example_inputs)
    layers = {}
    for name, layer in _prunable_names(module).items():
        after = _out_channels(layer)
        if name in channels_before and after != channels_before[name]:
            layers[name] = [channels_before[name], after]
    details: dict[str, Any] = {
        "importance": importance,
        "mode": mode,
        "target": amount,
        "pruning_ratio": round(pruning_ratio, 4),
        "params_before": params_before,
        "params_after": params_after,
        "params_ratio": params_after / params_before if params_before else 1.0,
        "macs_before": macs_before,
        "macs_after": macs_after,
        "macs_ratio": macs_after / macs_before if macs_before else 1.0,
        "layers": layers,
        "kept_whole": kept_whole,
        "ignored_layers": sorted(set(ignored)),
        "round_to": round_to,
        "steps": steps,
        "kept_unprunable": {name: entry["reason"] for entry in settings["unsafe"] for name in entry["layers"]},
        "pruning_passes": settings["passes"],
        "notes": notes,
    }
    if settings["unsafe"]:
        layer_count = _plural(len(details["kept_unprunable"]), "layer")
        notes.append(
            f"{layer_count} in {_plural(len(settings['unsafe']), 'dependency group')} kept whole: pruning them "
            "broke the model (fixed-shape reshapes such as attention heads); see kept_unprunable"
        )
    if search:
        details["search"] = search
        reached = details["params_ratio" if mode == "target_params_ratio" else "macs_ratio"]
        if abs(reached - amount) > TARGET_TOLERANCE:
            # Channels go in whole numbers (or round_to multiples): a small model may have no closer ratio.
            notes.append(f"reached {reached:.3f} for a target of {amount:.3f}"
                         + (" (the layers kept whole cannot lose channels)" if settings["unsafe"] else ""))
    return details


# --- pruning ------------------------------------------------------------------------------------------

def _importance(kind: str):
    import torch_pruning as tp

    if kind == "l1":
        return tp.importance.MagnitudeImportance(p=1)
    if kind == "l2":
        return tp.importance.MagnitudeImportance(p=2)
    if kind == "taylor":
        return tp.importance.TaylorImportance()
    return tp.importance.BNScaleImportance()


class _GroupBroke(Exception):
    """Pruning a group broke the model; `layers` None: one of several groups pruned since the last check."""

    def __init__(self, layers: list[str] | None, reason: str, damaged: bool) -> None:
        super().__init__(reason)
        self.layers, self.reason, self.damaged = layers, reason, damaged


def _prune(module: nn.Module, example_inputs: tuple[torch.Tensor, ...], pruning_ratio: float,
           settings: dict[str, Any], on_step: Callable[[int, dict], None] | None, *, pristine: nn.Module,
           count_macs: bool = False) -> list[dict[str, Any]]:
    """Prune `module` in place over settings' iterative steps, keeping whole the groups that break it.

    A broken group leaves `module` damaged: it becomes a fresh copy of `pristine` (the same model unpruned)
    and the pass starts again with the group's layers ignored. A pass checks the model once per step; when
    that check fails after several groups, the passes after it check after every group to find the culprit.
    Returns one entry per step of the pass that succeeded.
    """
    careful = False
    reported = 0

    def report_once(step: int, entry: dict) -> None:
        nonlocal reported
        if on_step is not None and step > reported:  # a restart does not report the same round twice
            reported = step
            on_step(step, entry)

    # Each restart keeps at least one more layer whole, so this bound is never the one reached in practice.
    for _attempt in range(len(_prunable_names(module)) + 2):
        try:
            steps = _prune_pass(module, example_inputs, pruning_ratio, settings, report_once, careful, count_macs)
        except _GroupBroke as broken:
            if broken.damaged:
                _become(module, copy.deepcopy(pristine))
            if broken.layers is None:
                careful = True
                continue
            known = {name for entry in settings["unsafe"] for name in entry["layers"]}
            if not broken.layers or set(broken.layers) <= known | set(settings["ignored"]):
                raise StepFailed(f"pruning failed: {broken.reason}", code="pruning_unsupported") from broken
            settings["unsafe"].append({"layers": broken.layers, "reason": broken.reason})
            continue
        return steps
    raise StepFailed("pruning kept breaking the model after keeping every group whole that broke it",
                     code="pruning_unsupported")


def _prune_pass(module: nn.Module, example_inputs: tuple[torch.Tensor, ...], pruning_ratio: float,
                settings: dict[str, Any], on_step: Callable[[int, dict], None], careful: bool,
                count_macs: bool) -> list[dict[str, Any]]:
    """One pruning pass group by group; raises _GroupBroke when a group breaks the model."""
    import torch_pruning as tp

    by_name = dict(module.named_modules())
    layer_names = {id(layer): name for name, layer in _prunable_names(module).items()}
    unsafe = [name for entry in settings["unsafe"] for name in entry["layers"]]
    ignored = list(dict.fromkeys(settings["ignored"] + unsafe))
    settings["passes"] += 1  # one dependency-graph trace each
    try:
        pruner = tp.pruner.MetaPruner(
            module, example_inputs, importance=_importance(settings["importance"]),
            pruning_ratio=pruning_ratio, global_pruning=False,
            iterative_steps=settings["iterative_steps"], round_to=settings["round_to"],
            ignored_layers=[by_name[name] for name in ignored],
        )
    except Exception as exc:
        raise StepFailed(f"Torch-Pruning could not trace the model's channel dependencies: {_short(exc)}",
                         code="pruning_unsupported") from exc
    graph = pruner.DG

    def out_layers(group) -> list[str]:
        names = (layer_names.get(id(dep.target.module)) for dep, _ in group
                 if graph.is_out_channel_pruning_fn(dep.handler))
        return list(dict.fromkeys(name for name in names if name is not None))

    # A group whose channels cannot even be ranked (index mapping through a head-splitting Reshape) is skipped
    # by Torch-Pruning when its importance is None: no restart is needed, the model is untouched.
    ranked = 0
    estimate = pruner.estimate_importance

    def estimate_or_skip(group):
        nonlocal ranked
        try:
            importance = estimate(group)
        except Exception as exc:
            layers = out_layers(group)
            if layers and not any(set(layers) & set(entry["layers"]) for entry in settings["unsafe"]):
                reason = f"its channels cannot be ranked: {_first(exc)}"
                settings["unsafe"].append({"layers": layers, "reason": reason})
            return None
        ranked += 1
        return importance

    pruner.estimate_importance = estimate_or_skip
    # Torch-Pruning builds every group through get_pruning_group: the last root asked for names the group
    # an exception raised between two yielded groups belongs to.
    last: dict[str, Any] = {}
    get_pruning_group = graph.get_pruning_group

    def remembered(root, pruning_fn, indices):
        last.clear()
        last["root"] = root
        last["group"] = get_pruning_group(root, pruning_fn, indices)
        return last["group"]

    graph.get_pruning_group = remembered

    damaged = False
    steps = []
    for step in range(1, settings["iterative_steps"] + 1):
        if settings["importance"] == "taylor":
            _accumulate_gradients(module, settings["taylor_batches"], settings["loss_fn"])
        pruned: list[list[str]] = []
        groups = pruner.step(interactive=True)
        while True:
            try:
                group = next(groups)
            except StopIteration:
                break
            except Exception as exc:
                if "group" in last:
                    blamed = out_layers(last["group"])
                else:
                    blamed = [name for name in [layer_names.get(id(last.get("root")))] if name is not None]
                raise _GroupBroke(blamed, f"Torch-Pruning failed on it: {_first(exc)}", damaged) from exc
            layers = out_layers(group)
            damaged = True
            try:
                group.prune()
            except Exception as exc:
                raise _GroupBroke(layers, f"pruning it failed: {_first(exc)}", True) from exc
            pruned.append(layers)
            if careful:
                problem = _run_problem(module, example_inputs, settings["reference"], settings["keep_head"])
                if problem:
                    raise _GroupBroke(layers, problem, True)
        if not careful and pruned:
            problem = _run_problem(module, example_inputs, settings["reference"], settings["keep_head"])
            if problem:
                raise _GroupBroke(pruned[0] if len(pruned) == 1 else None, problem, True)
        if settings["importance"] == "taylor":
            module.zero_grad(set_to_none=True)
        if step == 1 and not ranked and settings["unsafe"]:
            entry = settings["unsafe"][0]
            raise StepFailed(
                "no dependency group of the model can be pruned without breaking it "
                f"({_plural(len(settings['unsafe']), 'group')}; first: {', '.join(entry['layers'][:4])}: "
                f"{entry['reason']})",
                code="pruning_unsupported",
            )
        entry = {"step": step, "params": _count_params(module)}
        if count_macs:
            entry["macs"] = _count_macs(module, example_inputs)
        on_step(step, dict(entry))
        steps.append(entry)
    module.eval()
    return steps


def _accumulate_gradients(module: nn.Module, batches: Batches, loss_fn: LossFn | None) -> None:
    """Fill .grad of the weights with the loss gradient summed over the batches (Taylor importance reads it)."""
    module.zero_grad(set_to_none=True)
    seen = 0
    with torch.enable_grad():
        for inputs, labels in batches():
            outputs = module(*inputs)
            loss = (loss_fn or _default_loss)(outputs, labels)
            loss.backward()
            seen += 1
    if not seen:
        raise StepFailed("taylor importance got no batches of data", code="dataset_required")


def _default_loss(outputs: Any, labels: torch.Tensor | None) -> torch.Tensor:
    first = outputs[0] if isinstance(outputs, (tuple, list)) else outputs
    if labels is None:
        if first.dim() != 2:
            raise StepFailed(
                "taylor importance needs labels, or class scores [N, C] as the first output, to build a loss; "
                f"the first output has shape {list(first.shape)} and the data has no labels",
                code="dataset_required",
            )
        # Without labels the model's own top class stands in: its gradient still says which channels matter.
        labels = first.detach().argmax(dim=1)
    return nn.functional.cross_entropy(first.float(), labels.long().to(first.device))


def _search_ratio(module: nn.Module, example_inputs: tuple[torch.Tensor, ...], metric: str, before: int,
                  target: float, search: list[dict[str, float]], settings: dict[str, Any]) -> float:
    """Bisect the channel ratio whose pruned copy keeps `target` of the params or MACs."""
    def measure(pruning_ratio: float) -> float:
        trial = copy.deepcopy(module)
        # settings["unsafe"] carries the groups a trial found breaking the model to every later trial.
        _prune(trial, example_inputs, pruning_ratio, settings, None, pristine=module)
        after = _count_params(trial) if metric == "params" else _count_macs(trial, example_inputs)
        reached = after / before if before else 1.0
        search.append({"pruning_ratio": round(pruning_ratio, 4), f"{metric}_ratio": round(reached, 4)})
        return reached

    low, high = 0.0, MAX_SEARCH_RATIO
    reached_high = measure(high)
    if reached_high > target + TARGET_TOLERANCE:
        if settings["unsafe"]:
            return high  # as close as the groups that can be pruned get; the caller notes the ratio reached
        raise StepFailed(
            f"cannot bring the {metric} down to {target:.0%} of the original: removing {high:.0%} of the "
            f"prunable channels keeps {reached_high:.1%} (heads, ignored layers and unprunable parameters "
            f"stay whole)",
            code="target_unreachable",
        )
    best, best_gap = high, abs(reached_high - target)
    for _ in range(SEARCH_ITERATIONS):
        middle = (low + high) / 2
        reached = measure(middle)
        if abs(reached - target) < best_gap:
            best, best_gap = middle, abs(reached - target)
        if best_gap <= SEARCH_TOLERANCE:
            break
        if reached > target:
            low = middle
        else:
            high = middle
    return best


# --- what to keep -------------------------------------------------------------------------------------

def _prunable_names(module: nn.Module) -> dict[str, nn.Module]:
    found: dict[str, nn.Module] = {}
    seen: set[int] = set()
    for name, layer in module.named_modules():
        if isinstance(layer, (nn.modules.conv._ConvNd, nn.Linear)) and id(layer) not in seen:
            seen.add(id(layer))
            found[name] = layer
    return found


def _out_channels(layer: nn.Module) -> int:
    if isinstance(layer, nn.Linear):
        return layer.out_features
    if isinstance(layer, nn.modules.conv._ConvNd):
        return layer.out_channels
    raise TypeError(f"{type(layer).__name__} has no output channels to prune")


def _resolve_ignored(module: nn.Module, names: list[str]) -> list[str]:
    known = dict(module.named_modules())
    unknown = [name for name in names if name not in known or name == ""]
    if unknown:
        valid = list(_prunable_names(module))[:8]
        raise StepFailed(
            f"ignored_layers names no layer of the model: {', '.join(map(repr, unknown))}; layer names are "
            f"module names such as {', '.join(map(repr, valid))}",
            code="invalid_params",
        )
    return list(dict.fromkeys(names))


def _head_layers(module: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> list[str]:
    """Conv/Linear layers whose output reaches a model output with no other Conv/Linear on the way.

    Walks the autograd graph back from each output and stops, on each path, at the first Conv/Linear
    output met, so it works for any module (fx or not) and for multi-output detection heads.
    """
    layers = _prunable_names(module)
    produced: dict[Any, str] = {}

    def record(name: str):
        def hook(_layer, _inputs, output):
            if isinstance(output, torch.Tensor) and output.grad_fn is not None:
                produced[output.grad_fn] = name
        return hook

    handles = [layer.register_forward_hook(record(name)) for name, layer in layers.items()]
    # Inputs that need a gradient give every layer's output a grad_fn, frozen weights or not.
    traced = tuple(t.detach().clone().requires_grad_(True) if t.is_floating_point() else t for t in example_inputs)
    try:
        with torch.enable_grad():
            outputs = module(*traced)
    finally:
        for handle in handles:
            handle.remove()
    heads: list[str] = []
    visited: set[Any] = set()
    stack: list[torch.autograd.graph.Node | None] = [
        t.grad_fn for t in _flatten(outputs) if isinstance(t, torch.Tensor) and t.grad_fn is not None]
    while stack:
        fn = stack.pop()
        if fn is None or fn in visited:
            continue
        visited.add(fn)
        if fn in produced:
            if produced[fn] not in heads:
                heads.append(produced[fn])
            continue
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    order = list(layers)
    return sorted(heads, key=order.index)


# --- onnx2torch graphs --------------------------------------------------------------------------------

def _normalise_graph(module: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> list[str]:
    """Rewrite the onnx2torch ops Torch-Pruning cannot follow; returns a note per rewrite.

    - a Reshape to a constant shape that flattens trailing axes ([-1, 512] after a [N, 32, 4, 4] tensor) would
      keep its old sizes after pruning: it becomes torch.flatten, which Torch-Pruning maps channel by channel;
    - a BatchNormalization whose statistics are constant tensors (onnx2torch's OnnxBatchNorm, e.g. after an
      export in training mode) becomes an nn.BatchNorm module, which Torch-Pruning prunes with its conv.
    """
    if not isinstance(module, torch.fx.GraphModule):
        return []
    from torch.fx.passes.shape_prop import ShapeProp

    try:
        ShapeProp(module).propagate(*example_inputs)
    except Exception:
        return []  # leave the graph alone; tracing or the check after pruning reports what fails
    notes: list[str] = []
    graph = module.graph
    for node in list(graph.nodes):
        if node.op != "call_module":
            continue
        kind = type(module.get_submodule(node.target)).__name__
        if kind == "OnnxReshape" and len(node.args) == 2:
            note = _flatten_reshape(module, node)
        elif kind == "OnnxBatchNorm" and len(node.args) == 5:
            note = _module_batchnorm(module, node)
        else:
            continue
        if note:
            notes.append(note)
    if notes:
        graph.eliminate_dead_code()
        graph.lint()
        module.recompile()
        module.delete_all_unused_submodules()
    return notes


def _constant(module: torch.fx.GraphModule, node: Any) -> torch.Tensor | None:
    """The tensor a node always yields (an initializer, a Constant, or a copy of one), else None."""
    if not isinstance(node, torch.fx.Node):
        return None
    if node.op == "get_attr":
        value = module
        for part in module_path(node).split("."):
            value = getattr(value, part)
        return value if isinstance(value, torch.Tensor) else None
    if node.op == "call_module":
        target = module.get_submodule(module_path(node))
        kind = type(target).__name__
        constant = getattr(target, "value", None)
        if kind == "OnnxConstant" and not node.args and isinstance(constant, torch.Tensor):
            return constant
        if kind == "OnnxCopyIdentity" and len(node.args) == 1:
            return _constant(module, node.args[0])
    return None


def _shape(node: Any) -> list[int] | None:
    meta = getattr(node, "meta", {}).get("tensor_meta")
    return list(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _flatten_reshape(module: torch.fx.GraphModule, node: torch.fx.Node) -> str | None:
    source, shape_node = node.args
    constant = _constant(module, shape_node)
    if constant is None:
        return None
    before, after = _shape(source), _shape(node)
    if before is None or after is None or len(after) > len(before) or not after:
        return None
    axis = len(after) - 1
    if before[:axis] != after[:axis] or math.prod(before[axis:]) != after[axis] or len(before) == len(after):
        return None
    with module.graph.inserting_before(node):
        flat = module.graph.call_function(torch.flatten, (source, axis))
    flat.meta = dict(node.meta)
    node.replace_all_uses_with(flat)
    module.graph.erase_node(node)
    return f"Reshape {node.target!r} to the constant shape {constant.tolist()} became a flatten from axis {axis}"


def _module_batchnorm(module: torch.fx.GraphModule, node: torch.fx.Node) -> str | None:
    source, *stats = node.args
    tensors = [t for t in (_constant(module, arg) for arg in stats) if t is not None]
    shape = _shape(source)
    if len(tensors) != len(stats) or shape is None or not 3 <= len(shape) <= 5:
        return None
    weight, bias, mean, var = (t.detach().clone().float() for t in tensors)
    kind = {3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[len(shape)]
    old = module.get_submodule(module_path(node))
    # onnx2torch's OnnxBatchNorm keeps ONNX's epsilon and momentum as plain attributes
    layer = kind(weight.numel(), eps=cast(float, old.epsilon), momentum=cast(float | None, old.momentum))
    if layer.weight is None or layer.bias is None or layer.running_mean is None or layer.running_var is None:
        raise TypeError("a new BatchNorm (affine, tracking statistics) has all four tensors")
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
        layer.running_mean.copy_(mean)
        layer.running_var.copy_(var)
    layer.to(weight.device)
    layer.train(old.training)
    module.add_submodule(module_path(node), layer)  # replaces the OnnxBatchNorm under the same name
    node.args = (source,)
    return f"BatchNormalization {node.target!r} with constant statistics became an nn.{kind.__name__}"


# --- checks and counts --------------------------------------------------------------------------------

def _flatten(value: Any) -> list[Any]:
    if isinstance(value, (tuple, list)):
        return [item for part in value for item in _flatten(part)]
    if isinstance(value, dict):
        return [item for part in value.values() for item in _flatten(part)]
    return [value]


def _output_shapes(outputs: Any) -> list[list[int] | None]:
    return [list(t.shape) if isinstance(t, torch.Tensor) else None for t in _flatten(outputs)]


def _run_problem(module: nn.Module, example_inputs: tuple[torch.Tensor, ...], reference: list,
                 keep_head: bool) -> str | None:
    """Run the pruned model once: what an op Torch-Pruning did not follow broke, or None when it still works."""
    try:
        with torch.no_grad():
            shapes = _output_shapes(module(*example_inputs))
    except Exception as exc:
        return f"the pruned model no longer runs: {_first(exc)}"
    if keep_head and shapes != reference:
        return f"pruning changed the output shapes from {reference} to {shapes}"
    if not keep_head and [s[:1] if s else s for s in shapes] != [s[:1] if s else s for s in reference]:
        return f"pruning changed the batch axis of the outputs ({reference} -> {shapes})"
    return None


def _become(module: nn.Module, source: nn.Module) -> None:
    """Turn `module` into `source` (a copy of the same model) while keeping the object the caller holds."""
    module.__dict__.clear()
    module.__dict__.update(source.__dict__)
    if isinstance(module, torch.fx.GraphModule):
        module.graph = module.graph  # the graph now belongs to `module`, whose own class gets its forward again


def _count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _count_macs(module: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> int:
    import torch_pruning as tp

    with torch.no_grad():
        macs, _params = tp.utils.count_ops_and_params(module, example_inputs)
    return int(macs)


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def _first(exc: BaseException, limit: int = 300) -> str:
    """The first line of an error, shortened: what a report shows per layer."""
    lines = str(exc).strip().splitlines()
    return _short(RuntimeError(lines[0]) if lines else exc, limit)


def _short(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
