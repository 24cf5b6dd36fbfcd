"""Training on models exported with a fixed batch size.

Many exports (CNTK, older torch.onnx traces, TF converters) declare batch 1 on every input and bake
that 1 into a Reshape's shape constant (opt-mnist's `Reshape(x, [1, 256])`): the converted module
then fails on any other batch, and training feeds mini-batches. Two remedies, tried in order:

1. `agnostic_batch` rewrites the ONNX graph before conversion: a Reshape whose constant target shape
   starts with the fixed batch, on data whose first axis is that batch, copies the first axis instead
   (ONNX's 0 in a Reshape shape: at the fixed batch the same model, at any other batch the same per
   sample); an Expand to [B, ...] with B > 1 on data of batch B broadcasts from 1 instead. The
   conversion check then compares the rewritten module with the original model at the fixed batch.
2. `check_batching` runs the module once on several batches' worth of samples stacked together and
   compares with the per-batch outputs. When that fails (another op hard-codes the batch, or an
   output has no batch axis) the training paths wrap the module in `SampleSplit`, which feeds the
   fixed batch at a time and concatenates the outputs: the loss over the mini-batch, hence the
   gradient, is the one a batched forward would give (gradient accumulation in one backward).
   Batch norms then keep their running statistics (batches of one give no statistics to learn).

The exported model keeps the original's declared shapes (a fixed batch 1 stays 1): to_onnx traces at
the fixed batch and gives only the original's free axes dynamic names.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from app.errors import StepFailed
from workers.bridge.check import failures, figures

DEFAULT_CHUNK = 256     # samples per ONNX Runtime run on models whose batch axis is free


def fixed_batch(input_shapes: dict[str, list[Any]]) -> int | None:
    """The batch size every input declares as a fixed first dim, or None when any first axis is free."""
    firsts = [shape[0] for shape in input_shapes.values() if shape]
    if not firsts or not all(isinstance(d, int) and d > 0 for d in firsts) or len(set(firsts)) != 1:
        return None
    return int(firsts[0])


# --- 1. the ONNX rewrite --------------------------------------------------------------------------

def agnostic_batch(model: onnx.ModelProto, batch: int) -> list[dict[str, Any]]:
    """Rewrite `model` in place so that its constant target shapes follow the batch; one record per node."""
    from workers.bridge.rewrites import _constant, _inferred_shapes, node_label

    graph = model.graph
    constants = {t.name: t for t in graph.initializer}
    constants.update({n.output[0]: n.attribute[0].t for n in graph.node
                      if n.op_type == "Constant" and len(n.attribute) == 1 and n.attribute[0].name == "value"})
    candidates = [(i, n) for i, n in enumerate(graph.node)
                  if n.op_type in ("Reshape", "Expand") and len(n.input) > 1 and n.input[1] in constants]
    if not candidates:
        return []
    try:
        shapes = _inferred_shapes(model)
    except Exception:
        return []
    records = []
    for index, node in candidates:
        target = numpy_helper.to_array(constants[node.input[1]]).astype(np.int64)
        data = shapes.get(node.input[0]) or []
        if target.ndim != 1 or not target.size or int(target[0]) != batch or not data or data[0] != batch:
            continue
        if node.op_type == "Reshape":
            if any(a.name == "allowzero" and a.i == 1 for a in node.attribute):
                continue
            replacement = 0        # copy the data's first axis
        elif batch > 1:
            replacement = 1        # Expand broadcasts a first axis of 1 to the data's
        else:
            continue               # an Expand to batch 1 already broadcasts
        rewritten = target.copy()
        rewritten[0] = replacement
        label = node_label(node, index)
        node.input[1] = _constant(model, f"{label}__batch_free_shape", rewritten)
        records.append({"node": label, "op": node.op_type, "shape": target.tolist(), "now": rewritten.tolist()})
    return records


# --- 2. the batch check ------------------------------------------------------------------------------

def check_batching(module: nn.Module, input_names: list[str], output_names: list[str],
                   feeds: list[dict[str, np.ndarray]], outputs: list[list[np.ndarray]]) -> dict[str, Any]:
    """Whether `module` takes several batches stacked: its outputs on the stacked `feeds` against `outputs`
    (its own, per feed). Returns {"stacked_samples", "check" | "error"} with "batched": bool."""
    from workers.bridge.check import run_module

    stacked = {name: np.concatenate([feed[name] for feed in feeds]) for name in input_names}
    expected = [[np.concatenate([run[i] for run in outputs]) for i in range(len(output_names))]]
    samples = int(next(iter(stacked.values())).shape[0]) if stacked else 0
    try:
        produced = run_module(module, input_names, [stacked])
        check = figures(expected, produced, output_names, inputs="stacked", samples=samples)
    except Exception as exc:
        text = " ".join(str(exc).split())[:300] or type(exc).__name__
        return {"batched": False, "stacked_samples": samples, "error": text}
    problems = failures(check)
    result = {"batched": not problems, "stacked_samples": samples, "check": check}
    if problems:
        result["error"] = "; ".join(problems)
    return result


# --- feeding a fixed batch at a time -----------------------------------------------------------------

def _pieces(count: int, size: int) -> list[tuple[int, int]]:
    return [(start, min(start + size, count)) for start in range(0, count, size)]


def _padded(array, start: int, stop: int, size: int):
    """array[start:stop], its last sample repeated up to `size` rows (a fixed-batch model takes no fewer)."""
    part = array[start:stop]
    missing = size - (stop - start)
    if missing <= 0:
        return part
    if isinstance(part, torch.Tensor):
        return torch.cat([part, part[-1:].expand(missing, *part.shape[1:])])
    return np.concatenate([part, np.repeat(part[-1:], missing, axis=0)])


class SampleSplit(nn.Module):
    """`module` called on `size` samples at a time, outputs concatenated along the batch axis.

    For training a module that only runs at its fixed batch: autograd flows through the concatenation,
    so one backward over the mini-batch gives the gradient a batched forward would. A last piece short
    of `size` is padded with its last sample, whose extra outputs are dropped. In train mode batch
    norms stay in eval mode: statistics of `size` samples (often one) would wreck their running ones.
    With `vectorized`, the pieces run in one call through torch.func.vmap (each call sees exactly
    `size` samples, usually much faster than a loop); where vmap meets an op it cannot
    batch, the loop takes over for good.
    """

    def __init__(self, module: nn.Module, size: int, vectorized: bool = True) -> None:
        super().__init__()
        self.module = module
        self.size = size
        self.vectorized = vectorized

    def train(self, mode: bool = True) -> SampleSplit:
        super().train(mode)
        if mode:
            for layer in self.module.modules():
                if isinstance(layer, nn.modules.batchnorm._BatchNorm):
                    layer.eval()
        return self

    def forward(self, *inputs: torch.Tensor) -> Any:
        count = int(inputs[0].shape[0])
        if count == self.size:
            return self.module(*inputs)
        if self.vectorized:
            try:
                return self._vectorized(count, inputs)
            except StepFailed:
                raise
            except Exception:
                self.vectorized = False
        parts, single = [], False
        for start, stop in _pieces(count, self.size):
            produced = self.module(*[_padded(t, start, stop, self.size) for t in inputs])
            single = not isinstance(produced, (tuple, list))
            parts.append((stop - start, (produced,) if single else produced))
        joined = []
        for position in range(len(parts[0][1])):
            pieces = []
            for rows, produced in parts:
                tensor = produced[position]
                if not isinstance(tensor, torch.Tensor) or tensor.dim() == 0 or tensor.shape[0] != self.size:
                    raise StepFailed(
                        f"the model runs only at a fixed batch of {self.size} and its output {position} has no "
                        f"batch axis (shape {list(getattr(tensor, 'shape', []))}), so samples cannot be trained "
                        "on one batch at a time", code="fixed_batch_unsupported")
                pieces.append(tensor[:rows])
            joined.append(torch.cat(pieces))
        return joined[0] if single else tuple(joined)


    def _vectorized(self, count: int, inputs: tuple[torch.Tensor, ...]) -> Any:
        pieces = -(-count // self.size)
        stacked = [_padded(t, 0, count, pieces * self.size).reshape(pieces, self.size, *t.shape[1:]) for t in inputs]
        produced = torch.func.vmap(self.module, randomness="different")(*stacked)
        single = not isinstance(produced, (tuple, list))
        joined = []
        for position, tensor in enumerate((produced,) if single else produced):
            if not isinstance(tensor, torch.Tensor) or tensor.dim() < 2 or tensor.shape[1] != self.size:
                raise StepFailed(
                    f"the model runs only at a fixed batch of {self.size} and its output {position} has no "
                    f"batch axis (shape {list(getattr(tensor, 'shape', [])[1:])}), so samples cannot be trained "
                    "on one batch at a time", code="fixed_batch_unsupported")
            joined.append(tensor.reshape(pieces * self.size, *tensor.shape[2:])[:count])
        return joined[0] if single else tuple(joined)


def for_training(module: nn.Module, batch: dict[str, Any]) -> nn.Module:
    """The module as the training loops call it (`batch`: its Bridged.batch): itself, or split into its
    fixed batch."""
    if batch.get("feeding") != "fixed_batch_at_a_time":
        return module
    return SampleSplit(module, batch["fixed"], vectorized=batch.get("vectorized", False))


def session_batch(runner) -> int | None:
    """The fixed batch of an ONNX Runtime session's inputs, or None when the first axis is free."""
    return fixed_batch({i.name: list(i.shape) for i in runner.get_inputs()})


def run_in_batches(runner, feeds: dict[str, np.ndarray], output_names: list[str] | None = None) -> list[np.ndarray]:
    """Run an ONNX Runtime session over all samples of `feeds`: at its fixed batch (the last piece padded)
    or DEFAULT_CHUNK samples at a time; outputs concatenated along the batch axis."""
    size = session_batch(runner)
    names = [i.name for i in runner.get_inputs()]
    count = int(np.shape(feeds[names[0]])[0]) if names else 1
    step = size or DEFAULT_CHUNK
    parts: list[list[np.ndarray]] = []
    for start, stop in _pieces(count, step):
        feed = {n: np.ascontiguousarray(_padded(feeds[n], start, stop, size) if size else feeds[n][start:stop])
                for n in names}
        produced = runner.run(output_names, feed)
        parts.append([np.asarray(p)[: stop - start] if size else np.asarray(p) for p in produced])
    return [np.concatenate([part[i] for part in parts]) for i in range(len(parts[0]))] if parts else []
