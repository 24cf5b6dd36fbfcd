"""Keras uploads: a `.keras` file or a zip holding a TensorFlow SavedModel folder, checked without TensorFlow.

A worker converts both to ONNX (workers.convert.keras). The API only reads them:

- `.keras` (Keras 3, and tf.keras 2.13+ / tf_keras) is a zip of `config.json` (the architecture as JSON),
  `metadata.json` and `model.weights.h5`. The config is walked object by object, and what Keras' `safe_mode`
  would refuse at load time is refused here, at upload, so no job is queued for it: `Lambda` layers and any
  serialized Python function (`unsafe_layer_refused`), and classes that are not Keras' own built-ins
  (`custom_object_refused`: they need the user's Python code, which is never run).
- A SavedModel (`saved_model.pb` + `variables/`) is graphs and tensors, no Python. `saved_model.pb` is read
  with the protobuf wire reader of app.formats.onnx_wire (TensorFlow's proto classes live in TensorFlow) for its
  tags, serving signatures and op types; a graph calling back into Python (`PyFunc`) is refused.

Imports nothing of the service beyond app.errors and the zip checks of app.formats.onnx_files.
"""
from __future__ import annotations

import json
import mmap
import zipfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from app.errors import CustomObjectRefused, InvalidModel, UnsafeLayerRefused
from app.formats.limits import Limits
from app.formats.onnx_files import _short, safe_members, unpack_members
from app.formats.onnx_wire import LENGTH, Wire, WireError

KERAS, SAVEDMODEL_ZIP = "keras", "savedmodel-zip"
KERAS_SUFFIX = ".keras"
KERAS_MEMBERS = ("config.json", "metadata.json")
# Packages whose classes are Keras' own: Keras 3, and tf.keras 2 (tf_keras) which TF Model Optimization uses.
KERAS_PACKAGES = ("keras", "tf_keras")
# The weights file of each Keras 3 release so far (h5 by default, npz where h5py is absent).
KERAS_WEIGHTS = ("model.weights.h5", "model.weights.npz")
HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
# config.json of a real model is kilobytes to a few MiB; bigger is not a Keras config.
MAX_CONFIG_BYTES = 16 << 20
MAX_CONFIG_DEPTH = 200
# Markers of Keras' own serialization (tensors, tuples, ...) that carry no class to build.
KERAS_MARKERS = {"__keras_tensor__", "__tuple__", "__tensor__", "__numpy__", "__bytes__", "__typespec__",
                 "__ellipsis__", "__slice__"}
# Parts of a saved model that are not the architecture: training state. They are never loaded (the worker loads
# with compile=False), so a custom loss or metric there does not stop a conversion.
SKIPPED_KEYS = ("compile_config",)

SAVED_MODEL_PB = "saved_model.pb"
SERVING_TAG = "serve"
# Ops that call back into the Python process that built the graph: nothing to convert, no code to run.
PYTHON_OPS = {"PyFunc", "PyFuncStateless", "EagerPyFunc"}
# tensorflow/core/framework/types.proto DataType -> name, the ones model inputs use.
TF_DTYPES = {1: "float32", 2: "float64", 3: "int32", 4: "uint8", 5: "int16", 6: "int8", 7: "string", 9: "int64",
             10: "bool", 14: "bfloat16", 17: "uint16", 19: "float16", 22: "uint32", 23: "uint64"}


# --- .keras files -----------------------------------------------------------------------------

