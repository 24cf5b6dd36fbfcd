"""Uploaded model files: validate them, inspect them, unpack them safely.

An upload is either one `.onnx` file or a `.zip` holding one `.onnx` plus the
external-data files it names. Nothing here executes anything from the upload:
ONNX is a protobuf read by the `onnx` package (no pickle), and a zip is unpacked
member by member with every path, link, size and ratio checked first.

This module is imported by the API process: it may use `onnx` but never
onnxruntime or torch.
"""
from __future__ import annotations

import shutil
import stat
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

from app.errors import InvalidModel, UnsafeArchive

ZIP_MAGIC = b"PK\x03\x04"
COPY_CHUNK = 1 << 20
# Members a zip tool adds that are never part of a model.
IGNORED_PREFIXES = ("__MACOSX/",)
# A member this small may compress extremely well without being a bomb.
RATIO_FLOOR_BYTES = 1 << 20


@dataclass(frozen=True)
class Limits:
    max_unpacked_bytes: int = 8 << 30
    max_zip_members: int = 1000
    max_compression_ratio: float = 200.0


# --- entry points -----------------------------------------------------------------------------

def validate_upload(path: Path, *, filename: str, workdir: Path, limits: Limits) -> tuple[str, dict[str, Any]]:
    """Check a spooled upload; return its format ("onnx" or "onnx-zip") and its inspection.

    Raises InvalidModel or UnsafeArchive; leaves nothing behind but files under `workdir`,
    which the caller removes.
    """
    if _looks_like_zip(path, filename):
        model_path = _extract_zip(path, workdir, limits)
        return "onnx-zip", _check_and_inspect(model_path, packed=True)
    suffix = PurePosixPath(filename).suffix.lower()
    if suffix != ".onnx":
        raise InvalidModel(f"'{filename}' is neither a .onnx file nor a .zip holding one")
    return "onnx", _check_and_inspect(path, packed=False)


