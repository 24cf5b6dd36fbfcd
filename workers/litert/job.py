"""A job's LiteRT export, as the job's process runs it (workers.lowering): the calibration samples from the job's
datasets, the .tflite written, checked against ONNX Runtime on one input and handed to the worker as an artifact, and
the record the report keeps.

Every export writes the float .tflite too, into a folder named after the ONNX file's sha256 beside it
(`float_export`): the float one is checked against ONNX Runtime (an int8 one cannot be held to the same function),
and the measurement's "runtime" role (the original on LiteRT at f32, workers.measure.targets) finds the original's
there, exported once, whether the job had steps before the export or not.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from app.errors import JobFailed
from workers.litert.export import export
from workers.openvino.job import LoweredForJob

TFLITE_ARTIFACT = "model.tflite"
CHECK_MIN_COSINE = 0.9  # below this on one input, the export is wrong (a layout onnx2tf guessed wrongly), not lossy


def export_for_target(run, target: dict[str, Any], model: Path, workdir: Path, evaluate: dict[str, Any],
                      input_shapes, *, share: tuple[float, float], store: bool = True) -> LoweredForJob:
    """`model`: what the steps made (the upload itself without steps). store=False: the .tflite is not stored (a
    candidate that its caller stores)."""
    from workers.measure.targets import target_label

    if target.get("runtime") != "litert" or target.get("device", "cpu") != "cpu":
        raise JobFailed(f"this worker cannot export to the {target.get('runtime')} {target.get('device')} target",
                        code="no_worker_for_target")
    precision = target.get("precision") or "f32"
    label = target_label({**target, "precision": precision})
    index = len([a for a in run.artifacts if a["kind"] == "model"]) + 1
    eval_dataset = run.dataset(evaluate["eval_dataset_id"]) if evaluate.get("eval_dataset_id") else None
    calibration_dataset = run.dataset(target["calibration_dataset_id"]) if target.get("calibration_dataset_id") \
        else eval_dataset
    started = time.perf_counter()
    run.progress(share[0], f"exporting to {label}", f"exporting the model to {label} (onnx2tf)", force=True)
    calibration: list[dict[str, np.ndarray]] | None = None
    described: str | None = None
    notes: list[str] = []
    if precision == "int8":
        calibration, described, notes = _calibration(model, calibration_dataset, target, input_shapes, seed=index)
    out = export_folder(model)
    try:
        exported = export(model, out, list(dict.fromkeys(["f32", precision])), calibration=calibration)
        check = _check(model, exported.paths["f32"], input_shapes, seed=index, exact=True)
        if precision != "f32":
            check = {"f32": check, precision: _check(model, exported.paths[precision], input_shapes, seed=index,
                                                     exact=precision == "f16")}
    except JobFailed:
        shutil.rmtree(out, ignore_errors=True)  # nothing of a failed export stays behind
        raise
    result = exported.paths[precision]
    details = dict(exported.details, precision=precision, warnings=list(notes), check=check)
    if described is not None:
        details["calibration"] = {"on": described, "samples": len(calibration or [])}
    details["duration_s"] = round(time.perf_counter() - started, 3)
    artifact = run.store_artifact(result, name=TFLITE_ARTIFACT, kind="model",
                                  content_type="application/octet-stream") if store else {}
    record = {"index": index, "method": "lower.litert", "version": 1,
              "params": {k: v for k, v in target.items() if v is not None},
              "duration_s": details["duration_s"], "details": details, "artifact": artifact}
    report = {"spec": dict(target), "label": label, "export": details, "artifact": TFLITE_ARTIFACT,
              "how_to_run": "ai_edge_litert.interpreter.Interpreter(model_path='model.tflite', num_threads=N)"
                            ".get_signature_runner()(**inputs): the inputs by the ONNX model's names, in its layout "
                            "(NCHW stays NCHW) and float32 at every precision; outputs output_0, output_1, ... in "
                            "the ONNX model's output order. On Android/iOS the same file runs in LiteRT's "
                            "CompiledModel or Interpreter API; add num_threads = environment.threads to reproduce "
                            "the figures"}
    return LoweredForJob(path=result, label=label, record=record, report=report)


def export_folder(model: Path) -> Path:
    """Where the exports of the ONNX file `model` go: beside it, named after its content."""
    from app.store import file_sha256

    return Path(model).parent / f"litert-{file_sha256(Path(model))[:16]}"


def float_export(model: Path) -> Path:
    """The ONNX file `model` as an f32 .tflite: the one an earlier export of the same file wrote, else a new one
    (the measurement's "runtime" role when steps ran before the export: the original was not exported then)."""
    out = export_folder(model)
    done = out / "model_f32.tflite"
    return done if done.is_file() else export(model, out, ["f32"]).paths["f32"]


def _calibration(model: Path, dataset, target: dict[str, Any], input_shapes,
                 *, seed: int) -> tuple[list[dict[str, np.ndarray]], str, list[str]]:
    """The representative dataset: samples of real inputs only. Full-integer int8 fixes every activation's range from
    them, so random inputs would give ranges a real input never has; without a dataset the export is refused."""
    from workers.quantize.int8_static import calibration_source

    if dataset is None:
        raise JobFailed("full-integer int8 on the litert target needs calibration samples (a representative "
                        "dataset): give target.calibration_dataset_id, or an eval dataset (evaluate.eval_dataset_id) "
                        "whose inputs it calibrates on", code="calibration_required")
    source = calibration_source(model, dataset, samples=int(target.get("calibration_samples") or 300), seed=seed,
                                allow_random=False, shapes=input_shapes)
    return [source.feed(i) for i in range(source.count)], source.described, source.notes


def _check(model: Path, tflite: Path, input_shapes, *, seed: int, exact: bool) -> dict[str, Any]:
    """The .tflite and the ONNX model on one input (the measurement's kind of input): every output there, with the
    ONNX output's shape and, for a float export (`exact`), a cosine that shows the same function. Raises JobFailed
    litert_conversion_failed where not, so a wrong export is never handed over. An int8 export's cosine on a random
    input says little (its ranges were calibrated on real ones): the measurement judges it on the job's data."""
    import onnxruntime as ort

    from workers.litert.session import LiteRTSession
    from workers.quantize.int8_static import calibration_source

    source = calibration_source(model, None, samples=1, seed=seed, allow_random=True, shapes=input_shapes)
    feed = source.feed(0)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    reference = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in reference.get_outputs()]
    expected = reference.run(None, feed)
    try:
        session = LiteRTSession(tflite, threads=1, input_names=list(feed), output_names=names)
        got = session.run(None, feed)
    except Exception as exc:
        raise JobFailed(f"the exported .tflite does not run in LiteRT: {getattr(exc, 'message', exc)}",
                        code="litert_conversion_failed") from exc
    check: dict[str, Any] = {"on": "one random input at the measurement's shapes", "outputs": {}}
    for name, want, have in zip(names, expected, got):
        if tuple(want.shape) != tuple(have.shape):
                raise JobFailed(f"onnx2tf changed the output {name!r}: ONNX gives shape {list(want.shape)}, the .tflite "
                            f"{list(have.shape)} (a layout it transposed); the export is not handed over",
                            code="litert_conversion_failed")
        check["outputs"][name] = round(_cosine(want, have), 6)
    worst = min(check["outputs"].values(), default=1.0)
    if exact and worst < CHECK_MIN_COSINE:
        raise JobFailed(f"the .tflite computes another function than the ONNX model: output cosine {worst:.3f} on one "
                        f"input (below {CHECK_MIN_COSINE}); onnx2tf converted the model wrongly, so it is not handed "
                        "over", code="litert_conversion_failed")
    return check


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    norms = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b) / norms if norms else float(np.array_equal(a, b))
