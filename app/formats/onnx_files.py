"""Uploaded model files: validate them, inspect them, unpack them safely.

An upload is either one `.onnx` file or a `.zip` holding one `.onnx` plus the
external-data files it names. Nothing here executes anything from the upload:
ONNX is a protobuf read by the `onnx` package (no pickle), and a zip is unpacked
member by member with every path, link, size and ratio checked first. A parsed
model is then held to what the workers can load safely: bounded size and
subgraph nesting, external data inside its own folder, and only ops that ONNX
Runtime runs without a custom-op library.

This module is imported by the API process: it may use `onnx` but never
onnxruntime or torch.
"""
from __future__ import annotations

import os
import shutil
import stat
import zipfile
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from app.errors import InvalidModel, PayloadTooLarge, UnsafeArchive
from app.formats.limits import Limits
from app.formats.onnx_wire import graph_depth
from app.formats.pickles import PICKLE_SUFFIXES, starts_with_pickle

ZIP_MAGIC = b"PK\x03\x04"
COPY_CHUNK = 1 << 20
# Members a zip tool adds that are never part of a model.
IGNORED_PREFIXES = ("__MACOSX/",)
# A member this small may compress extremely well without being a bomb.
RATIO_FLOOR_BYTES = 1 << 20
# The whole archive's ratio is judged once it unpacks to more than this: many members of zeros, each under the
# per-member floor, add up (900 members of 1 MiB zeros: a 1 MB zip of 900 MiB).
ARCHIVE_RATIO_FLOOR_BYTES = 64 << 20
# Domains ONNX Runtime runs without a custom-op library: the ONNX ones and its built-in contrib ops.
STANDARD_DOMAINS = ("", "ai.onnx.ml")
RUNTIME_DOMAINS = ("com.microsoft",)
# A refusal lists this many unsupported ops at most; a hostile file may hold thousands.
MAX_LISTED_OPS = 50
# Fields the nesting scan of an unparsable file reads at most (about a second of Python), so that
# padding a file with millions of fields cannot make the refusal slow.
WIRE_SCAN_FIELDS = 1_000_000


# --- entry points -----------------------------------------------------------------------------

def validate_upload(path: Path, *, filename: str, workdir: Path, limits: Limits,
                    task: str | None = None) -> tuple[str, dict[str, Any]]:
    """Check a spooled upload; return its format ("onnx", "onnx-zip", or "hf-zip" for a transformers folder that
    the worker converts: app.formats.huggingface; `task` overrides the task its config implies) and its inspection.

    Raises InvalidModel, UnsafeArchive or PayloadTooLarge; leaves nothing behind but files
    under `workdir`, which the caller removes.
    """
    suffix = PurePosixPath(filename).suffix.lower()
    if suffix in PICKLE_SUFFIXES or starts_with_pickle(path):
        raise InvalidModel(_pickle_refusal(filename))
    # Keras models (converted to ONNX by a worker): a .keras file, or a zip holding a TF SavedModel folder.
    from app.formats import keras_files

    if suffix == keras_files.KERAS_SUFFIX:
        return keras_files.KERAS, keras_files.inspect_keras(path, limits=limits)
    if _looks_like_zip(path, filename) and keras_files.holds_savedmodel(path):
        return keras_files.SAVEDMODEL_ZIP, keras_files.inspect_savedmodel_zip(path, workdir=workdir, limits=limits)
    if _looks_like_zip(path, filename):
        hf = _hf_folder(path, limits, task=task)
        if hf is not None:
            return hf
        model_path = _extract_zip(path, workdir, limits, filename=filename)
        return "onnx-zip", _inspect(model_path, packed=True, limits=limits)
    if suffix != ".onnx":
        raise InvalidModel(f"'{filename}' is neither a .onnx file nor a .zip holding one"
                           + keras_files.other_format_hint(suffix))
    return "onnx", _inspect(path, packed=False, limits=limits)


