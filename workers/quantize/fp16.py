"""quantize.fp16: float16 weights and compute, inputs and outputs kept in their original types.

The conversion is ONNX Runtime's `onnxruntime.transformers.float16.convert_float_to_float16`,
the maintained fork of onnxconverter-common's converter (opset-aware Resize handling, mixed
float inputs of GroupNorm/Resize, initializers kept float32 where only float32 nodes read
them); it ships with onnxruntime, so no extra dependency. Ops that cannot take float16 stay
float32 behind Casts: the converter's default list, every op whose ONNX schema at the model's
opset has no float16 type for a float input, and any node ONNX Runtime's CPU provider still
refuses when the converted model is loaded and run once here (those are found and blocked one
round at a time). The result is handed back only once it loads and runs on CPU.
"""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

from app.catalog.quantize.fp16 import CONVERTER_DEFAULT_BLOCK_LIST, Fp16Params
from app.errors import StepFailed
from workers.methods import implements
from workers.methods.base import StepContext, StepOutput

MAX_RETRIES = 8  # rounds of "load, find the node ORT refuses, block its op type"
NODE_IN_ERROR = (
    re.compile(r"implementation for (?P<op>\w+)\(\d+\) node with name '(?P<node>[^']*)'"),
    re.compile(r"operator \((?P<op>\w+)\) in node \((?P<node>[^)]*)\)"),
    re.compile(r"[Nn]ode \((?P<node>[^)]+)\) Op \((?P<op>\w+)\)"),
)
CPU_NOTE = (
    "on CPU, float16 usually runs no faster and often slower than float32: most x86 CPUs have no float16 "
    "arithmetic, and ONNX Runtime runs the ops it has no float16 kernel for in float32 behind Casts. The gain is "
    "size (about half) and speed on GPUs (tensor cores)"
)


@implements("quantize.fp16")
def convert(input_path: Path, params: Fp16Params, out_dir: Path, ctx: StepContext | None = None) -> StepOutput:
    import onnx

    from workers.quantize import onnx_prep

    ctx = ctx or StepContext()
    float16 = _import_converter()
    model = onnx.load(str(input_path))
    onnx_prep.name_nodes(model.graph)
    dropped = onnx_prep.drop_initializer_inputs(model.graph)  # else keep_io_types would cast, not convert, them
    model.ir_version = max(model.ir_version, 4)
    notes = [f"removed {dropped} initializer(s) from the graph inputs so they are converted"] if dropped else []
    float_initializers = _initializers_of(model.graph, onnx.TensorProto.FLOAT)
    float_io = [v.name for v in [*model.graph.input, *model.graph.output]
                if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT]
    if not float_initializers and not float_io:
        raise StepFailed("nothing to convert: the model has no float32 weights, inputs or outputs",
                         code="nothing_to_convert")

    base_list = list(CONVERTER_DEFAULT_BLOCK_LIST if params.op_block_list is None else params.op_block_list)
    no_fp16 = sorted(_ops_without_float16(model, _always_float_inputs(float16, model)) - set(base_list))
    block = set(base_list) | set(no_fp16)
    refused: list[dict[str, str]] = []
    output = out_dir / "model.onnx"
    for attempt in range(MAX_RETRIES + 1):
        ctx.report(0.1 + 0.8 * attempt / (MAX_RETRIES + 1), "converting to float16"
                   + (f" (round {attempt + 1}: {len(refused)} op type(s) ONNX Runtime refused kept float32)"
                      if attempt else ""))
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        try:
            converted = float16.convert_float_to_float16(
                copy, keep_io_types=params.keep_io_types, op_block_list=sorted(block),
            )
        except Exception as exc:
            raise StepFailed(f"float16 conversion failed: {onnx_prep.short_error(exc, 400)}",
                             code="conversion_failed") from exc
        onnx.save(converted, str(output))
        error, overflow = _load_and_run(input_path, output, shapes=ctx.input_shapes)
        if error is None:
            break
        culprit = _culprit(error)
        if culprit is None or culprit[0] in block or attempt == MAX_RETRIES:
            output.unlink(missing_ok=True)
            tried = f" (it was kept in float32 already: {culprit[0]})" if culprit and culprit[0] in block else ""
            raise StepFailed(f"the float16 model does not run on ONNX Runtime's CPU provider: {error}{tried}",
                             code="conversion_failed")
        block.add(culprit[0])
        refused.append({"op_type": culprit[0], "node": culprit[1], "error": error[:300]})

    ctx.report(0.95, "counting converted tensors")
    kept_ops = Counter(node.op_type for node in model.graph.node if node.op_type in block)
    half = _initializers_of(converted.graph, onnx.TensorProto.FLOAT16)
    before_half = _initializers_of(model.graph, onnx.TensorProto.FLOAT16)
    still_float = _initializers_of(converted.graph, onnx.TensorProto.FLOAT)
    casts = Counter(node.op_type for node in converted.graph.node)["Cast"] - \
        Counter(node.op_type for node in model.graph.node)["Cast"]
    warnings = [CPU_NOTE]
    if overflow:
        warnings.append(f"output(s) {', '.join(map(repr, overflow))} held inf or NaN on generated inputs where the "
                        "float32 model's did not: float16 overflowed (largest float16: 65504); keep the op types "
                        "involved in float32 with op_block_list")
    if refused:
        warnings.append(f"ONNX Runtime's CPU provider refused {', '.join(r['op_type'] for r in refused)} in "
                        "float16; those ops were kept float32")
    details: dict[str, Any] = {
        "initializers_converted": len(half - before_half),
        "initializers_kept_float32": len(still_float),
        "float32_initializers_before": len(float_initializers),
        "ops_kept_float32": dict(sorted(kept_ops.items())),
        "op_block_list": sorted(block),
        "op_block_list_added": {
            "no_float16_in_onnx_schema": no_fp16,
            "refused_by_onnxruntime_cpu": refused,
        },
        "keep_io_types": params.keep_io_types,
        "io_types": "float32 inputs and outputs kept float32" if params.keep_io_types and float_io
        else "float32 inputs and outputs became float16" if float_io else "no float inputs or outputs",
        "casts_inserted": casts,
        "notes": notes,
        "warnings": warnings,
    }
    return StepOutput(model_path=output, details=details)


