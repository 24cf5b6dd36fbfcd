"""Keras models -> ONNX with tf2onnx: `.keras` files (format "keras") and TF SavedModel zips ("savedmodel-zip").

- `.keras` (Keras 3, or tf_keras 2 as TF Model Optimization writes it): loaded by Keras 3 on its TensorFlow
  backend with `safe_mode=True` and `compile=False` (the training config is never deserialized), after the API's
  config check runs again here (app.formats.keras_files: no Lambda, no custom objects); exported by Keras' own
  `model.export(format="tf_saved_model")` (batch dim dynamic), then converted as a SavedModel is.
- SavedModel: unpacked with the API's zip checks, its serving signature (`serving_default`, else the first)
  frozen and converted by tf2onnx. A SavedModel holds graphs, not Python: nothing from the upload runs as code.

Every export is checked: the ONNX model in ONNX Runtime against the framework's own outputs on seeded random
inputs at two batch sizes, within `max_abs_tolerance + max_rel_tolerance * |reference|` per element
(1e-4 + 1e-3 by default; plus one quantizer step on outputs of a quantization-aware graph). A miss fails the job
with `conversion_failed`, naming the output and, for a `.keras` model, the first layer whose output differs.
Ops tf2onnx leaves unconverted are named with their node (`conversion_failed`).

TensorFlow and tf2onnx are imported inside the functions, so registering costs nothing.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from app.errors import JobFailed, Unprocessable
from app.formats.keras_files import KERAS, SAVED_MODEL_PB, SAVEDMODEL_ZIP, describe_saved_model, inspect_keras, savedmodel_folder
from app.formats.limits import Limits
from app.formats.onnx_files import _short, safe_members, unpack_members
from workers.convert import Converted, register

OPSET = 17
# Outputs agree when |onnx - framework| <= atol + RTOL * |framework| element-wise (float32 kernels differ in
# summation order and fused activations between TensorFlow and ONNX Runtime).
DEFAULT_ATOL = 1e-4
RTOL = 1e-3
CHECK_BATCHES = (1, 3)
# A dynamic dim other than the batch gets this size on the check's random inputs.
FREE_DIM = 16
SEED = 0
# Where Keras 3 keeps the model classes that tf_keras (Keras 2) wrote under tf_keras.src.engine.*.
KERAS3_MODELS = {"Functional": "keras.src.models.functional", "Sequential": "keras"}
# Ops that move values without changing them: a quantizer's step carries through them to an output.
SHAPE_ONLY_OPS = {"Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose"}

log = logging.getLogger(__name__)


@register(KERAS)
def convert_keras(source_path: Path, out_dir: Path, options: dict) -> Converted:
    progress = options.get("progress") or (lambda fraction, message: None)
    with _as_job_failure():  # the upload's checks again: this worker may be newer than the API that took it
        inspect_keras(source_path, limits=Limits())
    tf, keras, tf2onnx = _frameworks()
    progress(0.1, "loading the Keras model (safe mode)")
    # Keras tells formats apart by the file name; the stored blob is named by its hash.
    named = out_dir / "source" / "model.keras"
    named.parent.mkdir(parents=True, exist_ok=True)
    _as_keras3(source_path, named)
    try:
        model = keras.saving.load_model(str(named), compile=False, safe_mode=True)
    except Exception as exc:  # Keras raises TypeError/ValueError/KeyError for configs it cannot rebuild
        raise JobFailed(f"Keras {keras.__version__} could not rebuild the model: {_short(exc)}. Save it with "
                        f"Keras 3 (model.save('x.keras')) or upload a SavedModel zip", code="conversion_failed") from None
    output_names = _output_names(model)

    def call(args):
        outputs = model(_as_structure(model, args), training=False)
        return outputs if isinstance(outputs, (list, tuple)) else [outputs]

    # Through Keras' own SavedModel export: tracing the model in a tf.function of ours left constants a layer
    # captures (Normalization's mean and variance in EfficientNet) as ONNX graph inputs, and tf2onnx's from_keras
    # trips over Keras 3 Sequential models. The export's outputs are renamed after Keras' output names.
    progress(0.2, "exporting a SavedModel with Keras")
    saved = out_dir / "savedmodel"
    try:
        model.export(str(saved), format="tf_saved_model", verbose=False)
    except Exception as exc:  # Keras raises what tracing the model's call raised
        raise JobFailed(f"Keras could not trace the model for export: {_short(exc)}", code="conversion_failed") from None
    onnx_path, inputs, _function = _saved_model_to_onnx(
        tf, tf2onnx, saved, "serve", out_dir, progress, output_name=lambda i, key: output_names[i])
    progress(0.7, "checking the ONNX model against Keras")

    def reference(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ordered = [feeds[_tensor_name(t)] for t in model.inputs]  # `inputs` is sorted by name, not the model's order
        return {name: np.asarray(o) for name, o in zip(output_names, call(ordered))}

    check = _check(onnx_path, inputs, reference, options, locate=lambda feeds: _first_diverging_layer(
        keras, model, onnx_path, feeds, options))
    return Converted(model_path=onnx_path, details=_details(tf, keras, tf2onnx, inputs, check) | {
        "source_format": KERAS, "model_class": type(model).__name__,
        "layers": sum(1 for layer in model.layers if type(layer).__name__ != "InputLayer")})


@register(SAVEDMODEL_ZIP)
def convert_savedmodel(source_path: Path, out_dir: Path, options: dict) -> Converted:
    progress = options.get("progress") or (lambda fraction, message: None)
    limits = Limits()
    try:
        with zipfile.ZipFile(source_path) as archive, _as_job_failure():
            members = safe_members(archive, limits)
            folder = savedmodel_folder(members)
            root = unpack_members(archive, members, out_dir / "source", limits)
    except (zipfile.BadZipFile, OSError) as exc:
        raise JobFailed(f"the SavedModel zip cannot be read ({_short(exc)})", code="conversion_failed") from None
    saved = root / folder if folder else root
    with _as_job_failure():  # the upload's checks again (PyFunc ops, no serving signature); they name the signature
        name = describe_saved_model(saved / SAVED_MODEL_PB)["signature"]
    tf, keras, tf2onnx = _frameworks()
    progress(0.1, f"loading the SavedModel's {name!r} signature")
    onnx_path, inputs, function = _saved_model_to_onnx(tf, tf2onnx, saved, name, out_dir, progress)
    progress(0.7, "checking the ONNX model against TensorFlow")

    def reference(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # tf2onnx names the ONNX outputs after the signature's output keys (tensors_to_rename).
        result = function(**{key: tf.constant(value) for key, value in feeds.items()})
        return {key: np.asarray(value) for key, value in result.items()}

    check = _check(onnx_path, inputs, reference, options, locate=None)
    return Converted(model_path=onnx_path, details=_details(tf, keras, tf2onnx, inputs, check) | {
        "source_format": SAVEDMODEL_ZIP, "signature": name})


def _saved_model_to_onnx(tf, tf2onnx, saved: Path, name: str, out_dir: Path, progress,
                         output_name: Callable[[int, str], str] | None = None):
    """Freeze a SavedModel's signature and convert it; (onnx path, [(input, shape, dtype)], the TF function).
    ONNX inputs and outputs are named after the signature's keys, outputs renamed by `output_name(i, key)`."""
    from tf2onnx import tf_loader

    try:
        function = tf.saved_model.load(str(saved), tags=["serve"]).signatures[name]
        graph_def, in_names, out_names, renames = tf_loader.from_saved_model(
            str(saved), None, None, tag="serve", signatures=[name], return_tensors_to_rename=True)
    except Exception as exc:  # TensorFlow raises many kinds for a SavedModel it cannot load
        raise JobFailed(f"TensorFlow {tf.__version__} could not load the SavedModel's {name!r} signature: "
                        f"{_short(exc)}", code="conversion_failed") from None
    if output_name is not None:
        # Keras' export names them output_0, output_1, ... in the model's order (output_10 after output_9).
        keys = sorted(function.structured_outputs, key=lambda k: (len(k), k))
        renames |= {tensor: output_name(keys.index(renames[tensor]), renames[tensor]) for tensor in out_names}
    specs = function.structured_input_signature[1]
    inputs = [(key, tuple(spec.shape), np.dtype(spec.dtype.as_numpy_dtype)) for key, spec in sorted(specs.items())]
    onnx_path = _onnx_path(out_dir)
    progress(0.3, "converting with tf2onnx")
    _run_tf2onnx(lambda: tf2onnx.convert.from_graph_def(
        graph_def, input_names=in_names, output_names=out_names, opset=OPSET, tensors_to_rename=renames,
        output_path=str(onnx_path)))
    return onnx_path, inputs, function