def _inspect(path: Path, *, packed: bool, limits: Limits) -> dict[str, Any]:
    """Check and describe a model. One of `stream_above_bytes` or more is checked through a small copy beside it
    whose weights point into the file itself (app.formats.onnx_wire; beside it, an archive's own external data
    resolves too), so the API's memory does not grow with the model."""
    from app.formats.onnx_wire import ExternalDataInFile, WireError, externalize

    size = path.stat().st_size
    if size < limits.stream_above_bytes:
        return _check_and_inspect(path, packed=packed, limits=limits)
    _check_proto_size(size, limits)
    try:
        small = externalize(path, keep_external=packed, max_copy_bytes=limits.stream_copy_max_bytes,
                            max_fields=limits.stream_max_fields)
    except ExternalDataInFile:
        raise _external_in_single_file(["(named by its initializers)"]) from None
    except WireError as exc:
        raise InvalidModel(f"the model cannot be checked without reading all {size >> 20} MiB of it into memory "
                           f"({exc}); upload it as a .zip holding the .onnx with its weights as external data "
                           "(onnx.save_model(..., save_as_external_data=True))") from None
    except ValueError as exc:
        raise InvalidModel(f"the model is inconsistent: {exc}") from None
    return _check_and_inspect(small.model, packed=packed, limits=limits, streamed=small)


def materialize(blob_path: Path, fmt: str, dest_dir: Path, limits: Limits) -> Path:
    """Lay a stored model out in `dest_dir` as a loadable .onnx file (plus its data files)."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    if fmt == "onnx-zip":
        return _extract_zip(blob_path, dest_dir, limits, filename=blob_path.name)
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


def _hf_folder(path: Path, limits: Limits, *, task: str | None) -> tuple[str, dict[str, Any]] | None:
    """("hf-zip", inspection) for a zip holding a transformers folder (config.json, no .onnx); None otherwise.
    Read in place, member by member: nothing is unpacked."""
    from app.formats import huggingface

    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError):
        return None  # _extract_zip says what is wrong with it
    with archive:
        if not huggingface.looks_like_hf_folder(archive):
            return None
        members = safe_members(archive, limits)
        return huggingface.FORMAT, huggingface.inspect_folder(archive, members, task=task)


def unpack_hf_folder(path: Path, dest: Path, limits: Limits, *, task: str | None = None) -> tuple[Path, dict[str, Any]]:
    """Unpack a stored Hugging Face folder zip into `dest` after the upload's checks, run again here (the worker
    trusts nothing it did not check); return the folder holding config.json and its inspection."""
    from app.formats import huggingface

    with open_zip(path) as archive:
        members = safe_members(archive, limits)
        inspection = huggingface.inspect_folder(archive, members, task=task)
        root = unpack_members(archive, members, dest, limits)
        config = next(m.filename for m in members if PurePosixPath(m.filename).name == huggingface.CONFIG)
        return (root / config).parent, inspection


def _pickle_refusal(filename: str) -> str:
    return (
        f"'{filename}' is a PyTorch checkpoint or Python pickle; ModelPress never unpickles uploads, because "
        "unpickling runs code. Export the model to ONNX (torch.onnx.export) and upload the .onnx file, "
        "or a .zip holding it with its external data"
    )


def _check_and_inspect(path: Path, *, packed: bool, limits: Limits, streamed=None) -> dict[str, Any]:
    """`streamed`: the app.formats.onnx_wire.Externalized whose copy `path` is (its tensors point into the upload
    under `streamed.weights`; the rest of the model is the user's, checked as it stands)."""
    import onnx
    from google.protobuf.message import DecodeError

    size = path.stat().st_size
    if size == 0:
        raise InvalidModel("the model file is empty")
    _check_proto_size(size, limits)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, UnicodeDecodeError, OSError) as exc:
        # The parser gives up on deep nesting with the same error as on corrupt bytes: tell them apart.
        limit = limits.max_graph_depth
        if isinstance(exc, DecodeError) and graph_depth(path, stop_above=limit, max_fields=WIRE_SCAN_FIELDS) > limit:
            raise _too_deep(limits) from None
        raise InvalidModel(f"not an ONNX model: the file does not parse as an ONNX protobuf ({_short(exc)})") from None
    if not model.HasField("graph") or model.ir_version <= 0 or len(model.graph.node) == 0:
        raise InvalidModel("not an ONNX model: no graph, no nodes or no IR version in the file")
    if _graph_depth(model) > limits.max_graph_depth:
        raise _too_deep(limits)

    _check_external_locations(model)
    locations = _external_locations(model)
    ours = locations.pop(streamed.weights, []) if streamed is not None else []
    if len(ours) != (streamed.moved if streamed is not None else 0):
        # Only the initializers the copy moved may name its file: anything else is the upload naming it.
        raise UnsafeArchive(f"tensors of the model name the external data location {streamed.weights!r}")
    if locations and not packed:
        raise _external_in_single_file(sorted(locations))
    if locations or ours:
        _check_external_files(model, path.parent)
    _check_ops(model)

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
    # The user's own external data only: a streamed copy's references are this check's, not the model's.
    inspection["external_data"] = bool(locations)
    return inspection