def materialize(blob_path: Path, fmt: str, dest_dir: Path, limits: Limits) -> Path:
    """Lay a stored model out in `dest_dir` as a loadable .onnx file (plus its data files)."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    if fmt == "onnx-zip":
        return _extract_zip(blob_path, dest_dir, limits)
    if fmt != "onnx":
        raise InvalidModel(f"unknown stored model format {fmt!r}")
    target = dest_dir / "model.onnx"
    shutil.copyfile(blob_path, target)
    return target


# --- single files -----------------------------------------------------------------------------

def _looks_like_zip(path: Path, filename: str) -> bool:
    if PurePosixPath(filename).suffix.lower() == ".zip":
        return True
    with path.open("rb") as f:
        return f.read(4) == ZIP_MAGIC


def _check_and_inspect(path: Path, *, packed: bool) -> dict[str, Any]:
    import onnx
    from google.protobuf.message import DecodeError

    if path.stat().st_size == 0:
        raise InvalidModel("the model file is empty")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, UnicodeDecodeError, OSError) as exc:
        raise InvalidModel(f"not an ONNX model: the file does not parse as an ONNX protobuf ({_short(exc)})") from None
    if not model.HasField("graph") or model.ir_version <= 0 or len(model.graph.node) == 0:
        raise InvalidModel("not an ONNX model: no graph, no nodes or no IR version in the file")

    locations = _external_locations(model)
    if locations and not packed:
        names = ", ".join(sorted(locations)[:5])
        raise InvalidModel(
            f"the model keeps weights in external data files ({names}); upload a .zip holding the .onnx and those files"
        )
    if locations:
        _check_external_files(model, path.parent)

    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:  # onnx raises ValidationError, but also ValueError/RuntimeError on odd files
        raise InvalidModel(f"the ONNX checker refused the model: {_short(exc)}") from None

    warnings: list[str] = []
    inferred = path.with_name(path.name + ".inferred")
    try:
        onnx.shape_inference.infer_shapes_path(str(path), str(inferred), strict_mode=True)
    except Exception as strict_exc:
        try:
            onnx.shape_inference.infer_shapes_path(str(path), str(inferred), strict_mode=False)
        except Exception as exc:
            raise InvalidModel(f"shape inference failed on the model: {_short(exc)}") from None
        warnings.append(f"strict shape inference failed, lenient inference passed: {_short(strict_exc)}")
    finally:
        inferred.unlink(missing_ok=True)

    inspection = _describe(model)
    inspection["warnings"] = warnings + inspection["warnings"]
    return inspection


def _describe(model) -> dict[str, Any]:
    import onnx

    graph = model.graph
    initializer_names = {t.name for t in graph.initializer}
    parameters = 0
    initializer_bytes = 0
    for tensor in _all_initializers(graph):
        count = _numel(tensor.dims)
        parameters += count
        initializer_bytes += _tensor_bytes(tensor, count)
    for node in _all_nodes(graph):
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for attr in node.attribute:
                if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR and _is_float(attr.t.data_type):
                    count = _numel(attr.t.dims)
                    parameters += count
                    initializer_bytes += _tensor_bytes(attr.t, count)

    warnings = []
    weights_as_inputs = [i.name for i in graph.input if i.name in initializer_names]
    if weights_as_inputs:
        warnings.append(
            f"{len(weights_as_inputs)} initializers are also listed as graph inputs (an old export style); "
            "they are treated as weights, not inputs"
        )
    producer = " ".join(p for p in (model.producer_name, model.producer_version) if p) or None
    return {
        "ir_version": model.ir_version,
        "producer": producer,
        "opsets": [
            {"domain": o.domain or "ai.onnx", "version": o.version} for o in model.opset_import
        ],
        "graph_name": graph.name or None,
        "inputs": [_value_info(v) for v in graph.input if v.name not in initializer_names],
        "outputs": [_value_info(v) for v in graph.output],
        "parameters": parameters,
        "initializer_bytes": initializer_bytes,
        "nodes": sum(1 for _ in _all_nodes(graph)),
        "op_histogram": dict(sorted(Counter(_op_name(n) for n in _all_nodes(graph)).items())),
        "external_data": bool(_external_locations(model)),
        "warnings": warnings,
    }


def _value_info(value) -> dict[str, Any]:
    kind = value.type.WhichOneof("value")
    if kind != "tensor_type":
        return {"name": value.name, "dtype": kind or "unknown", "shape": None}
    tensor = value.type.tensor_type
    shape = None
    if tensor.HasField("shape"):
        shape = []
        for dim in tensor.shape.dim:
            if dim.HasField("dim_value"):
                shape.append(dim.dim_value)
            elif dim.HasField("dim_param"):
                shape.append(dim.dim_param)
            else:
                shape.append(None)
    return {"name": value.name, "dtype": _dtype_name(tensor.elem_type), "shape": shape}


def _dtype_name(elem_type: int) -> str:
    import onnx

    try:
        return onnx.helper.tensor_dtype_to_np_dtype(elem_type).name
    except Exception:
        return onnx.TensorProto.DataType.Name(elem_type).lower()


def _is_float(elem_type: int) -> bool:
    import onnx

    return elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                         onnx.TensorProto.BFLOAT16)


def _numel(dims) -> int:
    count = 1
    for d in dims:
        count *= d
    return count


def _tensor_bytes(tensor, count: int) -> int:
    import onnx

    for entry in tensor.external_data:
        if entry.key == "length":
            return int(entry.value)
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except Exception:
        itemsize = 1
    return count * itemsize


def _op_name(node) -> str:
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"


def _subgraphs(graph) -> Iterator:
    import onnx

    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield attr.g
            elif attr.type == onnx.AttributeProto.GRAPHS:
                yield from attr.graphs


def _all_graphs(graph) -> Iterator:
    yield graph
    for sub in _subgraphs(graph):
        yield from _all_graphs(sub)


def _all_nodes(graph) -> Iterator:
    for g in _all_graphs(graph):
        yield from g.node


def _all_initializers(graph) -> Iterator:
    for g in _all_graphs(graph):
        yield from g.initializer


def _all_tensors(model) -> Iterator:
    import onnx

    for g in _all_graphs(model.graph):
        yield from g.initializer
        for node in g.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    yield attr.t
                elif attr.type == onnx.AttributeProto.TENSORS:
                    yield from attr.tensors


def _external_locations(model) -> dict[str, list]:
    import onnx

    found: dict[str, list] = {}
    for tensor in _all_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in tensor.external_data}
            found.setdefault(info.get("location", ""), []).append(info)
    return found


def _check_external_files(model, model_dir: Path) -> None:
    """Every external-data reference must stay inside the model's folder and exist there."""
    root = model_dir.resolve()
    for location, entries in _external_locations(model).items():
        rel = PurePosixPath(location.replace("\\", "/"))
        if not location or rel.is_absolute() or ".." in rel.parts:
            raise UnsafeArchive(f"external data location {location!r} points outside the archive")
        target = (root / rel).resolve()
        if not target.is_relative_to(root):
            raise UnsafeArchive(f"external data location {location!r} points outside the archive")
        if not target.is_file():
            raise InvalidModel(f"the model names external data file {location!r}, which the archive does not hold")
        size = target.stat().st_size
        for info in entries:
            try:
                end = int(info.get("offset", 0)) + int(info.get("length", 0))
            except ValueError:
                raise InvalidModel(f"external data entry for {location!r} has a non-numeric offset or length") from None
            if end > size:
                raise InvalidModel(f"external data file {location!r} is shorter ({size} bytes) than the model expects")


