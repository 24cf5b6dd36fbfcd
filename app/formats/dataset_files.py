"""Dataset files: the one safe loader, the dataset rules, and the check against a model's inputs.

A dataset is an `.npz` archive (loaded with `allow_pickle=False` after its zip
directory and every `.npy` header were checked) or a safetensors file (parsed
here, no extra dependency). Either way it is a set of named numeric arrays whose
first axis is the sample axis, plus an optional integer `labels` array.

The API validates uploads with `read_specs` (every check, in bounded memory: headers, and each member read
through to its checksum) and the workers load stored datasets with `load_arrays` (workers/datasets.py): the
same checks on the same files.
"""
from __future__ import annotations

import json
import math
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from app.errors import DatasetMismatch, InvalidDataset
from app.formats.input_shapes import shape_text
from app.formats.onnx_files import ARCHIVE_RATIO_FLOOR_BYTES, archive_bytes
from app.formats.pickles import starts_with_pickle

FORMATS = {".npz": "npz", ".safetensors": "safetensors"}
LABELS = "labels"
MAX_ARRAYS = 1024
# Validation reads array data in chunks of this size, so the API's memory does not grow with an upload.
STREAM_CHUNK = 1 << 20
MAX_NAME_CHARS = 256
MAX_NDIM = 32
# A few hundred bytes describe one array; this leaves room for MAX_ARRAYS of them.
MAX_SAFETENSORS_HEADER_BYTES = 1 << 20
MAX_NPY_HEADER_BYTES = 10_000
# Members this small may compress extremely well (all zeros) without being a bomb.
RATIO_FLOOR_BYTES = 1 << 20
MAX_COMPRESSION_RATIO = 200.0
# (Only .npz files are sniffed for pickles: a safetensors header length may begin with the same two bytes.)
# bool, signed and unsigned integers, floats: what ONNX models take as inputs.
NUMERIC_KINDS = "biuf"
SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
    # numpy has no bfloat16: BF16 is read as its 16 raw bits and widened, exactly, to float32.
    "BF16": np.dtype("<u2"),
}


def format_for(filename: str) -> str:
    """The dataset format ("npz" or "safetensors") a file name's extension says."""
    suffix = PurePosixPath(filename).suffix.lower()
    if suffix not in FORMATS:
        raise InvalidDataset(f"'{filename}' is neither a .npz nor a .safetensors file")
    return FORMATS[suffix]


def load_arrays(path: Path, fmt: str, *, max_unpacked_bytes: int) -> dict[str, np.ndarray]:
    """Load every array of a dataset file into memory; raise InvalidDataset on anything unsafe or broken.

    `max_unpacked_bytes` caps what an .npz may inflate to (the caller passes its setting of that name).
    BF16 safetensors arrays come back as float32.
    """
    if fmt == "npz":
        _refuse_pickle(path)
        return _load_npz(path, max_unpacked_bytes)
    if fmt == "safetensors":
        return _load_safetensors(path)
    raise InvalidDataset(f"unknown dataset format {fmt!r}")


@dataclass(frozen=True)
class ArraySpec:
    """What inspection needs of an array, without its data: its dtype and shape."""

    dtype: np.dtype
    shape: tuple[int, ...]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]


def read_specs(path: Path, fmt: str, *, max_unpacked_bytes: int) -> dict[str, ArraySpec]:
    """Check a dataset file as thoroughly as load_arrays does, with memory that does not grow with the file:
    every header is checked and every .npz member is read through to its checksum, a chunk at a time, but no
    array is kept. The API validates uploads with this; the workers load the arrays with load_arrays."""
    if fmt == "npz":
        _refuse_pickle(path)
        return _npz_specs(path, max_unpacked_bytes)
    if fmt == "safetensors":
        with path.open("rb") as fh:
            entries = _safetensors_entries(fh, path.stat().st_size)
        # BF16 arrays are loaded as float32, so that is what a model input must expect.
        return {name: ArraySpec(np.dtype(np.float32) if code == "BF16" else SAFETENSORS_DTYPES[code].newbyteorder("="),
                                shape) for name, (code, shape, _begin, _end) in entries.items()}
    raise InvalidDataset(f"unknown dataset format {fmt!r}")