# --- shared -----------------------------------------------------------------------------------

def _as_keras3(source: Path, target: Path) -> None:
    """Copy a .keras file, naming tf_keras' (Keras 2) model classes as Keras 3 does: their layers serialize
    alike, but the Functional/Sequential classes moved module, and Keras 3 looks built-ins up by module."""
    with zipfile.ZipFile(source) as archive:
        config = json.loads(archive.read("config.json"))
        moved = 0
        stack = [config]
        while stack:
            node = stack.pop()
            if isinstance(node, dict):
                module = node.get("module")
                if isinstance(module, str) and module.startswith("tf_keras.") and node.get("class_name") in KERAS3_MODELS:
                    node["module"] = KERAS3_MODELS[node["class_name"]]
                    moved += 1
                stack.extend(node.values())
            elif isinstance(node, list):
                stack.extend(node)
        if not moved:
            shutil.copyfile(source, target)
            return
        with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED) as out:
            for info in archive.infolist():
                data = json.dumps(config).encode() if info.filename == "config.json" else archive.read(info)
                out.writestr(info.filename, data)


@contextlib.contextmanager
def _as_job_failure():
    """An upload check failing in the worker fails the job with the check's own code and fields."""
    try:
        yield
    except Unprocessable as exc:  # InvalidModel, UnsafeArchive, UnsafeLayerRefused, CustomObjectRefused
        raise JobFailed(exc.message, code=exc.code, **exc.extra) from None


