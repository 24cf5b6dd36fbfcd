"""quantize.int4_weight_only: block-wise 4-bit (or 2/8-bit) weights for MatMul, with ONNX Runtime's MatMulNBits.

Each constant MatMul weight [K, N] is cut into blocks of `block_size` along K, each block with
its own scale (and zero point when asymmetric), and the MatMul becomes com.microsoft.MatMulNBits,
which dequantizes on the fly; activations stay float. The gain is size and memory bandwidth: a
large matrix read at batch 1 gets much faster, a small model on CPU can get slower.

Algorithms (ONNX Runtime's onnxruntime.quantization.matmul_nbits_quantizer):
  rtn   round to nearest, ORT's C++ kernels (DefaultWeightOnlyQuantConfig): fast, no data needed;
  hqq   Half-Quadratic Quantization: optimises scales and (float) zero points per block, no data
        needed, runs on torch;
  gptq  GPTQ: corrects the rounding error column by column using the layer inputs' Hessian
        measured on calibration samples (ORT's port of Intel Neural Compressor's code).

Linear layers exported from 2-D inputs are Gemm nodes, which MatMulNBits does not cover: onnx_prep
rewrites them as MatMul + Add first, so they are quantized too.
"""
from __future__ import annotations

import contextlib
import io
import logging
import shutil
import warnings as warnings_module
from pathlib import Path
from typing import Any

from app.catalog.quantize.int4_weight_only import Int4WeightOnlyParams
from app.errors import StepFailed
from workers.methods import implements
from workers.methods.base import StepContext, StepOutput
from workers.quantize.int8_dynamic import _check_excluded_nodes, _check_loads_with_same_io

MATRIX_OPS = ("MatMul", "Gemm")
GPTQ_SUBGRAPH_REASON = (
    "it sits inside an If/Loop/Scan body: GPTQ needs each layer's inputs recorded on calibration data, which "
    "ONNX Runtime's GPTQ cannot do inside subgraphs; algorithm rtn or hqq quantizes it"
)