def _external_in_single_file(names: list[str]) -> InvalidModel:
    return InvalidModel(
        f"the model keeps weights in external data files ({', '.join(names[:5])}); upload a .zip holding the .onnx "
        "and those files")


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
    """The graphs held by the attributes of a graph's (or a function's) nodes, one level down."""
    import onnx

    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield attr.g
            elif attr.type == onnx.AttributeProto.GRAPHS:
                yield from attr.graphs


def _all_graphs(graph) -> Iterator:
    """A graph and every subgraph under it; a loop, not recursion, whatever the nesting."""
    pending = [graph]
    while pending:
        current = pending.pop()
        yield current
        pending.extend(reversed(list(_subgraphs(current))))


def _top_bodies(model) -> Iterator:
    """Every node list ONNX Runtime or the onnx loader may read, before descending into subgraphs:
    the main graph, the model-local functions, and the training graphs."""
    yield model.graph
    yield from model.functions
    for info in model.training_info:
        yield info.initialization
        yield info.algorithm


def _graph_depth(model) -> int:
    """How deep subgraphs nest inside each other (0: no If/Loop/Scan body at all)."""
    deepest = 0
    pending = [(body, 0) for body in _top_bodies(model)]
    while pending:
        body, depth = pending.pop()
        deepest = max(deepest, depth)
        pending.extend((sub, depth + 1) for sub in _subgraphs(body))
    return deepest


def _too_deep(limits: Limits) -> InvalidModel:
    return InvalidModel(
        f"the model nests subgraphs (If/Loop/Scan bodies inside each other) more than {limits.max_graph_depth} "
        f"levels deep; at most {limits.max_graph_depth} are accepted",
        code="model_too_deep", max_graph_depth=limits.max_graph_depth,
    )


def _check_proto_size(size: int, limits: Limits) -> None:
    if size > limits.max_model_proto_bytes:
        raise PayloadTooLarge(
            f"the .onnx file is {size} bytes; one ONNX protobuf holds at most {limits.max_model_proto_bytes}. "
            "Save the weights as external data (onnx.save_model(..., save_as_external_data=True)) and upload "
            "a .zip holding the .onnx and its data files",
            code="model_too_large", limit_bytes=limits.max_model_proto_bytes,
        )