def _import_converter():
    # Its package's __init__ appends the package folder to sys.path; ORT's own quantization modules
    # rely on that (onnx_utils imports fusion_utils by bare name), so the path is left as it is.
    from onnxruntime.transformers import float16

    return float16


def _initializers_of(graph, data_type: int) -> set[str]:
    """Names of initializers of one type, in the graph and in its subgraphs."""
    found = {init.name for init in graph.initializer if init.data_type == data_type}
    for node in graph.node:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                found |= _initializers_of(sub, data_type)
    return found


def _ops_without_float16(model, always_float: dict[str, list[int]]) -> set[str]:
    """Op types in the model whose schema, at the model's opset, takes float32 but not float16 for an input.

    Inputs the converter keeps float32 by itself (`always_float`, e.g. Resize's scales) do not count.
    """
    from onnx import defs

    from workers.quantize.onnx_prep import default_opset

    opset = default_opset(model) or defs.onnx_opset_version()
    found = set()
    for op_type in {node.op_type for node in model.graph.node if node.domain in ("", "ai.onnx")}:
        try:
            schema = defs.get_schema(op_type, opset)
        except Exception:
            continue
        constraints = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}
        for index, formal in enumerate(schema.inputs):
            allowed = constraints.get(formal.type_str, {formal.type_str})
            if "tensor(float)" in allowed and "tensor(float16)" not in allowed \
                    and index not in always_float.get(op_type, []):
                found.add(op_type)
                break
    return found


def _always_float_inputs(float16, model) -> dict[str, list[int]]:
    """The converter's own float32-only inputs, with its opset rule for Resize (scales moved in opset 11)."""
    from workers.quantize.onnx_prep import default_opset

    inputs = dict(getattr(float16, "ALWAYS_FLOAT_INPUTS", {}))
    if (default_opset(model) or 11) <= 10:
        inputs["Resize"] = [1]
    return inputs


def _load_and_run(original: Path, converted: Path, *, shapes=None) -> tuple[str | None, list[str]]:
    """Load the converted model on CPU and run it once on generated inputs.

    Returns (the error text or None, names of outputs that overflowed to inf/NaN where the original's did not).
    """
    import numpy as np
    import onnx
    import onnxruntime as ort

    from app.errors import MeasurementFailed
    from workers.onnx_tools.inputs import plan_inputs

    options = ort.SessionOptions()
    options.log_severity_level = 3
    # Loading logs a warning per initializer an old export lists as an input; keep the worker log readable.
    ort.set_default_logger_severity(3)
    try:
        result = ort.InferenceSession(str(converted), options, providers=["CPUExecutionProvider"])
        baseline = ort.InferenceSession(str(original), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        return " ".join(str(exc).split()), []
    finally:
        ort.set_default_logger_severity(2)  # ONNX Runtime's default: warnings
    structures = {"baseline": onnx.load(str(original), load_external_data=False),
                  "result": onnx.load(str(converted), load_external_data=False)}
    try:
        plan = plan_inputs({"baseline": baseline, "result": result}, structures, shapes=shapes)
    except MeasurementFailed:
        return None, []  # inputs this service cannot generate: loading is the check it gets
    feeds = plan.feeds(plan.fixed_batch or 1, np.random.default_rng(0))
    try:
        got = result.run(None, feeds["result"])
    except Exception as exc:
        return " ".join(str(exc).split()), []
    names = [o.name for o in result.get_outputs()]
    bad = [i for i, value in enumerate(got)
           if isinstance(value, np.ndarray) and value.dtype.kind == "f" and not np.isfinite(value).all()]
    if not bad:
        return None, []
    expected = baseline.run(None, feeds["baseline"])
    return None, [names[i] for i in bad if np.isfinite(expected[i]).all()]


def _culprit(error: str) -> tuple[str, str] | None:
    for pattern in NODE_IN_ERROR:
        match = pattern.search(error)
        if match:
            return match.group("op"), match.group("node")
    return None
