"""ONNX -> PyTorch -> ONNX, for the methods that train or prune (they need nn modules, not a graph).

`to_torch` rewrites the uploaded model where onnx2torch needs it (workers.bridge.rewrites),
converts it, makes its constant weights trainable (workers.bridge.trainable) and checks the
module against the original in ONNX Runtime before anyone trains it: a conversion that
changed the model would otherwise surface only as a bad accuracy figure at the end of a job.
A model declared at a fixed batch is made to train on mini-batches where a rewrite allows, or is
fed its fixed batch at a time (workers.bridge.batching; Bridged.batch says which).
`to_onnx` exports a (possibly pruned) module back with the original's names and dynamic axes,
and checks the export the same way.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import onnx
import torch

from app.errors import StepFailed
from workers.bridge.batching import SampleSplit, agnostic_batch, check_batching, fixed_batch, for_training
from workers.bridge.check import figures, require_match, run_module, run_onnx, sample_count
from workers.bridge.errors import ConversionMismatch, UnsupportedOp
from workers.bridge.loader import onnx2torch
from workers.bridge.rewrites import default_opset, node_label, prepare
from workers.bridge.trainable import make_trainable

__all__ = ["Bridged", "ConversionMismatch", "SampleSplit", "UnsupportedOp", "compare", "example_feeds", "for_training",
           "module_name", "to_onnx", "to_torch"]

CHECK_SAMPLES = 8          # dataset samples the conversion checks run on
EXPORT_OPSET_FLOOR, EXPORT_OPSET_CAP = 13, 17
Shape = list[int | str | None]


@dataclass
class Bridged:
    module: torch.nn.Module                 # float32, eval() mode, parameters trainable
    input_names: list[str]                  # the ONNX model's real inputs (initializers excluded)
    output_names: list[str]
    input_shapes: dict[str, Shape]          # declared: int, dim_param string, or None
    input_dtypes: dict[str, np.dtype]
    opset: int                              # the original model's default-domain opset
    check: dict[str, Any]                   # the conversion check (JSON-able), see workers.bridge.check
    notes: list[str]                        # rewrites applied before conversion (JSON-able)
    # Not in the first draft of the API; defaulted so that code constructing Bridged keeps working.
    output_shapes: dict[str, Shape] = field(default_factory=dict)   # declared, for to_onnx's dynamic axes
    vocabularies: dict[str, int] = field(default_factory=dict)      # input -> rows of the table it indexes
    shapes: Any = None  # the job's input shapes (app.formats.input_shapes.InputShapes) for generated inputs
    # How training feeds a model exported with a fixed batch (workers.bridge.batching); JSON-able.
    batch: dict[str, Any] = field(default_factory=lambda: {"fixed": None, "feeding": "mini_batches"})
    output_dtypes: dict[str, np.dtype] = field(default_factory=dict)

    @property
    def micro_batch(self) -> int | None:
        """Samples per forward pass the module takes: None for any number, else its fixed batch."""
        return self.batch["fixed"] if self.batch.get("feeding") == "fixed_batch_at_a_time" else None


def to_torch(model_path: Path, *, sample: dict[str, np.ndarray] | None = None, shapes: Any = None) -> Bridged:
    """The model at `model_path` as a trainable nn.Module, checked against ONNX Runtime.

    `sample` (arrays named after the inputs, sample axis first) feeds the check; without it
    the check runs on inputs generated from the declared specs. Raises UnsupportedOp or
    ConversionMismatch; the file is never modified.
    """
    from workers.onnx_tools.inputs import gather_vocabularies

    model_path = Path(model_path)
    try:
        model = onnx.load(str(model_path))
    except Exception as exc:
        raise StepFailed(f"the model cannot be loaded as ONNX: {_short(exc)}") from exc
    initializers = {t.name for t in model.graph.initializer}
    inputs = [v for v in model.graph.input if v.name not in initializers]
    prepared = prepare(model)
    batch = fixed_batch({v.name: _declared_shape(v) for v in inputs})
    rewrites = agnostic_batch(prepared.model, batch) if batch is not None else []
    module = _convert(prepared.model)
    notes = prepared.notes + make_trainable(module)
    module.eval()

    bridged = Bridged(
        module=module,
        input_names=[v.name for v in inputs],
        output_names=[v.name for v in model.graph.output],
        input_shapes={v.name: _declared_shape(v) for v in inputs},
        input_dtypes={v.name: _declared_dtype(v) for v in inputs},
        opset=default_opset(model),
        check={},
        notes=notes,
        output_shapes={v.name: _declared_shape(v) for v in model.graph.output},
        output_dtypes={v.name: _declared_dtype(v) for v in model.graph.output},
        vocabularies={k: v for k, v in gather_vocabularies(model).items() if k in {i.name for i in inputs}},
        shapes=shapes,
    )
    del model, prepared
    feeds, kind = _check_feeds(bridged, sample)
    reference = run_onnx(model_path, feeds, bridged.output_names)
    produced = run_module(module, bridged.input_names, feeds)
    bridged.check = figures(reference, produced, bridged.output_names, inputs=kind, samples=sample_count(feeds))
    require_match(bridged.check, "the converted PyTorch module")
    if batch is not None:
        bridged.batch = _batching(bridged, batch, rewrites, feeds, produced)
    return bridged


def to_onnx(module: torch.nn.Module, bridged: Bridged, dst: Path, *,
            sample: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """Export `module` to `dst` (one file) with the original's names and dynamic axes, and check it.

    The export traces `module`, so it follows the module's current shapes (a pruned layer exports
    at its new width). The check compares the file in ONNX Runtime with the module itself.
    """
    dst = Path(dst)
    opset = min(max(bridged.opset, EXPORT_OPSET_FLOOR), EXPORT_OPSET_CAP)
    dynamic_axes = {name: _dynamic_axes(name, shape)
                    for name, shape in {**bridged.input_shapes, **bridged.output_shapes}.items()}
    dynamic_axes = {name: axes for name, axes in dynamic_axes.items() if axes}
    trace_feed = _sample_feeds(bridged, sample)[0] if sample is not None else example_feeds(bridged)
    args = tuple(torch.from_numpy(np.ascontiguousarray(trace_feed[n])) for n in bridged.input_names)

    was_training = module.training
    module.eval()
    try:
        try:
            _export(module, args, dst, bridged, dynamic_axes, opset)
        except StepFailed:
            if bridged.opset <= EXPORT_OPSET_CAP:
                raise
            opset = bridged.opset  # the original needs a newer opset than the cap: export at its own
            _export(module, args, dst, bridged, dynamic_axes, opset)
    finally:
        module.train(was_training)
    pinned = _pin_fixed_dims(dst, bridged)

    try:
        onnx.checker.check_model(str(dst))
    except onnx.checker.ValidationError as exc:
        raise StepFailed(f"the exported model fails the ONNX checker: {_short(exc)}") from exc
    if sample is not None:
        feeds, kind = _sample_feeds(bridged, sample), "dataset"
    else:
        # Another batch size (where free) and other values than the trace: dynamic axes must hold.
        feeds, kind = [example_feeds(bridged, batch=3, seed=1)], "generated"
    reference = run_module(module, bridged.input_names, feeds)
    exported = run_onnx(dst, feeds, bridged.output_names)
    check = figures(reference, exported, bridged.output_names, inputs=kind, samples=sample_count(feeds))
    require_match(check, "the exported ONNX model")
    return {"opset": opset, "dynamic_axes": {k: {str(a): n for a, n in v.items()} for k, v in dynamic_axes.items()},
            "check": check, "contract": {**_keeps_contract(dst, bridged), "pinned": pinned}}


def compare(original_path: Path, candidate: Path | torch.nn.Module, feeds: dict[str, np.ndarray]) -> dict[str, Any]:
    """Per-output figures (max abs diff, cosine, reference max abs) of `candidate` against the original."""
    from workers.bridge.check import session

    original = session(Path(original_path))
    input_names = [i.name for i in original.get_inputs()]
    output_names = [o.name for o in original.get_outputs()]
    feed = {name: np.ascontiguousarray(feeds[name]) for name in input_names}
    reference = [original.run(output_names, feed)]
    del original
    if isinstance(candidate, torch.nn.Module):
        produced = run_module(candidate, input_names, [feed])
    else:
        produced = run_onnx(Path(candidate), [feed], output_names)
    return figures(reference, produced, output_names, inputs="given", samples=sample_count([feed]))


def example_feeds(bridged: Bridged, batch: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs generated from the declared specs, by the same rules the measurements use.

    A free batch axis gets `batch`; other free axes a size guessed from their name; token ids
    stay inside the vocabulary of the table they index, masks are ones, floats standard normal.
    """
    from workers.onnx_tools.inputs import ORT_DTYPES, plan_inputs

    type_names = {np.dtype(v): k for k, v in ORT_DTYPES.items()}
    specs = []
    for name in bridged.input_names:
        dtype = np.dtype(bridged.input_dtypes[name])
        if dtype not in type_names:
            raise StepFailed(f"cannot generate values for input '{name}' of type {dtype}")
        specs.append(SimpleNamespace(name=name, type=type_names[dtype], shape=list(bridged.input_shapes[name])))
    runner = SimpleNamespace(get_inputs=lambda: specs)
    structure = _vocabulary_model(bridged.vocabularies)
    plan = plan_inputs({"baseline": runner, "result": runner}, {"baseline": structure, "result": structure},
                       shapes=bridged.shapes)
    return plan.feeds(batch if plan.fixed_batch is None else plan.fixed_batch,
                      np.random.default_rng(seed))["baseline"]