def _frameworks():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    try:
        import keras
        import tensorflow as tf
        import tf2onnx
    except ImportError as exc:
        raise JobFailed(f"this worker cannot convert Keras models: {exc.name or exc} is not installed (TensorFlow "
                        "CPU and tf2onnx are worker dependencies: make install)", code="conversion_failed") from None
    if keras.backend.backend() != "tensorflow":
        raise JobFailed(f"Keras runs on its {keras.backend.backend()!r} backend in this worker; tf2onnx needs "
                        "'tensorflow' (unset KERAS_BACKEND)", code="conversion_failed")
    return tf, keras, tf2onnx


def _onnx_path(out_dir: Path) -> Path:
    """Where the export goes: a folder of its own, as everything beside it would be stored with it."""
    folder = out_dir / "onnx"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / "model.onnx"


def _run_tf2onnx(convert: Callable[[], Any]) -> None:
    try:
        convert()
    except JobFailed:
        raise
    except Exception as exc:  # tf2onnx raises whatever the op handler it calls raised
        raise JobFailed(f"tf2onnx could not convert the model: {_short(exc)}", code="conversion_failed") from None


def _unconverted_ops(onnx_path: Path) -> list[tuple[str, str]]:
    """(op type, node name) of nodes tf2onnx left as TensorFlow ops: it logs them and writes them through."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    missing = []
    for node in model.graph.node:
        domain = node.domain or ""
        if domain not in ("", "ai.onnx", "ai.onnx.ml"):
            continue
        if not onnx.defs.has(node.op_type, domain):
            missing.append((node.op_type, node.name))
    return missing


def _check(onnx_path: Path, inputs: list[tuple[str, tuple, np.dtype]], reference: Callable, options: dict,
           locate: Callable | None) -> dict[str, Any]:
    import onnxruntime as ort

    missing = _unconverted_ops(onnx_path)
    if missing:
        listed = ", ".join(f"{op} (node {node!r})" for op, node in missing[:10])
        raise JobFailed(f"tf2onnx has no ONNX equivalent for {len(missing)} TensorFlow op(s): {listed}; replace "
                        "the layers that use them", code="conversion_failed",
                        ops=[{"op_type": op, "node": node} for op, node in missing[:50]])
    atol, rtol = _tolerance(options)
    try:
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise JobFailed(f"ONNX Runtime cannot load the converted model: {_short(exc)}", code="conversion_failed") from None
    names = [o.name for o in session.get_outputs()]
    steps = _output_quantization_steps(onnx_path)
    worst: dict[str, float] = {}
    rng = np.random.default_rng(SEED)
    for batch in CHECK_BATCHES:
        feeds = {name: _sample(rng, shape, dtype, batch) for name, shape, dtype in inputs}
        onnx_feeds = {i.name: feeds[_base(i.name)] for i in session.get_inputs()}
        expected = reference(feeds)
        if sorted(expected) != sorted(names):
            raise JobFailed(f"the ONNX model's outputs {names} are not the source model's {sorted(expected)}",
                            code="conversion_failed")
        for name, have in zip(names, session.run(names, onnx_feeds)):
            want = expected[name]
            if want.shape != have.shape:
                raise JobFailed(f"output {name!r} has shape {list(have.shape)} in ONNX Runtime and "
                                f"{list(want.shape)} in TensorFlow at batch {batch}", code="conversion_failed")
            diff = np.abs(have.astype(np.float64) - want.astype(np.float64))
            worst[name] = max(worst.get(name, 0.0), float(diff.max()) if diff.size else 0.0)
            step = steps.get(name, 0.0)
            if not np.all(diff <= atol + rtol * np.abs(want) + step * (1 + 1e-3)):
                where = locate(feeds) if locate else None
                allowed = f"{atol:g} + {rtol:g}*|value|" + (f" + one quantization step {step:.3g}" if step else "")
                raise JobFailed(
                    f"the ONNX model's output {name!r} differs from TensorFlow's by up to {float(diff.max()):.3g} at "
                    f"batch {batch} (allowed {allowed})" + (f"; first differing layer: {where}" if where else ""),
                    code="conversion_failed", output=name, max_abs_diff=float(diff.max()), layer=where)
    check = {"batches": list(CHECK_BATCHES), "inputs": "seeded random (uniform [0, 1) floats, small integers)",
             "atol": atol, "rtol": rtol, "max_abs_diff": worst, "passed": True}
    if steps:
        check["quantization_steps"] = steps
        check["note"] = ("a quantization-aware graph (TF fake-quant -> ONNX QuantizeLinear/DequantizeLinear): an "
                         "output may differ by one step of its last quantizer where the two round a value differently")
    return check


def _output_quantization_steps(onnx_path: Path) -> dict[str, float]:
    """For each graph output computed by a DequantizeLinear (through shape-only ops), that quantizer's step.

    TensorFlow's fake-quant ops and ONNX's QuantizeLinear can put a value on neighbouring steps of the grid (their
    rounding and range nudging differ), so a quantization-aware model's outputs may differ by one step there."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path))
    producer = {out: node for node in model.graph.node for out in node.output}
    constants = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    steps = {}
    for output in model.graph.output:
        node = producer.get(output.name)
        while node is not None and node.op_type in SHAPE_ONLY_OPS:
            node = producer.get(node.input[0])
        if node is not None and node.op_type == "DequantizeLinear" and node.input[1] in constants:
            steps[output.name] = float(np.max(np.abs(constants[node.input[1]])))
    return steps