def _check_ops(model) -> None:
    """Every node must be an op ONNX Runtime runs out of the box, or a model-local function.

    ModelProto carries no kernels: an op of another domain needs a custom-op library, which
    ModelPress never loads. A standard op must exist in the opset the model imports.
    """
    import onnx

    local_functions = {(f.domain, f.name, f.overload) for f in model.functions}
    model_opsets = _opsets(model.opset_import)
    custom: set[tuple[str, str]] = set()
    undefined: set[tuple[str, str, int]] = set()
    defined: set[tuple[str, str, int]] = set()
    for body in _top_bodies(model):
        opsets = {**model_opsets, **_opsets(getattr(body, "opset_import", ()))}
        for graph in _all_graphs(body):
            for node in graph.node:
                domain = "" if node.domain == "ai.onnx" else node.domain
                if (node.domain, node.op_type, node.overload) in local_functions or domain in RUNTIME_DOMAINS:
                    continue
                if domain not in STANDARD_DOMAINS:
                    custom.add((domain, node.op_type))
                    continue
                version = opsets.get(domain)
                if version is None:
                    continue  # no opset import for the domain: the checker says so
                key = (domain or "ai.onnx", node.op_type, version)
                if key in defined:
                    continue
                try:
                    onnx.defs.get_schema(node.op_type, version, domain)
                    defined.add(key)
                except onnx.defs.SchemaError:
                    undefined.add(key)
    if custom:
        ops = sorted(custom)
        domains = ", ".join(sorted({domain for domain, _ in ops}))
        raise InvalidModel(
            f"the model uses ops of custom domains ({domains}): {_listing(f'{d}.{op}' for d, op in ops)}. "
            "ModelPress loads no custom-op libraries: a model may use the ONNX domains (ai.onnx, ai.onnx.ml) "
            "and ONNX Runtime's built-in com.microsoft ops; export it without custom ops",
            code="unsupported_op", unsupported_ops=[{"domain": d, "op_type": op} for d, op in ops[:MAX_LISTED_OPS]],
        )
    if undefined:
        missing = sorted(undefined)
        raise InvalidModel(
            "the model uses ops its ONNX opset does not define, which ONNX Runtime cannot run: "
            + _listing(f"{op} ({d} opset {v})" for d, op, v in missing),
            code="unsupported_op",
            unsupported_ops=[{"domain": d, "op_type": op, "opset": v} for d, op, v in missing[:MAX_LISTED_OPS]],
        )


def _listing(names: Iterable[str], shown: int = 10) -> str:
    listed = list(names)
    more = f" and {len(listed) - shown} more" if len(listed) > shown else ""
    return ", ".join(listed[:shown]) + more


def _opsets(opset_import) -> dict[str, int]:
    return {("" if o.domain == "ai.onnx" else o.domain): o.version for o in opset_import}


def _all_nodes(graph) -> Iterator:
    for g in _all_graphs(graph):
        yield from g.node


def _all_initializers(graph) -> Iterator:
    for g in _all_graphs(graph):
        yield from g.initializer


def _all_tensors(model) -> Iterator:
    """Every TensorProto in the model, wherever one may sit: any of them may name external data,
    and the onnx loader reads an attribute's tensor whatever type the attribute declares."""
    for body in _top_bodies(model):
        for g in _all_graphs(body):
            yield from getattr(g, "initializer", ())
            for sparse in getattr(g, "sparse_initializer", ()):
                yield from (sparse.values, sparse.indices)
            for node in g.node:
                for attr in node.attribute:
                    if attr.HasField("t"):
                        yield attr.t
                    yield from attr.tensors
                    sparse_tensors = [attr.sparse_tensor] if attr.HasField("sparse_tensor") else []
                    for sparse in [*sparse_tensors, *attr.sparse_tensors]:
                        yield from (sparse.values, sparse.indices)


def _external_tensors(model) -> Iterator:
    import onnx

    return (t for t in _all_tensors(model) if t.data_location == onnx.TensorProto.EXTERNAL)


def _external_locations(model) -> dict[str, list]:
    found: dict[str, list] = {}
    for tensor in _external_tensors(model):
        info = {e.key: e.value for e in tensor.external_data}
        found.setdefault(info.get("location", ""), []).append(info)
    return found


def _check_external_locations(model) -> None:
    """No external-data reference may point outside the model's folder, in a single file or an archive.

    Checked on the names alone, before any file is opened, so nothing outside is ever read.
    """
    for tensor in _external_tensors(model):
        locations = [e.value for e in tensor.external_data if e.key == "location"]
        if len(locations) != 1:
            # Readers disagree on which of several locations wins; one reading could escape.
            raise UnsafeArchive(
                f"tensor {tensor.name[:80]!r} names {len(locations)} external data locations; exactly one is needed"
            )
        location = locations[0]
        rel = PurePosixPath(location.replace("\\", "/"))
        # "*": ONNX Runtime reads `*/_ORT_MEM_ADDR_/*` as "the offset is a memory address".
        if (not rel.parts or "\x00" in location or "*" in location or rel.is_absolute() or ".." in rel.parts
                or ":" in rel.parts[0]):
            raise UnsafeArchive(f"external data location {location[:200]!r} points outside the upload")


