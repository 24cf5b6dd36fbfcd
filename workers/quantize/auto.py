"""quantize.auto: try the quantization schemes, keep the fastest result within an accuracy budget.

Every candidate is built by the same method code a user would call, then measured against
the original with the standard measurement (latency interleaved with the original, accuracy
and fidelity on the eval dataset). When an int8 candidate misses the budget, the layers that
hurt most are found by comparing each quantized layer's output with the original's on eval
samples (the error a layer adds over the error already in its inputs), and the candidate is
rebuilt with the worst 1, 2, 4, ... of them left in float. Every candidate, chosen or not,
is in the step's details; when none meets the budget, or none within it is faster than the
original, the original is handed back unchanged and the details say so.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from app.catalog.quantize.auto import AutoParams
from app.errors import ModelPressError, StepFailed
from workers.methods import implements
from workers.methods.base import StepContext, StepOutput

INT8 = ("int8_dynamic", "int8_static")
LAYER_OPS = frozenset({"Conv", "MatMul", "Gemm"})
SENSITIVITY_SAMPLES = 64
# A candidate counts as faster only with a p50 speedup of at least this much: smaller differences are within
# the run-to-run noise of one short interleaved measurement (a 1.008x "win" of fp16 on a tiny CNN measured
# 0.98x in the job's own measurement).
MIN_SPEEDUP = 1.05


@implements("quantize.auto")
def run(input_path: Path, params: AutoParams, out_dir: Path, ctx: StepContext) -> StepOutput:
    from workers import methods

    evaluation = ctx.datasets.get("eval_dataset_id")
    if evaluation is None:
        raise StepFailed("quantize.auto needs its eval dataset; none was loaded", code="dataset_not_found")
    evaluation = evaluation.take(params.eval_max_samples)
    if params.max_accuracy_drop is not None and evaluation.labels is None:
        raise StepFailed("max_accuracy_drop needs an eval dataset with a 'labels' array; this one has none "
                         "(use min_cosine instead)", code="needs_labels")
    calibration = ctx.calibration
    notes: list[str] = []
    if "int8_static" in params.schemes and calibration is None:
        calibration = evaluation
        notes.append("static int8 was calibrated on the eval dataset (no calibration_dataset_id): "
                     "its accuracy may be optimistic")

    candidates: list[dict[str, Any]] = []
    total = len(params.schemes) + params.max_excluded_layers.bit_length() * len(INT8)
    for scheme in params.schemes:
        ctx.report(len(candidates) / total, f"trying {scheme}")
        candidate = _build_and_judge(len(candidates), methods.get(f"quantize.{scheme}"), scheme, [], input_path,
                                     out_dir, params, evaluation, calibration, ctx)
        candidates.append(candidate)
        if scheme in INT8 and candidate["status"] == "measured" and not candidate["within_budget"] \
                and params.max_excluded_layers:
            ranking = _sensitivity(input_path, Path(candidate["path"]), evaluation, notes)
            candidate["most_sensitive_layers"] = ranking[:10]
            count = 1
            while count <= min(params.max_excluded_layers, len(ranking)):
                excluded = [entry["node"] for entry in ranking[:count]]
                ctx.report(len(candidates) / total, f"trying {scheme} with {count} layer(s) in float")
                retry = _build_and_judge(len(candidates), methods.get(f"quantize.{scheme}"), scheme, excluded,
                                         input_path, out_dir, params, evaluation, calibration, ctx)
                candidates.append(retry)
                if retry["status"] == "measured" and retry["within_budget"]:
                    break
                count *= 2

    chosen = _choose(candidates, params)
    output = out_dir / "model.onnx"
    if chosen is None:
        shutil.copyfile(input_path, output)
        within = [c for c in candidates if c.get("within_budget")]
        notes.append("no candidate met the budget; the original model is returned unchanged" if not within else
                     ("no candidate within the budget was at least "
                      f"{MIN_SPEEDUP:.2f}x faster than the original (objective latency); the original model is "
                      "returned unchanged; choose objective 'size' to keep the smallest" if params.objective == "latency"
                      else "no candidate within the budget was smaller than the original; the original model is "
                      "returned unchanged"))
    else:
        shutil.copyfile(chosen["path"], output)
    for candidate in candidates:
        candidate.pop("path", None)
    return StepOutput(model_path=output, details={
        "budget": {"max_accuracy_drop": params.max_accuracy_drop, "min_cosine": params.min_cosine},
        "objective": params.objective,
        "eval_dataset": evaluation.name, "eval_samples": len(evaluation),
        "chosen": None if chosen is None else chosen["label"],
        "candidates": candidates,
        "warnings": notes,
    })


def _build_and_judge(index: int, method, scheme: str, excluded: list[str], input_path: Path, out_dir: Path,
                     params: AutoParams, evaluation, calibration, ctx: StepContext) -> dict[str, Any]:
    from workers.measure import MeasureSpec, measure_pair

    label = scheme + (f" ({len(excluded)} layer(s) in float)" if excluded else "")
    entry: dict[str, Any] = {"label": label, "scheme": scheme, "excluded_layers": excluded}
    workdir = out_dir / f"candidate-{index}"
    workdir.mkdir(parents=True)
    raw: dict[str, Any] = {}
    if excluded:
        raw["nodes_to_exclude"] = excluded
    if scheme == "int8_static":
        raw["calibration_dataset_id"] = "auto"
    try:
        step_params = method.params_model.model_validate(raw)
        built = method.run(input_path, step_params, workdir,
                           StepContext(calibration=calibration, datasets={"calibration_dataset_id": calibration},
                                       seed=ctx.seed, input_shapes=ctx.input_shapes))
    except ModelPressError as exc:
        entry.update(status="not_applicable", code=exc.code, reason=exc.message)
        return entry
    try:
        measured = measure_pair(input_path, built.model_path, MeasureSpec(
            batch_sizes=[params.latency_batch_size], warmup=max(3, params.latency_iterations // 10),
            iterations=params.latency_iterations, dataset=evaluation, input_shapes=ctx.input_shapes))
    except ModelPressError as exc:
        entry.update(status="failed_to_measure", code=exc.code, reason=exc.message)
        return entry
    latency = measured["latency"]["batch_sizes"]
    on = measured["dataset"]
    accuracy = on["accuracy"]
    entry.update(
        status="measured",
        path=str(built.model_path),
        size_bytes=measured["size"]["result"]["file_bytes"],
        size_ratio=measured["size"]["ratio"],
        batch_size=latency[0]["batch_size"] if latency else None,
        p50_ms={"original": latency[0]["baseline"]["p50_ms"], "candidate": latency[0]["result"]["p50_ms"]}
        if latency else None,
        speedup=latency[0]["speedup"] if latency else None,
        mean_cosine=on["fidelity"]["mean_cosine"],
        worst_cosine=on["fidelity"]["worst_cosine"],
        accuracy=None if accuracy is None else {
            "original_top1": accuracy["original"]["top1"], "candidate_top1": accuracy["compressed"]["top1"],
            "top1_drop_points": accuracy["top1_drop_points"],
        },
        method_warnings=built.details.get("warnings", []),
    )
    misses = []
    if params.max_accuracy_drop is not None:
        if accuracy is None:
            misses.append(on["accuracy_note"] or "accuracy could not be computed")
        elif accuracy["top1_drop_points"] > params.max_accuracy_drop:
            misses.append(f"top-1 drops {accuracy['top1_drop_points']:.2f} points > {params.max_accuracy_drop}")
    if params.min_cosine is not None and (entry["mean_cosine"] is None or entry["mean_cosine"] < params.min_cosine):
        misses.append(f"mean cosine {entry['mean_cosine']} < {params.min_cosine}")
    entry["within_budget"] = not misses
    if misses:
        entry["reason"] = "; ".join(misses)
    return entry


def _choose(candidates: list[dict[str, Any]], params: AutoParams) -> dict[str, Any] | None:
    within = [c for c in candidates if c.get("within_budget")]
    if params.objective == "latency":
        better = [c for c in within if c["speedup"] is not None and c["speedup"] >= MIN_SPEEDUP]
        return max(better, key=lambda c: (c["speedup"], -c["size_bytes"]), default=None)
    better = [c for c in within if c["size_ratio"] < 1.0]
    return min(better, key=lambda c: (c["size_bytes"], -(c["speedup"] or 0)), default=None)


def _sensitivity(original: Path, quantized: Path, evaluation, notes: list[str]) -> list[dict[str, Any]]:
    """Float layers ranked by the error their quantized version adds, measured on eval samples.

    Each Conv/MatMul/Gemm output of the original that still exists by name in the quantized
    model is compared on the same inputs: error = 1 - mean cosine; a layer's added error is its
    own minus the largest error among the layer outputs that feed it (directly or not).
    """
    import onnx
    import onnxruntime as ort

    from workers.onnx_tools.similarity import cosine
    from workers.quantize import onnx_prep

    source = onnx.load(str(original))
    onnx_prep.name_nodes(source.graph)
    target = onnx.load(str(quantized))
    present = {out for node in target.graph.node for out in node.output}
    layers = [(n.name, n.output[0]) for n in source.graph.node if n.op_type in LAYER_OPS and n.output[0] in present]
    if not layers:
        notes.append("no layer output of the original could be matched in the quantized model; "
                     "layer sensitivity was not measured")
        return []
    tensors = [t for _, t in layers]

    def session(model) -> Any:
        known = {o.name for o in model.graph.output}
        for name in tensors:
            if name not in known:
                model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every tensor
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])

    try:
        sessions = [session(source), session(target)]
    except Exception as exc:  # an exotic graph: rank nothing rather than fail the search
        notes.append(f"layer sensitivity was not measured: {onnx_prep.short_error(exc, 200)}")
        return []
    inputs = {i.name: i for i in sessions[0].get_inputs()}
    sums = dict.fromkeys(tensors, 0.0)
    count = 0
    fixed = {i.shape[0] for i in inputs.values() if i.shape and isinstance(i.shape[0], int)}
    batch = fixed.pop() if fixed else 16  # a model with a fixed batch takes exactly that many
    sample = evaluation.take(max(SENSITIVITY_SAMPLES // batch, 1) * batch)  # whole batches only
    for feeds, _ in sample.batches(batch):
        feeds = {k: v for k, v in feeds.items() if k in inputs}
        outs = [dict(zip([o.name for o in s.get_outputs()], s.run(None, feeds))) for s in sessions]
        for name in tensors:
            sums[name] += 1.0 - cosine(outs[0][name], outs[1][name])
        count += 1
    error = {name: sums[name] / max(count, 1) for name in tensors}
    upstream = _upstream_layers(source.graph, set(tensors))
    ranked = []
    for node, tensor in layers:
        before = max((error[t] for t in upstream.get(tensor, ())), default=0.0)
        ranked.append({"node": node, "error": round(error[tensor], 6), "added_error": round(error[tensor] - before, 6)})
    ranked.sort(key=lambda entry: entry["added_error"], reverse=True)
    return ranked


def _upstream_layers(graph, layer_tensors: set[str]) -> dict[str, set[str]]:
    """For each layer output tensor, the nearest layer output tensors it is computed from."""
    producer = {out: node for node in graph.node for out in node.output}
    nearest: dict[str, set[str]] = {}
    for tensor in layer_tensors:
        found: set[str] = set()
        seen: set[str] = set()
        stack = [tensor]
        while stack:
            node = producer.get(stack.pop())
            for name in node.input if node is not None else ():
                if not name or name in seen:
                    continue
                seen.add(name)
                if name in layer_tensors:
                    found.add(name)
                else:
                    stack.append(name)
        nearest[tensor] = found
    return nearest