def _refuse_pickle(path: Path) -> None:
    if starts_with_pickle(path):
        raise InvalidDataset(
            "not a readable .npz archive of arrays: the file is a Python pickle, and ModelPress never "
            "unpickles uploads, because unpickling runs code. Save the arrays with numpy.savez (numeric "
            "arrays, no Python objects) or as safetensors"
        )


def inspect_dataset(arrays: dict[str, np.ndarray] | dict[str, ArraySpec]) -> dict[str, Any]:
    """Check the dataset rules and describe the arrays: names, dtypes, shapes, sample count, labels."""
    if not arrays:
        raise InvalidDataset("the dataset holds no arrays")
    for name, array in arrays.items():
        if not 1 <= len(name) <= MAX_NAME_CHARS or "\x00" in name:
            raise InvalidDataset(f"array name {name[:40]!r} is invalid: use 1 to {MAX_NAME_CHARS} characters, no NUL")
        _check_dtype(name, array.dtype)
        if array.ndim < 1:
            raise InvalidDataset(f"array {name!r} is a scalar; every array needs a first (sample) axis")
    inputs = {name: array for name, array in arrays.items() if name != LABELS}
    if not inputs:
        raise InvalidDataset(f"the dataset holds only {LABELS!r}; it needs at least one input array")
    first_name, first = next(iter(inputs.items()))
    samples = len(first)
    for name, array in inputs.items():
        if len(array) != samples:
            raise InvalidDataset(
                f"arrays differ in their first (sample) axis: {first_name!r} has {samples} samples, "
                f"{name!r} has {len(array)}"
            )
    if samples < 1:
        raise InvalidDataset("the dataset holds no samples (the first axis of its arrays is empty)")
    labels = arrays.get(LABELS)
    if labels is not None:
        if labels.dtype.kind not in "iu":
            raise InvalidDataset(f"{LABELS!r} must hold integer class indices, not {labels.dtype.name}")
        if labels.ndim != 1:
            raise InvalidDataset(f"{LABELS!r} must have shape [{samples}], not {list(labels.shape)}")
        if len(labels) != samples:
            raise InvalidDataset(
                f"{LABELS!r} has {len(labels)} entries but the input arrays have {samples} samples"
            )
    return {
        "arrays": [{"name": n, "dtype": a.dtype.name, "shape": list(a.shape)} for n, a in arrays.items()],
        "samples": samples,
        "has_labels": labels is not None,
    }


def check_against_model(dataset_inspection: dict[str, Any], model_inspection: dict[str, Any], role: str) -> None:
    """Every model input needs an array of its name, dtype and fixed non-batch dims; raise DatasetMismatch if not.

    Axis 0 is the sample axis and matches any batch dim; a symbolic or unknown model dim matches
    anything. Arrays the model does not take (besides `labels`) are ignored.
    """
    arrays = {a["name"]: a for a in dataset_inspection["arrays"]}
    for model_input in model_inspection["inputs"]:
        name, dtype, shape = model_input["name"], model_input["dtype"], model_input["shape"]
        expected = f"{dtype} {shape_text(shape)}"
        detail = {"array": name, "expected": {"dtype": dtype, "shape": shape}}
        array = arrays.get(name)
        if array is None:
            held = ", ".join(repr(n) for n in arrays) or "none"
            raise DatasetMismatch(
                f"the {role} dataset has no array {name!r}; the model input {name!r} expects {expected} "
                f"(the dataset holds {held})",
                **detail,
            )
        if array["dtype"] != dtype:
            raise DatasetMismatch(
                f"{role} dataset array {name!r} is {array['dtype']}; the model input expects {expected}", **detail
            )
        if shape is None:
            continue
        got = array["shape"]
        fixed_differs = any(
            isinstance(want, int) and want != have for want, have in zip(shape[1:], got[1:])
        )
        if len(got) != len(shape) or fixed_differs:
            raise DatasetMismatch(
                f"{role} dataset array {name!r} has shape {shape_text(got)}; the model input expects {expected} "
                "(axis 0 is the sample axis)",
                **detail,
            )



def _check_dtype(name: str, dtype: np.dtype) -> None:
    if dtype.hasobject:
        raise InvalidDataset(f"array {name!r} holds Python objects (pickled data), which are refused")
    if dtype.kind not in NUMERIC_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise InvalidDataset(f"array {name!r} has dtype {dtype}; only bool, integer and float arrays are accepted")


# --- npz ------------------------------------------------------------------------------------