# --- zip archives -----------------------------------------------------------------------------

def _extract_zip(path: Path, dest: Path, limits: Limits) -> Path:
    """Unpack a zip upload into `dest` after checking every member; return the .onnx inside."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise InvalidModel(f"not a valid zip archive ({_short(exc)})") from None
    with archive:
        members = _safe_members(archive, limits)
        models = [m for m in members if m.filename.lower().endswith(".onnx")]
        if not models:
            raise InvalidModel("the zip archive holds no .onnx file")
        if len(models) > 1:
            names = ", ".join(m.filename for m in models[:5])
            raise InvalidModel(f"the zip archive holds {len(models)} .onnx files ({names}); upload one model per archive")
        dest.mkdir(parents=True, exist_ok=True)
        root = dest.resolve()
        written = 0
        for member in members:
            target = (root / member.filename).resolve()
            if not target.is_relative_to(root):
                raise UnsafeArchive(f"zip member {member.filename!r} would land outside the archive folder")
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                with archive.open(member) as src, target.open("wb") as out:
                    while chunk := src.read(COPY_CHUNK):
                        written += len(chunk)
                        if written > limits.max_unpacked_bytes:
                            raise UnsafeArchive(
                                f"the archive unpacks to more than {limits.max_unpacked_bytes} bytes"
                            )
                        out.write(chunk)
            except (zipfile.BadZipFile, EOFError, NotImplementedError, RuntimeError, ValueError) as exc:
                raise InvalidModel(f"zip member {member.filename!r} cannot be read ({_short(exc)})") from None
        return root / models[0].filename


def _safe_members(archive: zipfile.ZipFile, limits: Limits) -> list[zipfile.ZipInfo]:
    infos = archive.infolist()
    if len(infos) > limits.max_zip_members:
        raise UnsafeArchive(f"the archive holds {len(infos)} members; at most {limits.max_zip_members} are accepted")
    seen: set[str] = set()
    files: list[zipfile.ZipInfo] = []
    total = 0
    for info in infos:
        name = info.filename
        if name.startswith(IGNORED_PREFIXES):
            continue
        rel = PurePosixPath(name)
        if "\\" in name or name.startswith("/") or rel.is_absolute() or ".." in rel.parts or ":" in rel.parts[0]:
            raise UnsafeArchive(f"zip member {name!r} has an absolute or parent-escaping path")
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            raise UnsafeArchive(f"zip member {name!r} is a symbolic link")
        if info.is_dir():
            continue
        if stat.S_IFMT(mode) and not stat.S_ISREG(mode):
            raise UnsafeArchive(f"zip member {name!r} is not a regular file")
        if info.flag_bits & 0x1:
            raise InvalidModel(f"zip member {name!r} is encrypted")
        key = str(rel).casefold()
        if key in seen:
            raise UnsafeArchive(f"zip member {name!r} appears twice")
        seen.add(key)
        total += info.file_size
        if total > limits.max_unpacked_bytes:
            raise UnsafeArchive(f"the archive unpacks to more than {limits.max_unpacked_bytes} bytes")
        if info.file_size > RATIO_FLOOR_BYTES and info.file_size > limits.max_compression_ratio * max(info.compress_size, 1):
            raise UnsafeArchive(
                f"zip member {name!r} inflates {info.file_size // max(info.compress_size, 1)}x; "
                f"at most {limits.max_compression_ratio:g}x is accepted"
            )
        files.append(info)
    return files


def _short(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