# --- helpers -----------------------------------------------------------------------------------------

def module_name(node_name: str) -> str:
    """The name of the converted module of an ONNX node: onnx2torch turns dots, which module names cannot
    hold, into slashes, and drops leading slashes ("/features/features.0/Conv" -> "features/features/0/Conv")."""
    return node_name.replace(".", "/").lstrip("/")


def _convert(model: onnx.ModelProto) -> torch.fx.GraphModule:
    package, _ = onnx2torch()
    try:
        return package.convert(model)
    except Exception as exc:
        label, op, cause = _failing_node(model)
        if label is None:
            raise StepFailed(f"onnx2torch could not convert the model: {_short(exc)}",
                             code="conversion_failed") from exc
        cause = cause or exc  # (a node found failing comes with its own exception)
        if isinstance(cause, NotImplementedError):
            raise UnsupportedOp(f"op '{op}' at node '{label}' cannot be converted to PyTorch with its attributes: "
                                f"{_short(cause)}", ops=[op]) from exc
        raise StepFailed(f"onnx2torch could not convert op '{op}' at node '{label}': {_short(cause)}",
                         code="conversion_failed") from exc


def _failing_node(model: onnx.ModelProto) -> tuple[str | None, str | None, Exception | None]:
    """Convert node by node to find which one onnx2torch trips on (only run after it failed)."""
    from onnx2torch.node_converters import get_converter
    from onnx2torch.onnx_graph import OnnxGraph
    from onnx2torch.utils.safe_shape_inference import safe_shape_inference

    inferred = safe_shape_inference(model)
    initializers = {t.name for t in inferred.graph.initializer}
    for value in [v for v in inferred.graph.input if v.name in initializers]:
        inferred.graph.input.remove(value)
    imports = {e.domain: e.version for e in inferred.opset_import}
    graph = OnnxGraph(inferred.graph)
    for index, (node, onnx_node) in enumerate(zip(inferred.graph.node, graph.nodes.values())):
        try:
            converter = get_converter(domain=node.domain, operation_type=node.op_type,
                                      version=imports.get(node.domain, 1))
            converter(onnx_node, graph)
        except Exception as exc:
            return node_label(node, index), node.op_type, exc
    return None, None, None