def _first_diverging_layer(keras, model, onnx_path: Path, feeds: dict[str, np.ndarray], options: dict) -> str | None:
    """The first layer (in the model's order) whose output ONNX Runtime computes differently, found by exposing
    the output of the last ONNX node tf2onnx named after each layer; None when it cannot be told."""
    import onnx
    import onnxruntime as ort

    atol, rtol = _tolerance(options)
    try:
        proto = onnx.load(str(onnx_path))
        produced = {}  # layer name -> output of the last node under that layer's name scope
        # tf2onnx names nodes after TensorFlow's name scopes: ".../<layer name>[_<n>]/<op>".
        scopes = {layer.name: re.compile(rf"(^|/){re.escape(layer.name)}(_\d+)?/") for layer in model.layers}
        for node in proto.graph.node:
            for layer in model.layers:
                if node.output and scopes[layer.name].search(node.name):
                    produced[layer.name] = node.output[0]
        candidates = [layer for layer in model.layers if layer.name in produced]
        for layer in candidates:
            proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(produced[layer.name]))
        session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        got = session.run([produced[layer.name] for layer in candidates],
                          {i.name: feeds[_base(i.name)] for i in session.get_inputs()})
        probe = keras.Model(model.inputs, [layer.output for layer in candidates])
        want = probe(_as_structure(model, [feeds[_tensor_name(t)] for t in model.inputs]), training=False)
        want = want if isinstance(want, (list, tuple)) else [want]
        for layer, w, g in zip(candidates, want, got):
            w = np.asarray(w)
            if w.shape == g.shape and not np.all(np.abs(g - w) <= atol + rtol * np.abs(w)):
                return f"{layer.name} ({type(layer).__name__})"
    except Exception as exc:  # the locating is a courtesy: the failure is reported without it
        log.info("could not locate the diverging layer: %s", _short(exc))
    return None