def _load_npz(path: Path, max_unpacked_bytes: int) -> dict[str, np.ndarray]:
    try:
        with zipfile.ZipFile(path) as archive:
            for info in _npz_members(archive, max_unpacked_bytes):
                with archive.open(info) as member:
                    _check_npy_header(info, member)
        with np.load(path, allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}
    except InvalidDataset:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, NotImplementedError, RuntimeError) as exc:
        # np.load raises ValueError for pickled members and truncated data; zipfile its own errors.
        raise InvalidDataset(f"not a readable .npz archive of arrays ({_short(exc)})") from None


def _npz_specs(path: Path, max_unpacked_bytes: int) -> dict[str, ArraySpec]:
    specs = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for info in _npz_members(archive, max_unpacked_bytes):
                with archive.open(info) as member:
                    dtype, shape = _check_npy_header(info, member)
                    while member.read(STREAM_CHUNK):  # to the end: zipfile checks the CRC there
                        pass
                specs[info.filename[: -len(".npy")]] = ArraySpec(dtype, tuple(shape))
    except InvalidDataset:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, NotImplementedError, RuntimeError) as exc:
        raise InvalidDataset(f"not a readable .npz archive of arrays ({_short(exc)})") from None
    return specs


def _npz_members(archive: zipfile.ZipFile, max_unpacked_bytes: int) -> list[zipfile.ZipInfo]:
    """Check the zip directory before anything is inflated: names, count, encryption, sizes, ratios."""
    infos = archive.infolist()
    if len(infos) > MAX_ARRAYS:
        raise InvalidDataset(f"the archive holds {len(infos)} members; at most {MAX_ARRAYS} arrays are accepted")
    seen: set[str] = set()
    total = 0
    for info in infos:
        name = info.filename
        rel = PurePosixPath(name)
        if not name.endswith(".npy"):
            raise InvalidDataset(f"archive member {name!r} is not an .npy array")
        if "\\" in name or "\x00" in name or rel.is_absolute() or ".." in rel.parts:
            raise InvalidDataset(f"archive member {name!r} has an absolute or parent-escaping path")
        if name in seen:
            raise InvalidDataset(f"archive member {name!r} appears twice")
        seen.add(name)
        if info.flag_bits & 0x1:
            raise InvalidDataset(f"archive member {name!r} is encrypted")
        total += info.file_size
        if total > max_unpacked_bytes:
            raise InvalidDataset(f"the archive unpacks to more than {max_unpacked_bytes} bytes")
        if info.file_size > RATIO_FLOOR_BYTES and info.file_size > MAX_COMPRESSION_RATIO * max(info.compress_size, 1):
            raise InvalidDataset(
                f"archive member {name!r} inflates {info.file_size // max(info.compress_size, 1)}x; "
                f"at most {MAX_COMPRESSION_RATIO:g}x is accepted"
            )
    archived = archive_bytes(archive, infos)
    if total > ARCHIVE_RATIO_FLOOR_BYTES and total > MAX_COMPRESSION_RATIO * max(archived, 1):
        raise InvalidDataset(f"the archive inflates {total // max(archived, 1)}x as a whole ({archived} bytes "
                             f"unpacking to {total}); at most {MAX_COMPRESSION_RATIO:g}x is accepted", code="zip_bomb")
    return infos


def _check_npy_header(info: zipfile.ZipInfo, member: Any) -> tuple[np.dtype, tuple[int, ...]]:
    """Refuse object dtypes, and headers whose shape disagrees with the member's declared size.

    np.load allocates an array from the header's shape before it reads the data, so the
    shape must be what the (capped) declared size holds.
    """
    name = info.filename[: -len(".npy")]
    version = np.lib.format.read_magic(member)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(member, max_header_size=MAX_NPY_HEADER_BYTES)
    elif version == (2, 0):
        shape, _, dtype = np.lib.format.read_array_header_2_0(member, max_header_size=MAX_NPY_HEADER_BYTES)
    else:
        raise InvalidDataset(f"array {name!r} uses .npy format version {version}; versions 1.0 and 2.0 are read")
    _check_dtype(name, dtype)
    if member.tell() + math.prod(shape) * dtype.itemsize != info.file_size:
        raise InvalidDataset(f"array {name!r}: its header's shape {list(shape)} does not match its stored size")
    return dtype.newbyteorder("="), shape