@implements("quantize.int4_weight_only")
def quantize(input_path: Path, params: Int4WeightOnlyParams, out_dir: Path,
             ctx: StepContext | None = None) -> StepOutput:
    import onnx

    from workers.quantize import onnx_prep

    ctx = ctx or StepContext()
    source = onnx.load(str(input_path), load_external_data=False)
    onnx_prep.name_nodes(source.graph)  # the same names prepare() gives, so exclusions match
    _check_excluded_nodes(params.nodes_to_exclude, source.graph, set(MATRIX_OPS))

    prep_dir = out_dir / "prep"
    output = out_dir / "model.onnx"
    warnings: list[str] = []
    notes: list[str] = []
    try:
        ctx.report(0.02, "preparing the model (Gemm -> MatMul + Add)")
        prepared = onnx_prep.prepare(input_path, prep_dir, gemm_to_matmul=True)
        model = onnx.load(str(prepared.path))
        present = {node.name for node in onnx_prep.all_nodes(model.graph)}
        gone = [name for name in params.nodes_to_exclude if name not in present]
        if gone:
            warnings.append(f"pre-processing fused or removed node(s) {', '.join(map(repr, gone[:5]))}; "
                            "excluding them has no effect")
        matrices = _matrices(model.graph, params)
        tables = _embedding_tables(model.graph)
        candidates = [m for m in matrices if m["reason"] is None]
        if not candidates:
            raise _nothing_to_quantize(source.graph, matrices)

        reader = None
        if params.algorithm == "gptq":
            from workers.quantize.int8_static import CalibrationReader, calibration_source

            data = calibration_source(prepared.path, ctx.calibration, samples=params.calibration_samples,
                                      seed=ctx.seed, allow_random=False, shapes=ctx.input_shapes)
            reader = CalibrationReader(data)
            notes.extend(data.notes)
            ctx.report(0.1, f"running GPTQ on {data.samples} sample(s) of {data.described}")
        else:
            ctx.report(0.1, f"quantizing {len(candidates)} weight matrix(es) to {params.bits} bits "
                       f"({params.algorithm})")
        result = _run_quantizer(model, params, reader, [m["node"] for m in matrices
                                                        if m["reason"] in ("excluded", GPTQ_SUBGRAPH_REASON)])
        del model
        if params.accuracy_level:
            _set_accuracy_level(result.graph, params.accuracy_level)
        onnx.save(result, str(output))
    finally:
        shutil.rmtree(prep_dir, ignore_errors=True)

    ctx.report(0.9, "checking the quantized model")
    _check_loads_with_same_io(source, output)
    result_nodes = list(onnx_prep.all_nodes(result.graph))
    remaining = {node.name for node in result_nodes if node.op_type in MATRIX_OPS}
    nbits_nodes = [node for node in result_nodes if node.op_type == "MatMulNBits"]
    quantized: list[dict[str, Any]] = []
    left: list[dict[str, Any]] = []
    for matrix in matrices:
        if matrix["reason"] is None and matrix["node"] in remaining:
            matrix["reason"] = "left by ONNX Runtime's quantizer"
        (left if matrix["reason"] else quantized).append(matrix)
    if not nbits_nodes:
        raise _nothing_to_quantize(source.graph, matrices)
    gathered = sum(1 for node in result_nodes if node.op_type == "GatherBlockQuantized")
    if tables and not embeddings_apply(params):
        notes.append(f"{tables} embedding table(s) stay float: embeddings are quantized with rtn at 4 bits only"
                     if params.quantize_embeddings else f"{tables} embedding table(s) stay float (quantize_embeddings "
                     "is off)")
    elif tables > gathered:
        notes.append(f"{tables - gathered} of {tables} embedding table(s) were left float by ONNX Runtime's quantizer")
    padded = [m for m in quantized if m["shape"][0] % params.block_size]
    if padded:
        notes.append(f"{len(padded)} matrix(es) have K not a multiple of block_size {params.block_size}: "
                     "ONNX Runtime padded their last block")
    if params.bits == 2:
        warnings.append("2-bit weights are very lossy; check the fidelity figures before using the result")
    conv = sum(1 for node in result_nodes if node.op_type in ("Conv", "ConvTranspose"))
    if conv:
        notes.append(f"{conv} Conv layer(s) stay float: weight-only MatMulNBits quantization covers MatMul only")
    warnings.append(
        "the gain is size and memory bandwidth: MatMulNBits dequantizes weights on the fly, which pays off on "
        "large matrices at small batch; on small models on CPU it can run slower than float32 (this job's "
        "latency figures show which)"
    )
    details: dict[str, Any] = {
        "preprocess": prepared.notes,
        "algorithm": params.algorithm,
        "bits": params.bits,
        "block_size": params.block_size,
        "symmetric": params.algorithm != "hqq" and params.is_symmetric(),
        "accuracy_level": params.accuracy_level,
        "weights_quantized": len(quantized),
        "weights_left_float": len(left),
        "embeddings_quantized": gathered,
        "quantized": [{"node": m["node"], "shape": m["shape"]} for m in quantized],
        "left_float": [{"node": m["node"], "op_type": m["op_type"], "shape": m["shape"], "reason": m["reason"]}
                       for m in left],
        "subgraphs": _by_subgraph(matrices),
        "gemm_rewritten_as_matmul": len(prepared.gemm_rewritten),
        "notes": notes,
        "warnings": warnings,
    }
    return StepOutput(model_path=output, details=details)


def _matrices(graph, params: Int4WeightOnlyParams) -> list[dict[str, Any]]:
    """Every MatMul/Gemm with what it multiplies by, and why it will stay float (reason None: to quantize)."""
    from workers.quantize.onnx_prep import nodes_with_scope, site_label

    excluded = set(params.nodes_to_exclude)
    found = []
    # A MatMul inside an If/Loop/Scan body may read its weight from an enclosing graph; ORT's quantizer
    # walks the bodies with the same scoping.
    for site, node, visible in nodes_with_scope(graph):
        if node.op_type not in MATRIX_OPS or node.domain not in ("", "ai.onnx"):
            continue
        initializers = {name: list(init.dims) for name, init in visible.items()}
        weight = node.input[1] if len(node.input) > 1 else ""
        shape = initializers.get(weight)
        if node.op_type == "Gemm":
            reason = ("a Gemm onnx_prep could not rewrite as MatMul (transA set, or its weight is not a constant "
                      "float32); MatMulNBits covers MatMul only")
        elif node.name in excluded:
            reason = "excluded"
        elif shape is None:
            reason = ("its left operand is the constant; MatMulNBits quantizes the right one"
                      if node.input[0] in initializers else "its weight is computed at run time, not a constant")
        elif len(shape) < 2:
            reason = "its weight is a vector"
        elif len(shape) > 2 and any(d != 1 for d in shape[:-2]):
            reason = f"its weight is a batch of matrices {shape}; MatMulNBits takes one 2-D weight"
        elif len(shape) > 2 and params.algorithm == "gptq":
            reason = f"its weight has shape {shape}; ONNX Runtime's GPTQ quantizes 2-D weights only"
        elif site is not None and params.algorithm == "gptq":
            reason = GPTQ_SUBGRAPH_REASON
        else:
            reason = None
        found.append({"node": node.name, "op_type": node.op_type, "shape": shape, "reason": reason,
                      "subgraph": site_label(site) if site else None})
    return found


