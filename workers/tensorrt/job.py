"""A job's TensorRT lowering, as the job's process runs it (workers.lowering): the engine built for this worker's
GPU from the steps' model (or the upload), calibrated on the job's samples for int8, handed to the worker as an
artifact whose name carries the TensorRT version and the GPU, and the record the report keeps."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from app.errors import JobFailed
from workers.openvino.job import LoweredForJob
from workers.tensorrt.engine import EVAL_BATCH, build_engine, check_precision, profile_shapes

HOW_TO_RUN = ("runtime = tensorrt.Runtime(logger); engine = runtime.deserialize_cuda_engine(open(path, 'rb').read()); "
              "context = engine.create_execution_context(); set each input's shape (set_input_shape) and every "
              "tensor's device address (set_tensor_address), then context.execute_async_v3(stream). Only on the GPU "
              "model and with the TensorRT version in its name (lowering.gpu, lowering.tensorrt); elsewhere build "
              "it again from model.onnx")


def target_label(target: dict[str, Any]) -> str:
    return f"TensorRT CUDA ({target.get('precision') or 'f32'})"


def engine_plan(model: Path, input_shapes, batch_sizes: list[int]) -> dict[str, dict[str, list[int]]]:
    """The optimization profile for `model` at the job's batch sizes (workers.tensorrt.engine.profile_shapes), from
    the same input plan the measurement uses (dynamic dims from the job's shapes and datasets, else guessed)."""
    import onnx
    import onnxruntime as ort

    from workers.onnx_tools.inputs import plan_inputs

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    structure = onnx.load(str(model), load_external_data=False)
    plan = plan_inputs({"baseline": session, "result": session}, {"baseline": structure, "result": structure},
                       shapes=input_shapes, probe=False)
    if plan.fixed_batch:
        return profile_shapes(plan.shapes, [plan.fixed_batch], dynamic_batch=False)
    return profile_shapes(plan.shapes, batch_sizes, dynamic_batch=True)


def lower_for_target(run, target: dict[str, Any], model: Path, workdir: Path, evaluate: dict[str, Any], input_shapes,
                     *, share: tuple[float, float], store: bool = True) -> LoweredForJob:
    """store=False: the engine stays in workdir (a goal search's candidate, stored by the search)."""
    if target.get("device", "cuda") != "cuda":
        raise JobFailed(f"the tensorrt target runs on cuda, not {target.get('device')}", code="no_worker_for_target")
    precision = check_precision(target.get("precision") or "f32")
    label = target_label({**target, "precision": precision})
    index = len([a for a in run.artifacts if a["kind"] == "model"]) + 1

    def progress(fraction: float, message: str) -> None:
        run.progress(share[0] + (share[1] - share[0]) * fraction, f"lowering to {label}", message)

    dataset_id = target.get("calibration_dataset_id") or evaluate.get("eval_dataset_id")
    calibration_dataset = run.dataset(dataset_id) if dataset_id else None

    def calibration():
        from workers.quantize.int8_static import calibration_source

        source = calibration_source(model, calibration_dataset, samples=int(target.get("calibration_samples") or 300),
                                    seed=index, allow_random=calibration_dataset is None, shapes=input_shapes)
        notes = list(source.notes)
        if source.described == "random data":
            notes.append("calibrated on random data, not on samples of real inputs: activation ranges may not match "
                         "real data; give target.calibration_dataset_id")
        return [source.feed(i) for i in range(source.count)], source.described, notes

    started = time.perf_counter()
    run.progress(share[0], f"lowering to {label}", f"building the TensorRT engine ({label})", force=True)
    profile = engine_plan(model, input_shapes, list(evaluate.get("batch_sizes") or [1]))
    engine, meta = build_engine(model, workdir / "tensorrt", precision=precision, profile=profile,
                                calibration=calibration, say=progress)
    details = {"runtime": "tensorrt", **meta.to_json(), "engine": engine.name,
               "warnings": list((meta.calibration or {}).get("notes") or [])}
    if profile and any(d["max"] != d["min"] for d in profile.values()):
        details["warnings"].append(f"the engine takes batch sizes 1 to {max(EVAL_BATCH, *(evaluate.get('batch_sizes') or [1]))} "
                                   "(its optimization profile); outside them build it again")
    artifact = run.store_artifact(engine, name=engine.name, kind="model", content_type="application/octet-stream") \
        if store else {}
    record = {"index": index, "method": "lower.tensorrt", "version": 1,
              "params": {k: v for k, v in target.items() if v is not None},
              "duration_s": round(time.perf_counter() - started, 3), "details": details, "artifact": artifact}
    report = {"spec": dict(target), "label": label, "lowering": details, "artifact": engine.name,
              "how_to_run": HOW_TO_RUN}
    return LoweredForJob(path=engine, label=label, record=record, report=report)