# --- safetensors ----------------------------------------------------------------------------

def _load_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Check the header and every entry (_safetensors_entries), then read the arrays."""
    with path.open("rb") as fh:
        entries = _safetensors_entries(fh, path.stat().st_size)
        data_start = fh.tell()
        arrays = {}
        for name, (dtype_code, shape, begin, end) in entries.items():
            fh.seek(data_start + begin)
            dtype = SAFETENSORS_DTYPES[dtype_code]
            # The offsets were checked against the file's size, so the whole span is there.
            flat = np.fromfile(fh, dtype=dtype, count=(end - begin) // dtype.itemsize)
            if dtype_code == "BF16":
                flat = (flat.astype(np.uint32) << 16).view(np.float32)
            # Native byte order, so the arrays compare and compute like any other numpy array.
            arrays[name] = flat.astype(flat.dtype.newbyteorder("="), copy=False).reshape(shape)
    return arrays


def _safetensors_entries(fh, file_size: int) -> dict[str, tuple[str, tuple[int, ...], int, int]]:
    """Parse the header (8-byte little-endian length + JSON) and check every entry; leaves `fh` at the data."""
    prefix = fh.read(8)
    if len(prefix) < 8:
        raise InvalidDataset("not a safetensors file: shorter than its 8-byte header length")
    header_len = int.from_bytes(prefix, "little")
    if header_len > MAX_SAFETENSORS_HEADER_BYTES:
        raise InvalidDataset(
            f"safetensors header of {header_len} bytes exceeds the {MAX_SAFETENSORS_HEADER_BYTES} byte cap"
        )
    if 8 + header_len > file_size:
        raise InvalidDataset(f"safetensors header of {header_len} bytes runs past the end of the file")
    try:
        header = json.loads(fh.read(header_len).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise InvalidDataset(f"safetensors header is not valid JSON ({_short(exc)})") from None
    if not isinstance(header, dict):
        raise InvalidDataset("safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    if len(header) > MAX_ARRAYS:
        raise InvalidDataset(f"the file holds {len(header)} arrays; at most {MAX_ARRAYS} are accepted")
    data_start = 8 + header_len
    entries = {name: _safetensors_entry(name, spec, file_size - data_start) for name, spec in header.items()}
    previous_end, previous_name = 0, None
    for name, (_, _, begin, end) in sorted(entries.items(), key=lambda item: item[1][2:]):
        if begin < previous_end:
            raise InvalidDataset(f"safetensors arrays {previous_name!r} and {name!r} overlap")
        previous_end, previous_name = end, name
    return entries


def _safetensors_entry(name: str, spec: Any, data_len: int) -> tuple[str, tuple[int, ...], int, int]:
    """Validate one header entry; return (dtype code, shape, begin, end) with offsets inside the data."""
    if not isinstance(spec, dict) or not {"dtype", "shape", "data_offsets"} <= spec.keys():
        raise InvalidDataset(f"safetensors entry {name!r} needs dtype, shape and data_offsets")
    dtype_code, shape, offsets = spec["dtype"], spec["shape"], spec["data_offsets"]
    if not isinstance(dtype_code, str) or dtype_code not in SAFETENSORS_DTYPES:
        known = ", ".join(SAFETENSORS_DTYPES)
        raise InvalidDataset(f"safetensors array {name!r} has unsupported dtype {dtype_code!r}; accepted: {known}")
    if (
        not isinstance(shape, list) or len(shape) > MAX_NDIM
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise InvalidDataset(f"safetensors array {name!r} has an invalid shape {str(shape)[:80]}")
    if (
        not isinstance(offsets, list) or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
    ):
        raise InvalidDataset(f"safetensors array {name!r} needs data_offsets [begin, end]")
    begin, end = offsets
    if not 0 <= begin <= end <= data_len:
        raise InvalidDataset(
            f"safetensors array {name!r} has data_offsets [{begin}, {end}] outside the {data_len} data bytes"
        )
    itemsize = SAFETENSORS_DTYPES[dtype_code].itemsize
    if end - begin != math.prod(shape) * itemsize:
        raise InvalidDataset(
            f"safetensors array {name!r} spans {end - begin} bytes but {dtype_code} {shape} needs "
            f"{math.prod(shape) * itemsize}"
        )
    return dtype_code, tuple(shape), begin, end


def _short(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
