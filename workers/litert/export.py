"""Export an ONNX model to LiteRT (.tflite): onnx2tf turns the ONNX graph into a TensorFlow SavedModel, and
TensorFlow's TFLite converter writes one .tflite per precision asked for from it:

- f32: the float graph as it is;
- f16: weights stored in float16 (half the size), dequantized to float32 when LiteRT's CPU kernels load them;
- int8: full-integer post-training quantization (TFLITE_BUILTINS_INT8 only: every operator runs in int8, and the
  conversion fails rather than leave one in float), activation ranges calibrated on the job's samples; the model's
  inputs and outputs stay float32, with a QUANTIZE and a DEQUANTIZE at the edges, so the .tflite takes what the
  ONNX model takes.

Why onnx2tf and not litert-torch over the bridge's PyTorch module: onnx2tf needs TensorFlow, which the worker has
already (tensorflow-cpu, for Keras uploads), while litert-torch pulls jax, torchao, litert-converter and
ai-edge-quantizer and converts only what torch.export can trace, which the bridge's onnx2torch modules often are not.
onnx2tf's own pins (tensorflow 2.19, onnx 1.19, onnxruntime 1.23, numpy 1.26) would replace ours, so it is installed
without its dependencies (Makefile) and runs against the pinned TensorFlow 2.21.

The ONNX model's inputs keep their layout (keep_ncw_or_nchw_or_ncdhw_input_names): onnx2tf puts the NCHW->NHWC
transpose inside the graph, so an app feeds the .tflite the arrays it fed the ONNX model, and the measurement feeds
both the same arrays. The conversion runs in a process of its own (`python -m workers.litert.export REQUEST`):
onnx2tf ends the process (sys.exit) on some unsupported models, prints hundreds of lines, and leaves TensorFlow's
graph and thread pools behind; the job process keeps none of that.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from app.errors import JobFailed

PRECISIONS = ("f32", "f16", "int8")
EXPORT_TIMEOUT_S = 1800
ANSI = re.compile(r"\x1b\[[0-9;]*m")
# onnx2tf's and TensorFlow's chatter that says nothing about why a conversion failed
NOISE = re.compile(r"^(WARNING: All log messages|I0000|W0000|E0000|INFO:|\s*$)")


@dataclass
class Exported:
    paths: dict[str, Path]                 # precision -> .tflite
    details: dict[str, Any] = field(default_factory=dict)


def export(model: Path, out_dir: Path, precisions: list[str], *, calibration: list[dict[str, np.ndarray]] | None = None,
           timeout_s: float = EXPORT_TIMEOUT_S) -> Exported:
    """`model` (ONNX) -> out_dir/model_<precision>.tflite for each of `precisions`, from one onnx2tf conversion.

    calibration: the int8 representative dataset, one feed (input name -> array, batch axis first) per item;
    required for int8. Raises JobFailed: litert_conversion_failed (onnx2tf or the converter cannot convert the model),
    litert_quantization_failed (the model converts in float but not in full-integer int8), calibration_required
    (int8 without samples). Nothing is left in out_dir on failure.
    """
    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown:
        raise ValueError(f"unknown LiteRT precision {unknown[0]!r}; known: {', '.join(PRECISIONS)}")
    if "int8" in precisions and not calibration:
        raise JobFailed("full-integer int8 on the litert target needs calibration samples (a representative dataset): "
                        "give target.calibration_dataset_id, or an eval dataset (evaluate.eval_dataset_id) whose "
                        "inputs it calibrates on", code="calibration_required")
    out_dir.mkdir(parents=True, exist_ok=True)
    request: dict[str, Any] = {"model": str(model), "out": str(out_dir), "precisions": list(precisions)}
    if calibration:
        names = list(calibration[0])
        arrays = {f"s{i}_{j}": np.asarray(feed[name]) for i, feed in enumerate(calibration)
                  for j, name in enumerate(names)}
        np.savez(out_dir / "calibration.npz", allow_pickle=False, **arrays)
        request.update(calibration=str(out_dir / "calibration.npz"), calibration_names=names,
                       calibration_count=len(calibration))
    (out_dir / "request.json").write_text(json.dumps(request))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", TF_ENABLE_ONEDNN_OPTS="0", CUDA_VISIBLE_DEVICES="")
    try:
        done = subprocess.run([sys.executable, "-m", "workers.litert.export", str(out_dir / "request.json")],
                              capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired as exc:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise JobFailed(f"exporting to LiteRT took longer than {timeout_s:.0f} s", code="litert_conversion_failed") \
            from exc
    outcome = _last_json(done.stdout)
    if outcome is None or not outcome.get("ok"):
        shutil.rmtree(out_dir, ignore_errors=True)
        if outcome is None:  # the process died (a crash in TensorFlow, memory): its last words say why
            outcome = {"code": "litert_conversion_failed",
                       "message": f"the exporting process exited with {done.returncode}: {_tail(done.stderr)}"}
        raise JobFailed(outcome["message"], code=outcome["code"])
    for name in ("request.json", "calibration.npz"):
        (out_dir / name).unlink(missing_ok=True)
    return Exported(paths={p: Path(path) for p, path in outcome["paths"].items()}, details=outcome["details"])


def _last_json(stdout: str) -> dict[str, Any] | None:
    for line in reversed(stdout.splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                return None
    return None


def _tail(text: str, lines: int = 6, limit: int = 1500) -> str:
    kept = [ANSI.sub("", line).strip() for line in text.splitlines()]
    kept = [line for line in kept if line and not NOISE.match(line)]
    said = " | ".join(kept[-lines:]) or "no message"
    return said if len(said) <= limit else "... " + said[-limit:]


# --- the exporting process ------------------------------------------------------------------------------------

def _graph_inputs(model: Path) -> list[str]:
    import onnx

    loaded = onnx.load(str(model), load_external_data=False)
    initializers = {i.name for i in loaded.graph.initializer}
    return [i.name for i in loaded.graph.input if i.name not in initializers]


def _private_copy(model: Path, folder: Path) -> Path:
    """The model (with any external data) saved again under `folder`: onnx2tf writes its shape-inferred graph back
    over the file it is given (onnx2tf.py saves `estimated_graph` to input_onnx_file_path even with
    not_use_onnxsim), which would change the stored upload, or a model the caller still reads, under its sha256."""
    import onnx

    loaded = onnx.load(str(model))
    folder.mkdir(parents=True, exist_ok=True)
    copy = folder / "model.onnx"
    onnx.save(loaded, str(copy), save_as_external_data=loaded.ByteSize() > 1_900_000_000)
    return copy


def _to_saved_model(model: Path, folder: Path) -> dict[str, Any]:
    import onnx2tf

    captured = io.StringIO()
    started = time.perf_counter()
    given = _private_copy(model, folder.parent / "onnx2tf-input")
    try:
        with contextlib.redirect_stdout(captured):
            onnx2tf.convert(input_onnx_file_path=str(given), output_folder_path=str(folder), not_use_onnxsim=True,
                            keep_ncw_or_nchw_or_ncdhw_input_names=_graph_inputs(given), output_signaturedefs=True,
                            non_verbose=True)
    except BaseException as exc:  # SystemExit included: onnx2tf exits on what it cannot convert
        said = _tail(captured.getvalue())
        reason = f"{type(exc).__name__}: {' '.join(str(exc).split())[:1200]}" if not isinstance(exc, SystemExit) else said
        raise _Refused("litert_conversion_failed", f"onnx2tf could not convert the model to TensorFlow: {reason}") \
            from exc
    if not (folder / "saved_model.pb").is_file():
        raise _Refused("litert_conversion_failed", "onnx2tf wrote no SavedModel: " + _tail(captured.getvalue()))
    return {"onnx2tf_s": round(time.perf_counter() - started, 3)}


class _Refused(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def _representative(request: dict[str, Any]):
    """The converter's representative dataset: one {input name: array} per calibration item, as the SavedModel's
    signature names its inputs."""
    names, count = request["calibration_names"], request["calibration_count"]

    def items():
        with np.load(request["calibration"], allow_pickle=False) as data:
            for i in range(count):
                yield {name: data[f"s{i}_{j}"] for j, name in enumerate(names)}

    return items


def _convert(saved: Path, precision: str, request: dict[str, Any]) -> bytes:
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved))
    if precision == "f16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif precision == "int8":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = _representative(request)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    try:
        return converter.convert()
    except Exception as exc:
        code = "litert_quantization_failed" if precision == "int8" else "litert_conversion_failed"
        what = "full-integer int8 (an operator without an int8 kernel in LiteRT is refused, not left in float)" \
            if precision == "int8" else precision
        raise _Refused(code, f"TensorFlow's TFLite converter could not convert the model at {what}: "
                             f"{_tail(str(exc), lines=4)}") from exc


def _main(request_path: str) -> dict[str, Any]:
    from importlib.metadata import version

    from workers.litert.flatbuffer import read

    request = json.loads(Path(request_path).read_text())
    out = Path(request["out"])
    saved = out / "saved_model"
    details: dict[str, Any] = {"runtime": "litert", "converter": "onnx2tf + TensorFlow TFLiteConverter",
                               "versions": {name: version(name) for name in ("onnx2tf", "tensorflow-cpu",
                                                                              "ai-edge-litert")},
                               "input_layout": "as the ONNX model's (the NCHW->NHWC transpose is inside the graph)"}
    details.update(_to_saved_model(Path(request["model"]), saved))
    paths, per_precision = {}, {}
    for precision in request["precisions"]:
        started = time.perf_counter()
        path = out / f"model_{precision}.tflite"
        path.write_bytes(_convert(saved, precision, request))
        contents = read(path)
        per_precision[precision] = {"file_bytes": path.stat().st_size, "operators": contents["operators"],
                                    "tensor_types": contents["tensor_types"],
                                    "duration_s": round(time.perf_counter() - started, 3)}
        paths[precision] = str(path)
    shutil.rmtree(saved, ignore_errors=True)
    shutil.rmtree(out / "onnx2tf-input", ignore_errors=True)
    details["precisions"] = per_precision
    return {"ok": True, "paths": paths, "details": details}


if __name__ == "__main__":
    try:
        result = _main(sys.argv[1])
    except _Refused as refused:
        result = {"ok": False, "code": refused.code, "message": refused.message}
    print(json.dumps(result), flush=True)