def _by_subgraph(matrices: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per If/Loop/Scan body holding MatMul/Gemm: how many were quantized, and the ones left float with why."""
    sites: dict[tuple, dict[str, Any]] = {}
    for matrix in matrices:
        if matrix["subgraph"] is None:
            continue
        site = matrix["subgraph"]
        entry = sites.setdefault((site["node"], site["attribute"]), {**site, "quantized": 0, "left_float": []})
        if matrix["reason"]:
            entry["left_float"].append({"node": matrix["node"], "op_type": matrix["op_type"],
                                        "reason": matrix["reason"]})
        else:
            entry["quantized"] += 1
    return list(sites.values())


def _run_quantizer(model, params: Int4WeightOnlyParams, reader, excluded: list[str]):
    from workers.quantize.onnx_prep import short_error

    nbits = _import_nbits_quantizer()
    symmetric = params.is_symmetric()
    if params.algorithm == "rtn":
        embeddings = embeddings_apply(params)
        config = nbits.DefaultWeightOnlyQuantConfig(
            block_size=params.block_size, is_symmetric=symmetric, accuracy_level=params.accuracy_level,
            bits=params.bits,
            op_types_to_quantize=("MatMul", "Gather") if embeddings else ("MatMul",),
            quant_axes=(("MatMul", 0), ("Gather", 1)),
        )
    elif params.algorithm == "hqq":
        config = nbits.HQQWeightOnlyQuantConfig(block_size=params.block_size, bits=params.bits)
    else:
        config = nbits.GPTQWeightOnlyQuantConfig(calibration_data_reader=reader)
    opsets = {entry.domain or "ai.onnx": entry.version for entry in model.opset_import}
    ir_version = model.ir_version
    quantizer = nbits.MatMulNBitsQuantizer(
        model, bits=params.bits, block_size=params.block_size, is_symmetric=symmetric,
        accuracy_level=params.accuracy_level, nodes_to_exclude=excluded, algo_config=config,
    )
    if params.algorithm == "rtn" and _cuda_available():
        _quantize_with_kernels(quantizer, nbits, "cuda")
    if params.algorithm == "gptq" and excluded:
        # ORT's GPTQ path ignores nodes_to_exclude; "fp32" in its per-node config is how its RTN path skips a node.
        configure = quantizer._generate_q4_node_config
        quantizer._generate_q4_node_config = lambda: {**configure(), **dict.fromkeys(excluded, "fp32")}
    try:
        # GPTQ prints a progress bar; HQQ warns that torch.from_numpy got a read-only array.
        with contextlib.redirect_stdout(io.StringIO()), warnings_module.catch_warnings():
            warnings_module.simplefilter("ignore", UserWarning)
            quantizer.process()
    except StepFailed:
        raise
    except Exception as exc:
        code = "calibration_failed" if params.algorithm == "gptq" else "quantization_failed"
        raise StepFailed(f"ONNX Runtime's MatMulNBitsQuantizer ({params.algorithm}) failed: "
                         f"{short_error(exc, 400)}", code=code) from exc
    return _restore_opset(quantizer.model.model, opsets, ir_version)


INT4_TYPES = (21, 22)  # onnx.TensorProto.UINT4, INT4


def _restore_opset(model, opsets: dict[str, int], ir_version: int):
    """ONNX Runtime's quantizer stamps opset 21 and IR 10 on any model (for int4 tensors), without converting
    its ops: an opset-12 ReduceMean keeps its `axes` attribute, which opset 18+ forbids, and the model no
    longer loads (PP-OCRv4's recognizer, Magika). MatMulNBits lives in com.microsoft and needs neither; unless
    the result holds int4 tensors in the default domain, the model gets its own opset and IR version back."""
    from workers.quantize.onnx_prep import all_nodes

    uses_int4 = any(t.data_type in INT4_TYPES for t in model.graph.initializer) or any(
        node.domain in ("", "ai.onnx") and node.op_type in ("DequantizeLinear", "QuantizeLinear")
        for node in all_nodes(model.graph))
    if uses_int4:
        return model
    for entry in model.opset_import:
        if (entry.domain or "ai.onnx") in opsets:
            entry.version = opsets[entry.domain or "ai.onnx"]
    model.ir_version = ir_version
    return model


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _quantize_with_kernels(quantizer, nbits, device: str) -> bool:
    """Let kernels.quantize_blockwise (on `device`: the CUDA kernel on a GPU worker) quantize the MatMul weights in
    place of ORT's CPU loop: the same RTN codes, scales and zero points byte for byte (tests/kernels/test_kernels.py), so
    the model file is the same; ORT still rewrites the graph. False (ORT does it all) for what the kernel lacks."""
    import torch

    node_quantizer = quantizer.node_quantizer
    if not isinstance(node_quantizer, nbits.DefaultWeightOnlyQuantizer):
        return False
    config = node_quantizer.config
    if (config.bits not in (4, 8) or config.quant_format != nbits.QuantFormat.QOperator
            or getattr(config, "channel_wised_quantize", False)):
        return False
    import numpy as np

    import kernels

    on_cpu = node_quantizer.qbits_block_quant

    def qbits_block_quant(weight):
        if weight.ndim != 2 or weight.dtype not in (np.float32, np.float16):
            return on_cpu(weight)
        matrix = torch.from_numpy(np.require(weight, requirements=["C", "W"])).to(device)  # ORT hands read-only arrays
        packed, scales, zero_points = kernels.quantize_blockwise(matrix, config.bits, config.block_size,
                                                                 config.is_symmetric)
        return packed.cpu().numpy(), scales.cpu().numpy(), zero_points.cpu().numpy()

    node_quantizer.qbits_block_quant = qbits_block_quant
    return True


def embeddings_apply(params: Int4WeightOnlyParams) -> bool:
    return params.quantize_embeddings and params.algorithm == "rtn" and params.bits == 4


def _embedding_tables(graph) -> int:
    """Gathers that read rows of a constant float matrix (embedding tables)."""
    from workers.quantize.onnx_prep import nodes_with_scope

    return sum(1 for _, node, visible in nodes_with_scope(graph)
               if node.op_type == "Gather" and node.input and node.input[0] in visible
               and visible[node.input[0]].data_type == 1 and len(visible[node.input[0]].dims) == 2)


def _import_nbits_quantizer():
    """ORT's module calls logging.basicConfig(level=INFO) on import; undo that for the worker's root logger."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    from onnxruntime.quantization import matmul_nbits_quantizer

    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    return matmul_nbits_quantizer


def _set_accuracy_level(graph, level: int) -> None:
    """HQQ writes no accuracy_level; set it on every MatMulNBits that lacks one."""
    from onnx import helper

    from workers.quantize.onnx_prep import all_nodes

    for node in all_nodes(graph):
        if node.op_type == "MatMulNBits" and not any(a.name == "accuracy_level" for a in node.attribute):
            node.attribute.append(helper.make_attribute("accuracy_level", level))


def _nothing_to_quantize(graph, matrices: list[dict[str, Any]]) -> StepFailed:
    if not matrices:
        from workers.quantize.onnx_prep import all_nodes

        present = sorted({node.op_type for node in all_nodes(graph)})
        return StepFailed(
            "nothing to quantize: weight-only quantization covers MatMul and Gemm weights, and the graph has none "
            f"(it has {', '.join(present[:15])}{'...' if len(present) > 15 else ''})",
            code="nothing_to_quantize",
        )
    reasons = "; ".join(f"{m['node']}: {m['reason']}" for m in matrices[:5])
    return StepFailed(
        f"nothing to quantize: none of the {len(matrices)} MatMul/Gemm node(s) has a weight MatMulNBits can take "
        f"({reasons}{'; ...' if len(matrices) > 5 else ''})",
        code="nothing_to_quantize",
    )