def _tolerance(options: dict) -> tuple[float, float]:
    """(absolute, relative) tolerance of the check: the options' `max_abs_tolerance` / `max_rel_tolerance`."""
    atol, rtol = options.get("max_abs_tolerance"), options.get("max_rel_tolerance")
    return (DEFAULT_ATOL if atol is None else float(atol)), (RTOL if rtol is None else float(rtol))


def _sample(rng: np.random.Generator, shape: tuple, dtype: np.dtype, batch: int) -> np.ndarray:
    dims = [batch if i == 0 and d is None else (FREE_DIM if d is None else int(d)) for i, d in enumerate(shape)]
    if np.issubdtype(dtype, np.floating):
        return rng.random(dims).astype(dtype)
    if dtype == np.bool_:
        return rng.random(dims) < 0.5
    return rng.integers(0, 10, size=dims).astype(dtype)


def _details(tf, keras, tf2onnx, inputs, check: dict) -> dict[str, Any]:
    return {
        "exporter": f"tf2onnx {tf2onnx.__version__}",
        "framework": f"tensorflow {tf.__version__}, keras {keras.__version__}",
        "opset": OPSET,
        "inputs": [{"name": n, "shape": [None if d is None else int(d) for d in s], "dtype": d_.name}
                   for n, s, d_ in inputs],
        "check": check,
    }


def _as_structure(model, args):
    """Inputs in the structure the model was built with (a list, or one tensor), so Keras does not warn."""
    try:
        structure = model.input
    except (AttributeError, ValueError):  # a Sequential that was loaded but never called has none yet
        structure = None
    return list(args) if isinstance(structure, (list, tuple)) or len(args) > 1 else args[0]


def _output_names(model) -> list[str]:
    """Keras' names for the model's outputs (a Sequential's is its last layer's), unique and in order."""
    names = list(getattr(model, "output_names", None) or [])
    if len(names) != len(model.outputs):
        names = [model.layers[-1].name] if len(model.outputs) == 1 else [_tensor_name(t) for t in model.outputs]
    return names if len(set(names)) == len(names) else [f"output_{i}" for i in range(len(names))]


def _tensor_name(tensor) -> str:
    return _base(getattr(tensor, "name", None) or "input")


def _base(name: str) -> str:
    """A TensorFlow tensor name without its output index ("image:0" -> "image")."""
    return name.rsplit(":", 1)[0] if ":" in name else name