def _declared_shape(value: onnx.ValueInfoProto) -> Shape:
    tensor = value.type.tensor_type
    if not tensor.HasField("shape"):
        return []
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim]


def _declared_dtype(value: onnx.ValueInfoProto) -> np.dtype:
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type))


def _dynamic_axes(name: str, shape: Shape) -> dict[int, str]:
    """Axes that were free in the original keep their dim_param; unnamed free axes get a name."""
    safe = re.sub(r"\W", "_", name)
    return {axis: dim if isinstance(dim, str) else f"{safe}_dim{axis}"
            for axis, dim in enumerate(shape) if not isinstance(dim, int)}


def _export(module: torch.nn.Module, args: tuple[torch.Tensor, ...], dst: Path, bridged: Bridged,
            dynamic_axes: dict[str, dict[int, str]], opset: int) -> None:
    import warnings

    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, args, str(dst), dynamo=False, opset_version=opset,
                              input_names=bridged.input_names, output_names=bridged.output_names,
                              dynamic_axes=dynamic_axes, do_constant_folding=True)
    except Exception as exc:
        raise StepFailed(f"the PyTorch module could not be exported to ONNX opset {opset}: {_short(exc)}",
                         code="export_failed") from exc
    written = onnx.load(str(dst), load_external_data=False)
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in written.graph.initializer):
        raise StepFailed("the exported model keeps its weights in external data (over 2 GB); expected one file",
                         code="export_failed")