def _check_external_files(model, model_dir: Path) -> None:
    """Every external-data reference must stay inside the model's folder and exist there."""
    root = model_dir.resolve()
    for location, entries in _external_locations(model).items():
        rel = PurePosixPath(location.replace("\\", "/"))
        target = (root / rel).resolve()
        if not target.is_relative_to(root):
            raise UnsafeArchive(f"external data location {location!r} points outside the upload")
        if not target.is_file():
            raise InvalidModel(f"the model names external data file {location!r}, which the upload does not hold")
        size = target.stat().st_size
        for info in entries:
            try:
                end = int(info.get("offset", 0)) + int(info.get("length", 0))
            except ValueError:
                raise InvalidModel(f"external data entry for {location!r} has a non-numeric offset or length") from None
            if end > size:
                raise InvalidModel(f"external data file {location!r} is shorter ({size} bytes) than the model expects")


# --- zip archives -----------------------------------------------------------------------------

def open_zip(path: Path) -> zipfile.ZipFile:
    """The upload as a zip archive, or InvalidModel saying why it is not one."""
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise InvalidModel(f"not a valid zip archive ({_short(exc)})") from None


def _extract_zip(path: Path, dest: Path, limits: Limits, *, filename: str) -> Path:
    """Unpack a zip upload into `dest` after checking every member; return the .onnx inside."""
    with open_zip(path) as archive:
        members = safe_members(archive, limits)
        models = [m for m in members if m.filename.lower().endswith(".onnx")]
        if not models and any(m.filename.lower().endswith(".pkl") for m in members):
            # torch.save writes a zip around `data.pkl`: a checkpoint, whatever the upload is named.
            raise InvalidModel(_pickle_refusal(filename))
        if not models:
            raise InvalidModel("the zip archive holds no .onnx file")
        if len(models) > 1:
            names = ", ".join(m.filename for m in models[:5])
            raise InvalidModel(f"the zip archive holds {len(models)} .onnx files ({names}); upload one model per archive")
        _check_proto_size(models[0].file_size, limits)
        return unpack_members(archive, members, dest, limits) / models[0].filename


def unpack_members(archive: zipfile.ZipFile, members: list[zipfile.ZipInfo], dest: Path, limits: Limits) -> Path:
    """Write members checked by `safe_members` under `dest`, counting what they inflate to; return `dest` resolved."""
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
    return root


def safe_members(archive: zipfile.ZipFile, limits: Limits) -> list[zipfile.ZipInfo]:
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
            raise UnsafeArchive(f"the archive unpacks to more than {limits.max_unpacked_bytes} bytes "
                                "(MODELPRESS_MAX_UNPACKED_BYTES)", code="archive_too_large")
        if info.file_size > RATIO_FLOOR_BYTES and info.file_size > limits.max_compression_ratio * max(info.compress_size, 1):
            raise UnsafeArchive(
                f"zip member {name!r} inflates {info.file_size // max(info.compress_size, 1)}x; "
                f"at most {limits.max_compression_ratio:g}x is accepted"
            )
        files.append(info)
    archived = archive_bytes(archive, infos)
    if total > ARCHIVE_RATIO_FLOOR_BYTES and total > limits.max_compression_ratio * max(archived, 1):
        raise UnsafeArchive(
            f"the archive inflates {total // max(archived, 1)}x as a whole ({archived} bytes unpacking to {total}); "
            f"at most {limits.max_compression_ratio:g}x is accepted", code="zip_bomb")
    return files


def archive_bytes(archive: zipfile.ZipFile, infos: list[zipfile.ZipInfo]) -> int:
    """The zip's size on disk (its members' compressed sizes when it is not a plain file)."""
    try:
        if archive.fp is not None:
            return os.fstat(archive.fp.fileno()).st_size
    except (AttributeError, OSError, ValueError):
        pass
    return sum(info.compress_size for info in infos)


def _short(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
