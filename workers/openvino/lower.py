"""Lower an ONNX model to the OpenVINO target: IR (.xml + .bin) at f32, bf16 or NNCF int8.

f32 and bf16 are the same IR compiled with a different inference precision hint. compile_model does not read
that hint from an IR's rt_info (OpenVINO 2026.4 applies only some runtime_options from it), and its CPU default is
bf16 where the CPU has it: so the artifact carries the settings it was measured with in openvino_config.json,
beside the IR, for compile_model(xml, "CPU", config). int8 is NNCF's
post-training quantization on the OpenVINO model (FakeQuantize nodes before weights and activations), calibrated
on the job's samples; with a labelled eval dataset it is NNCF's accuracy-controlled quantization, which reverts
the most sensitive layers to float until the top-1 drop is within the budget. A model that is already quantized
(QDQ or QOperator ONNX from a quantize.* step) is taken as it is: OpenVINO runs its int8 nodes natively.
"""
from __future__ import annotations

import json
import logging
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from app.errors import JobFailed
from workers.openvino.session import PRECISION_HINTS, _short, compile_config, core

log = logging.getLogger(__name__)

# Ops that mark a model NNCF should treat as a transformer (model_type=TRANSFORMER: its scheme for attention).
ATTENTION_OPS = {"Softmax", "SoftMax"}
QUANTIZED_OPS = {"FakeQuantize", "FakeConvert"}


@dataclass
class Lowered:
    xml: Path
    bin: Path
    precision: str
    details: dict[str, Any] = field(default_factory=dict)

    def zip(self, out: Path) -> Path:
        """The IR as one download: model.xml + model.bin, and openvino_config.json (the compile settings it was
        measured with; INFERENCE_NUM_THREADS left to the user's machine)."""
        config = {k: v for k, v in self.details.get("compile_config", {}).items() if k != "INFERENCE_NUM_THREADS"}
        with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
            archive.write(self.xml, "model.xml")
            archive.write(self.bin, "model.bin")
            archive.writestr("openvino_config.json", json.dumps(config, indent=2) + "\n")
        return out


@dataclass
class Validation:
    """Labelled samples NNCF's accuracy control validates on: feeds (one per sample, or per fixed batch) and labels."""

    feeds: list[dict[str, np.ndarray]]
    labels: list[np.ndarray]
    name: str


def op_types(model) -> set[str]:
    return {op.get_type_name() for op in model.get_ops()}


def is_transformer(model) -> bool:
    """Attention: a Softmax, and a MatMul whose two inputs are both computed (not a weight)."""
    if not op_types(model) & ATTENTION_OPS:
        return False
    for op in model.get_ops():
        if op.get_type_name() != "MatMul":
            continue
        kinds = [op.input_value(i).get_node().get_type_name() for i in range(2)]
        if not any(kind in ("Constant", "Convert", "FakeQuantize") for kind in kinds):
            return True
    return False


def lower(model_path: Path, out_dir: Path, *, precision: str, threads: int,
          calibration: Callable[[], tuple[list[dict[str, np.ndarray]], str, list[str]]] | None = None,
          validation: Validation | None = None, max_accuracy_drop: float | None = None,
          progress: Callable[[float, str], None] | None = None) -> Lowered:
    """The model at `model_path` (ONNX) as OpenVINO IR in out_dir at `precision`.

    calibration() -> (feeds, described, notes): called only for int8. validation: with labels, int8 runs NNCF's
    accuracy-controlled quantization within max_accuracy_drop (default 0.01). Raises JobFailed with
    lowering_failed (OpenVINO cannot read or convert the model) or quantization_failed (NNCF failed).
    """
    import openvino as ov

    if precision not in PRECISION_HINTS:
        raise JobFailed(f"the openvino target has no precision {precision!r}", code="invalid_params")
    started = time.perf_counter()
    say = progress or (lambda _f, _m: None)
    say(0.0, "reading the model into OpenVINO")
    try:
        model = core().read_model(str(model_path))
    except Exception as exc:
        raise JobFailed(f"OpenVINO {ov.__version__} cannot read the model: {_short(exc)}",
                        code="lowering_failed") from exc
    details: dict[str, Any] = {"runtime": "openvino", "openvino": ov.__version__, "device": "CPU",
                               "precision": precision, "inference_precision_hint": PRECISION_HINTS[precision],
                               "warnings": []}
    if precision.startswith("int8"):
        model = _quantize(model, details, threads=threads, calibration=calibration, validation=validation,
                          max_accuracy_drop=max_accuracy_drop, say=say)
    out_dir.mkdir(parents=True, exist_ok=True)
    xml = out_dir / "model.xml"
    say(0.95, "saving the OpenVINO IR")
    try:
        # compress_to_fp16=False: the IR keeps the weights as they were measured (f32, or int8 after NNCF).
        ov.save_model(model, str(xml), compress_to_fp16=False)
    except Exception as exc:
        raise JobFailed(f"OpenVINO could not save the IR: {_short(exc)}", code="lowering_failed") from exc
    details["duration_s"] = round(time.perf_counter() - started, 3)
    details["compile_config"] = compile_config(precision, threads)
    return Lowered(xml=xml, bin=xml.with_suffix(".bin"), precision=precision, details=details)


