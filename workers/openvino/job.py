"""A job's target lowering, as the job's process runs it (workers.steps.execute): calibration and validation data
from the job's datasets, the IR written and handed to the worker as an artifact, and the record the report keeps."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from app.errors import JobFailed
from workers.openvino.lower import Validation, lower

IR_ARTIFACT = "model_openvino.zip"


@dataclass
class LoweredForJob:
    path: Path                 # the IR's .xml, which the measurement runs
    label: str                 # "OpenVINO CPU (bf16)"
    record: dict[str, Any]     # a step record for the report's steps (method lower.openvino)
    report: dict[str, Any]     # the report's `target` section


def lower_for_target(run, target: dict[str, Any], model: Path, workdir: Path, evaluate: dict[str, Any], input_shapes,
                     *, share: tuple[float, float], store: bool = True) -> LoweredForJob:
    """store=False: the IR stays in workdir (a goal search's candidate, stored by the search), with its
    compile_config.json beside model.xml."""
    from workers.measure.environment import default_threads
    from workers.measure.targets import target_label

    if target.get("runtime") != "openvino" or target.get("device", "cpu") != "cpu":
        raise JobFailed(f"this worker cannot lower to the {target.get('runtime')} {target.get('device')} target",
                        code="no_worker_for_target")
    precision = target.get("precision") or "f32"
    label = target_label({**target, "precision": precision})
    settings_threads = _threads()
    threads = settings_threads or default_threads()
    index = len([a for a in run.artifacts if a["kind"] == "model"]) + 1

    def progress(fraction: float, message: str) -> None:
        run.progress(share[0] + (share[1] - share[0]) * fraction, f"lowering to {label}", message)

    eval_dataset = run.dataset(evaluate["eval_dataset_id"]) if evaluate.get("eval_dataset_id") else None
    calibration_dataset = run.dataset(target["calibration_dataset_id"]) if target.get("calibration_dataset_id") \
        else eval_dataset

    def calibration() -> tuple[list[dict[str, np.ndarray]], str, list[str]]:
        from workers.quantize.int8_static import calibration_source

        source = calibration_source(model, calibration_dataset, samples=int(target.get("calibration_samples") or 300),
                                    seed=index, allow_random=calibration_dataset is None, shapes=input_shapes)
        return [source.feed(i) for i in range(source.count)], source.described, source.notes

    validation = None
    if precision.startswith("int8") and eval_dataset is not None and eval_dataset.labels is not None:
        validation = _validation(model, eval_dataset, evaluate.get("eval_max_samples"))
    started = time.perf_counter()
    run.progress(share[0], f"lowering to {label}", f"lowering the model to {label}", force=True)
    lowered = lower(model, workdir / "openvino", precision=precision, threads=threads, calibration=calibration,
                    validation=validation, max_accuracy_drop=target.get("max_accuracy_drop"), progress=progress)
    (lowered.xml.parent / "compile_config.json").write_text(json.dumps(lowered.details["compile_config"]))
    artifact = run.store_artifact(lowered.zip(workdir / IR_ARTIFACT), name=IR_ARTIFACT, kind="model",
                                  content_type="application/zip") if store else {}
    record = {"index": index, "method": "lower.openvino", "version": 1,
              "params": {k: v for k, v in target.items() if v is not None},
              "duration_s": round(time.perf_counter() - started, 3), "details": lowered.details, "artifact": artifact}
    report = {"spec": dict(target), "label": label, "lowering": lowered.details, "artifact": IR_ARTIFACT,
              "how_to_run": "unzip; openvino.Core().compile_model('model.xml', 'CPU', "
                            "json.load(open('openvino_config.json'))): the config holds the precision hint and "
                            "stream settings it was measured with (without it, OpenVINO's CPU default precision is "
                            "bf16 where the CPU has it); add INFERENCE_NUM_THREADS = environment.threads to "
                            "reproduce the figures"}
    return LoweredForJob(path=lowered.xml, label=label, record=record, report=report)


def _threads() -> int:
    from app.settings import get_settings

    return int(get_settings().measure_threads or 0)


def _validation(model: Path, dataset, max_samples: int | None) -> Validation:
    """The eval dataset as NNCF validation items: one sample per item (the fixed batch where the model has one),
    cast to the model's input types."""
    import onnxruntime as ort

    from workers.onnx_tools.inputs import ORT_DTYPES

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    specs = {i.name: i for i in session.get_inputs()}
    first = next(iter(specs.values()))
    batch = first.shape[0] if first.shape and isinstance(first.shape[0], int) and first.shape[0] > 0 else 1
    limited = dataset.take(max_samples) if max_samples else dataset
    feeds, labels = [], []
    for feed, label in limited.batches(batch):
        if len(label) != batch:
            break
        feeds.append({name: np.ascontiguousarray(feed[name].astype(ORT_DTYPES.get(spec.type, feed[name].dtype)))
                      for name, spec in specs.items() if name in feed})
        labels.append(np.asarray(label))
    if not feeds:
        raise JobFailed(f"the eval dataset holds fewer samples than the model's fixed batch of {batch}: NNCF's "
                        "accuracy control cannot validate on it", code="calibration_failed")
    return Validation(feeds=feeds, labels=labels, name=f"dataset {dataset.name}" if dataset.name else "the eval dataset")