def _vocabulary_model(vocabularies: dict[str, int]) -> onnx.ModelProto:
    """A stand-in graph whose Gathers tell plan_inputs the vocabulary size of each token-id input."""
    from onnx import TensorProto, helper

    tables = [helper.make_tensor(f"table_{i}", TensorProto.FLOAT, [rows, 0], []) for i, rows in
              enumerate(vocabularies.values())]
    nodes = [helper.make_node("Gather", [f"table_{i}", name], [f"rows_{i}"]) for i, name in enumerate(vocabularies)]
    return helper.make_model(helper.make_graph(nodes, "vocabularies", [], [], initializer=tables))


def _check_feeds(bridged: Bridged, sample: dict[str, np.ndarray] | None) -> tuple[list[dict[str, np.ndarray]], str]:
    if sample is not None:
        return _sample_feeds(bridged, sample), "dataset"
    return [example_feeds(bridged)], "generated"


def _sample_feeds(bridged: Bridged, sample: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """The first CHECK_SAMPLES samples as feeds: one feed, or several where the batch size is fixed."""
    missing = [n for n in bridged.input_names if n not in sample]
    if missing:
        raise StepFailed(f"the sample has no array for input(s) {', '.join(map(repr, missing))}")
    first = bridged.input_shapes[bridged.input_names[0]] if bridged.input_names else []
    available = min(len(sample[n]) for n in bridged.input_names)
    fixed = first[0] if first and isinstance(first[0], int) else None
    step = fixed or min(CHECK_SAMPLES, available)
    count = max(step, min(CHECK_SAMPLES, available) // step * step)
    if available < step:
        raise StepFailed(f"the sample holds {available} samples; the model takes a fixed batch of {step}")
    return [{n: np.ascontiguousarray(np.asarray(sample[n][start:start + step]).astype(bridged.input_dtypes[n]))
             for n in bridged.input_names} for start in range(0, count, step)]


def _batching(bridged: Bridged, batch: int, rewrites: list[dict[str, Any]], feeds: list[dict[str, np.ndarray]],
              produced: list[list[np.ndarray]]) -> dict[str, Any]:
    """How training feeds a model declared at a fixed batch: mini-batches when the (rewritten) module gives
    the same outputs on stacked samples as on each fixed batch, else the fixed batch at a time."""
    if len(feeds) < 2:  # one fixed batch of samples: stack a second, generated one
        extra = example_feeds(bridged, seed=1)
        feeds = [*feeds, extra]
        produced = [*produced, *run_module(bridged.module, bridged.input_names, [extra])]
    stacked = check_batching(bridged.module, bridged.input_names, bridged.output_names, feeds, produced)
    record: dict[str, Any] = {"fixed": batch, "rewrites": rewrites, "stacked_check": stacked}
    if stacked["batched"]:
        record["feeding"] = "mini_batches"
        record["how"] = (f"the model declares a fixed batch of {batch}; "
                         + (f"{len(rewrites)} constant shape(s) holding it rewritten to follow the batch "
                            f"({', '.join(r['node'] for r in rewrites)}), and " if rewrites else "")
                         + f"the module gives the same outputs on {stacked['stacked_samples']} stacked samples: "
                         "trained on mini-batches")
    else:
        # The same stacked samples through torch.func.vmap, `batch` at a time: kept only if it gives them too.
        split = check_batching(SampleSplit(bridged.module, batch), bridged.input_names, bridged.output_names,
                               feeds, produced)
        record["feeding"] = "fixed_batch_at_a_time"
        record["vectorized"] = split["batched"]
        record["how"] = (f"the model declares a fixed batch of {batch} and its module does not take other batch "
                         f"sizes ({stacked['error']}): trained {batch} sample(s) per forward pass "
                         f"({'vectorized by torch.func.vmap' if split['batched'] else 'in a loop'}), outputs "
                         "joined over each mini-batch (one backward, as gradient accumulation), batch norms on "
                         "their running statistics")
    return record


def _pin_fixed_dims(dst: Path, bridged: Bridged) -> list[str]:
    """Declare the original's fixed dims on the export where the tracer left them symbolic.

    A Reshape rewritten to copy the batch axis (workers.bridge.batching) makes the exporter's shape
    inference lose the fixed batch of the outputs after it; the module was traced at the original's input
    shapes, and the export check below runs the file at them, so the original's figures hold."""
    written = onnx.load(str(dst))
    wanted = {**bridged.input_shapes, **bridged.output_shapes}
    pinned = []
    for value in [*written.graph.input, *written.graph.output]:
        shape = wanted.get(value.name)
        dims = value.type.tensor_type.shape.dim if value.type.tensor_type.HasField("shape") else []
        if not shape or len(shape) != len(dims):
            continue
        for axis, (old, dim) in enumerate(zip(shape, dims)):
            if isinstance(old, int) and not dim.HasField("dim_value"):
                dim.dim_value = old
                pinned.append(f"{value.name}[{axis}] = {old}")
    if pinned:
        onnx.save(written, str(dst))
    return pinned


def _keeps_contract(dst: Path, bridged: Bridged) -> dict[str, Any]:
    """The export takes and gives what the original did: names, element types, and every fixed dim (a batch
    of 1 declared by the original stays 1). Anything else is refused: the service could not compare them."""
    written = onnx.load(str(dst), load_external_data=False)
    initializers = {t.name for t in written.graph.initializer}
    got_in = {v.name: v for v in written.graph.input if v.name not in initializers}
    got_out = {v.name: v for v in written.graph.output}
    problems = []
    if list(got_in) != bridged.input_names:
        problems.append(f"inputs {list(got_in)} instead of {bridged.input_names}")
    if list(got_out) != bridged.output_names:
        problems.append(f"outputs {list(got_out)} instead of {bridged.output_names}")
    wanted = [(n, bridged.input_shapes.get(n), bridged.input_dtypes.get(n), got_in.get(n)) for n in bridged.input_names]
    wanted += [(n, bridged.output_shapes.get(n), bridged.output_dtypes.get(n), got_out.get(n))
               for n in bridged.output_names]
    for name, shape, dtype, value in wanted:
        if value is None:
            continue
        if dtype is not None and _declared_dtype(value) != dtype:
            problems.append(f"'{name}' is {_declared_dtype(value)} instead of {dtype}")
        now = _declared_shape(value)
        if shape and now and (len(now) != len(shape) or any(
                isinstance(a, int) and a != b for a, b in zip(shape, now))):
            problems.append(f"'{name}' has shape {now} instead of {shape}")
    if problems:
        raise StepFailed("the exported model does not keep the original's inputs and outputs: " + "; ".join(problems),
                         code="export_failed")
    return {"kept": True, "inputs": {n: [d if d is not None else "?" for d in bridged.input_shapes[n]]
                                     for n in bridged.input_names}}


def _short(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