def _quantize(model, details: dict[str, Any], *, threads: int, calibration, validation: Validation | None,
              max_accuracy_drop: float | None, say: Callable[[float, str], None]):
    import nncf
    from nncf.common.logging.logger import set_log_level

    set_log_level(logging.WARNING)  # its progress bars and per-stage lines would flood the job's log
    if op_types(model) & QUANTIZED_OPS:
        details["nncf"] = {"skipped": "the model is already quantized (it holds FakeQuantize nodes, from QDQ "
                                      "ONNX): OpenVINO runs its int8 nodes as they are"}
        return model
    if calibration is None:
        raise JobFailed("int8 on the openvino target needs calibration inputs", code="calibration_failed")
    say(0.05, "building the calibration inputs")
    feeds, described, notes = calibration()
    transformer = is_transformer(model)
    options: dict[str, Any] = {"subset_size": len(feeds)}
    if transformer:
        options["model_type"] = nncf.ModelType.TRANSFORMER
    record: dict[str, Any] = {"nncf": nncf.__version__, "calibration": described, "calibration_samples": len(feeds),
                              "model_type": "transformer" if transformer else "default",
                              "preset": "mixed" if transformer else "performance"}
    details["warnings"] += notes
    if described == "random data":
        details["warnings"].append("calibrated on random data, not on samples of real inputs: activation ranges "
                                   "may not match real data; give target.calibration_dataset_id")
    dataset = nncf.Dataset(feeds)
    try:
        if validation is not None:
            drop = 0.01 if max_accuracy_drop is None else max_accuracy_drop
            say(0.1, f"NNCF accuracy-controlled int8 quantization (top-1 drop within {drop:.3g})")
            record.update(mode="accuracy_control", max_drop=drop, drop_type="absolute",
                          validation=f"top-1 accuracy on {validation.name} ({sum(len(part) for part in validation.labels)} "
                                     "samples)")
            pairs = list(zip(validation.feeds, validation.labels))
            quantized = nncf.quantize_with_accuracy_control(
                model, calibration_dataset=dataset,
                validation_dataset=nncf.Dataset(pairs, lambda item: item[0]),
                validation_fn=_top1_validator(threads), max_drop=drop, drop_type=nncf.DropType.ABSOLUTE, **options)
        else:
            say(0.1, f"NNCF int8 post-training quantization on {len(feeds)} samples")
            record["mode"] = "post_training"
            quantized = nncf.quantize(model, dataset, **options)
    except JobFailed:
        raise
    except Exception as exc:
        raise JobFailed(f"NNCF could not quantize the model: {type(exc).__name__}: {_short(exc)}",
                        code="quantization_failed") from exc
    record["fake_quantize_nodes"] = sum(op.get_type_name() == "FakeQuantize" for op in quantized.get_ops())
    details["nncf"] = record
    return quantized


def _top1_validator(threads: int):
    """NNCF's validation_fn: top-1 accuracy of the first output read as class scores [batch, classes]."""

    def validate(compiled_model, items) -> float:
        right = total = 0
        for feed, labels in items:
            scores = np.asarray(compiled_model(feed)[0])
            scores = scores.reshape(scores.shape[0], -1)
            right += int((scores.argmax(axis=1) == np.asarray(labels)).sum())
            total += len(labels)
        return right / max(total, 1)

    return validate