def inspect_keras(path: Path, *, limits: Limits) -> dict[str, Any]:
    """Check a `.keras` upload and describe it (layers, inputs, outputs). Raises InvalidModel, UnsafeArchive,
    UnsafeLayerRefused or CustomObjectRefused."""
    archive = _open_zip(path, what="a .keras file (a zip archive)")
    with archive:
        members = {m.filename: m for m in safe_members(archive, limits)}
        missing = [name for name in KERAS_MEMBERS if name not in members]
        if missing:
            raise InvalidModel(f"the .keras file has no {' or '.join(missing)}; save it with model.save('x.keras') "
                               "(Keras 3, or tf.keras 2.13+)")
        weights = next((members[n] for n in KERAS_WEIGHTS if n in members), None)
        if weights is None:
            raise InvalidModel(f"the .keras file holds no weights ({' or '.join(KERAS_WEIGHTS)})")
        if weights.filename.endswith(".h5"):
            with archive.open(weights) as fh:
                if fh.read(len(HDF5_MAGIC)) != HDF5_MAGIC:
                    raise InvalidModel(f"{weights.filename} in the .keras file is not an HDF5 file")
        config = _read_json(archive, members["config.json"])
        metadata = _read_json(archive, members["metadata.json"])
    if not isinstance(config, dict) or not isinstance(config.get("config"), dict):
        raise InvalidModel("config.json in the .keras file is not a Keras model config (no class_name/config)")
    check_keras_config(config)
    layers = list(_leaf_layers(config))
    return {
        "framework": "keras",
        "keras_version": metadata.get("keras_version") if isinstance(metadata, dict) else None,
        "model_class": config.get("class_name"),
        "model_name": config["config"].get("name"),
        "layers": len(layers),
        "layer_histogram": dict(sorted(Counter(layer.get("class_name") for layer in layers).items())),
        "inputs": _keras_inputs(config),
        "outputs": _keras_outputs(config),
        "weights_bytes": weights.file_size,
        "converts_to": "onnx",
    }


def check_keras_config(config: dict) -> None:
    """Refuse what Keras' safe_mode refuses, and classes that need the user's own Python code, naming the layer."""
    for obj, layer in _objects(config, layer=None, depth=0):
        class_name = obj.get("class_name")
        if class_name == "Lambda" or class_name == "__lambda__" or _carries_code(obj):
            raise UnsafeLayerRefused(
                f"layer {layer!r} is a Lambda layer (Python code serialized into the model); ModelPress never "
                "runs code from an upload (Keras safe_mode). Replace it with built-in layers (e.g. keras.ops "
                "inside a layer subclass is code too) or export the model yourself to ONNX or a SavedModel",
                layer=layer)
        if class_name in KERAS_MARKERS:
            continue
        module, registered = obj.get("module"), obj.get("registered_name")
        builtin = isinstance(module, str) and module.split(".")[0] in KERAS_PACKAGES
        if not builtin or (isinstance(registered, str) and ">" in registered):
            what = obj["config"] if class_name == "function" and isinstance(obj.get("config"), str) else (
                registered or class_name)
            raise CustomObjectRefused(
                f"layer {layer!r} uses {what!r}, which is not a Keras built-in (module {module!r}): loading it "
                "needs your own Python code, which ModelPress never runs. Use built-in layers and activations, "
                "or upload a SavedModel zip (model.export('dir', format='tf_saved_model')) or an ONNX file",
                layer=layer, object=what)


def _objects(node: Any, *, layer: str | None, depth: int) -> Iterator[tuple[dict, str | None]]:
    """Every serialized object ({"class_name": ...}) in a config, with the name of the layer holding it."""
    if depth > MAX_CONFIG_DEPTH:
        raise InvalidModel(f"config.json nests deeper than {MAX_CONFIG_DEPTH} levels")
    if isinstance(node, list):
        for item in node:
            yield from _objects(item, layer=layer, depth=depth + 1)
        return
    if not isinstance(node, dict):
        return
    if "class_name" in node:
        yield node, layer
    for key, value in node.items():
        if key == "layers" and isinstance(value, list):  # a model's layers: each names what it holds
            for item in value:
                yield from _objects(item, layer=_layer_name(item) or layer, depth=depth + 1)
        elif key not in SKIPPED_KEYS:
            yield from _objects(value, layer=layer, depth=depth + 1)


def _layer_name(layer: Any) -> str | None:
    if not isinstance(layer, dict):
        return None
    inner = layer.get("config")
    name = layer.get("name") or (inner.get("name") if isinstance(inner, dict) else None)
    return name if isinstance(name, str) else None


def _carries_code(obj: dict) -> bool:
    """A layer config holding a serialized function (Lambda's `function`, or bytecode under `code`)."""
    config = obj.get("config")
    if not isinstance(config, dict):
        return False
    function = config.get("function")
    return isinstance(function, (dict, list)) or (obj.get("class_name") == "__lambda__" and "code" in config)


def _leaf_layers(config: dict) -> Iterator[dict]:
    """The layers that compute (nested models opened up, InputLayers left out)."""
    for layer in config.get("config", {}).get("layers") or []:
        if not isinstance(layer, dict):
            continue
        inner = layer.get("config")
        if isinstance(inner, dict) and isinstance(inner.get("layers"), list):
            yield from _leaf_layers(layer)
        elif layer.get("class_name") != "InputLayer":
            yield layer


def _keras_inputs(config: dict) -> list[dict[str, Any]]:
    inner = config["config"]
    inputs = []
    for layer in inner.get("layers") or []:
        if isinstance(layer, dict) and layer.get("class_name") == "InputLayer":
            cfg = layer.get("config") or {}
            shape = cfg.get("batch_shape") or cfg.get("batch_input_shape")
            inputs.append({"name": cfg.get("name") or layer.get("name"), "dtype": _dtype(cfg.get("dtype")),
                           "shape": list(shape) if isinstance(shape, list) else None})
    if not inputs:  # a Sequential built without an Input: its build shape
        shape = (config.get("build_config") or {}).get("input_shape") or inner.get("build_input_shape")
        if isinstance(shape, list):
            inputs.append({"name": None, "dtype": None, "shape": shape})
    return inputs


def _keras_outputs(config: dict) -> list[str]:
    refs = config["config"].get("output_layers")
    if refs is None and config.get("class_name") == "Sequential":  # its output is its last layer's
        layers = [layer for layer in config["config"].get("layers") or [] if isinstance(layer, dict)]
        refs = [[(layers[-1].get("config") or {}).get("name")]] if layers else []
    if isinstance(refs, list) and refs and isinstance(refs[0], str):
        refs = [refs]
    return [str(ref[0]) for ref in refs or [] if isinstance(ref, list) and ref]


def _dtype(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict):  # Keras 3 writes a DTypePolicy object
        return (value.get("config") or {}).get("name")
    return None


def _read_json(archive: zipfile.ZipFile, member: zipfile.ZipInfo) -> Any:
    if member.file_size > MAX_CONFIG_BYTES:
        raise InvalidModel(f"{member.filename} in the .keras file is {member.file_size >> 20} MiB; at most "
                           f"{MAX_CONFIG_BYTES >> 20} MiB is accepted")
    try:
        with archive.open(member) as fh:
            return json.loads(fh.read(MAX_CONFIG_BYTES + 1))
    except (zipfile.BadZipFile, EOFError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise InvalidModel(f"{member.filename} in the .keras file cannot be read as JSON ({_short(exc)})") from None


def _open_zip(path: Path, *, what: str) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise InvalidModel(f"the upload is not {what}: {_short(exc)}") from None


def other_format_hint(suffix: str) -> str:
    """What to send instead of a Keras file in a format ModelPress does not read ("" for other suffixes)."""
    if suffix in (".h5", ".hdf5"):
        return ("; a legacy Keras H5 model is not accepted (its loader can deserialize Python code): save it as "
                "a .keras file (model.save('model.keras')) or a zipped SavedModel")
    if suffix == ".pb":
        return "; zip the whole SavedModel folder (saved_model.pb and variables/) and upload the .zip"
    return ""


# --- SavedModel zips --------------------------------------------------------------------------

def holds_savedmodel(path: Path) -> bool:
    """Whether a zip upload holds a saved_model.pb (and no .onnx); False for anything not a readable zip."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = [PurePosixPath(n).name.lower() for n in archive.namelist()]
    except (zipfile.BadZipFile, OSError):
        return False
    return SAVED_MODEL_PB in names and not any(n.endswith(".onnx") for n in names)


def inspect_savedmodel_zip(path: Path, *, workdir: Path, limits: Limits) -> dict[str, Any]:
    """Check a SavedModel zip (one folder with saved_model.pb and variables/) and describe its serving
    signature. saved_model.pb alone is unpacked under `workdir` and read by mmap."""
    archive = _open_zip(path, what="a zip archive")
    with archive:
        members = safe_members(archive, limits)
        folder = savedmodel_folder(members)
        graph = next(m for m in members if m.filename == _join(folder, SAVED_MODEL_PB))
        root = unpack_members(archive, [graph], workdir / "savedmodel", limits)
        variables = [m for m in members if m.filename.startswith(_join(folder, "variables/"))]
    described = describe_saved_model(root / graph.filename)
    return described | {
        "framework": "tensorflow-savedmodel",
        "folder": folder or None,
        "variables_bytes": sum(m.file_size for m in variables),
        "converts_to": "onnx",
    }


def savedmodel_folder(members: list[zipfile.ZipInfo]) -> str:
    """The folder inside the zip that holds saved_model.pb ('' for the top); exactly one is accepted."""
    folders = [str(PurePosixPath(m.filename).parent) for m in members
               if PurePosixPath(m.filename).name == SAVED_MODEL_PB]
    folders = ["" if f == "." else f for f in folders]
    if len(folders) != 1:
        raise InvalidModel(f"the zip holds {len(folders)} saved_model.pb files; upload one SavedModel per archive")
    folder = folders[0]
    names = {m.filename for m in members}
    if _join(folder, "variables/variables.index") not in names:
        raise InvalidModel(f"the SavedModel in the zip has no {_join(folder, 'variables/variables.index')}; zip "
                           "the whole folder tf.saved_model.save or model.export wrote")
    return folder


def describe_saved_model(pb: Path) -> dict[str, Any]:
    """Tags, serving signatures (inputs, outputs with dtype and shape) and op types of a saved_model.pb."""
    try:
        with pb.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
            wire = Wire(data, max_fields=20_000_000)
            metas = [_meta_graph(wire, s, e) for n, t, s, e, _ in wire.fields(0, len(data)) if n == 2 and t == LENGTH]
    except (WireError, UnicodeDecodeError, ValueError) as exc:
        raise InvalidModel(f"saved_model.pb is not a readable SavedModel ({_short(exc)})") from None
    serving = next((m for m in metas if SERVING_TAG in m["tags"]), None)
    if serving is None:
        tags = [m["tags"] for m in metas]
        raise InvalidModel(f"the SavedModel has no meta graph tagged {SERVING_TAG!r} (it has {tags}); save it with "
                           "tf.saved_model.save or model.export")
    if not any(not name.startswith("__") for name in serving["signatures"]):
        raise InvalidModel("the SavedModel has no serving signature to convert; save it with model.export(...) "
                           "or tf.saved_model.save(obj, dir, signatures=...)")
    python_ops = sorted(PYTHON_OPS & set(serving["ops"]))
    if python_ops:
        raise InvalidModel(f"the SavedModel calls back into Python ({', '.join(python_ops)}: tf.py_function or "
                           "tf.numpy_function); such a graph cannot run or convert outside the process that built it",
                           code="unsupported_op", unsupported_ops=[{"domain": "tensorflow", "op_type": op}
                                                                   for op in python_ops])
    # `__saved_model_init_op` is TensorFlow's own initializer entry, not a function to convert.
    names = sorted(name for name in serving["signatures"] if not name.startswith("__"))
    signature = "serving_default" if "serving_default" in names else names[0]
    return {
        "tags": serving["tags"],
        "signatures": names,
        "signature": signature,
        "inputs": serving["signatures"][signature]["inputs"],
        "outputs": serving["signatures"][signature]["outputs"],
        "nodes": sum(serving["ops"].values()),
        "op_histogram": dict(sorted(serving["ops"].items())),
    }


# saved_model.proto / meta_graph.proto / graph.proto / function.proto field numbers.
def _meta_graph(wire: Wire, start: int, end: int) -> dict[str, Any]:
    tags: list[str] = []
    signatures: dict[str, dict] = {}
    ops: Counter = Counter()
    for number, wtype, s, e, _ in wire.fields(start, end):
        if wtype != LENGTH:
            continue
        if number == 1:  # MetaInfoDef: tags = 4
            tags += [_text(wire, s2, e2) for n, t, s2, e2, _ in wire.fields(s, e) if n == 4 and t == LENGTH]
        elif number == 2:  # GraphDef: node = 1, library = 2
            for n, t, s2, e2, _ in wire.fields(s, e):
                if n == 1 and t == LENGTH:
                    ops[_node_op(wire, s2, e2)] += 1
                elif n == 2 and t == LENGTH:  # FunctionDefLibrary: function = 1 -> FunctionDef: node_def = 3
                    for n3, t3, s3, e3, _ in wire.fields(s2, e2):
                        if n3 == 1 and t3 == LENGTH:
                            for n4, t4, s4, e4, _ in wire.fields(s3, e3):
                                if n4 == 3 and t4 == LENGTH:
                                    ops[_node_op(wire, s4, e4)] += 1
        elif number == 5:  # map<string, SignatureDef>
            key, value = _map_entry(wire, s, e)
            if value is not None:
                signatures[key] = _signature(wire, *value)
    return {"tags": tags, "signatures": signatures, "ops": ops}


def _node_op(wire: Wire, start: int, end: int) -> str:
    return next((_text(wire, s, e) for n, t, s, e, _ in wire.fields(start, end) if n == 2 and t == LENGTH), "")


def _signature(wire: Wire, start: int, end: int) -> dict[str, list]:
    out: dict[str, list] = {"inputs": [], "outputs": []}
    for number, wtype, s, e, _ in wire.fields(start, end):
        if number in (1, 2) and wtype == LENGTH:  # inputs, outputs: map<string, TensorInfo>
            key, value = _map_entry(wire, s, e)
            if value is not None:
                out["inputs" if number == 1 else "outputs"].append({"name": key} | _tensor_info(wire, *value))
    return out


def _tensor_info(wire: Wire, start: int, end: int) -> dict[str, Any]:
    dtype: str | None = None
    shape: list[int | None] | None = None
    for number, wtype, s, e, value in wire.fields(start, end):
        if number == 2 and value is not None:
            dtype = TF_DTYPES.get(value, f"tf_dtype_{value}")
        elif number == 3 and wtype == LENGTH:  # TensorShapeProto: dim = 2 {size = 1}, unknown_rank = 3
            shape = []
            for n, t, s2, e2, v in wire.fields(s, e):
                if n == 2 and t == LENGTH:
                    size = next((v2 for n2, _t, _s, _e, v2 in wire.fields(s2, e2) if n2 == 1), 0)
                    shape.append(None if size >= 1 << 63 else size)  # -1 (unknown) is a 64-bit two's complement
                elif n == 3 and v:
                    shape = None
                    break
    return {"dtype": dtype, "shape": shape}


def _map_entry(wire: Wire, start: int, end: int) -> tuple[str, tuple[int, int] | None]:
    key, value = "", None
    for number, wtype, s, e, _ in wire.fields(start, end):
        if number == 1 and wtype == LENGTH:
            key = _text(wire, s, e)
        elif number == 2 and wtype == LENGTH:
            value = (s, e)
    return key, value


def _text(wire: Wire, start: int, end: int) -> str:
    return bytes(wire.data[start:end]).decode("utf-8")


def _join(folder: str, name: str) -> str:
    return f"{folder}/{name}" if folder else name

