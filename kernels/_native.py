"""The native library (kernels/build/libmodelpress_kernels.so, built by `make kernels`), loaded through ctypes.

Loading only maps the file: it initialises no CUDA context (forked Celery workers stay safe), and a missing or
stale library is no error here: LIBRARY is then None and REASON says why, and every op uses its reference.
MODELPRESS_KERNELS_LIB points at another build of the library.
"""
from __future__ import annotations

import ctypes
import os
from ctypes import POINTER, c_char_p, c_float, c_int, c_int64, c_void_p
from pathlib import Path

LIBRARY_NAME = "libmodelpress_kernels.so"
DEFAULT_PATH = Path(__file__).resolve().parent / "build" / LIBRARY_NAME
PATH_VARIABLE = "MODELPRESS_KERNELS_LIB"
ABI_VERSION = 1  # MP_KERNELS_ABI_VERSION in csrc/modelpress_kernels.h

# (restype, argtypes) of every exported function, in the order of csrc/modelpress_kernels.h; checked against the
# header's prototypes by tests/kernels/test_kernels.py. cudaStream_t and device pointers travel as c_void_p.
SIGNATURES: dict[str, tuple[object, list[object]]] = {
    "mp_kernels_version": (c_int, []),
    "mp_kernels_error_string": (c_char_p, [c_int]),
    "mp_quantize_blockwise": (c_int, [c_int, c_void_p, c_int, c_int64, c_int64, c_int, c_int, c_int, c_void_p,
                                      c_void_p, c_void_p, c_void_p]),
    "mp_magnitude_threshold_workspace_bytes": (c_int64, [c_int64]),
    "mp_magnitude_threshold": (c_int, [c_int, POINTER(c_void_p), POINTER(c_int64), POINTER(c_int), c_int, c_int64,
                                       c_void_p, c_int64, c_void_p, c_void_p]),
    "mp_nm_mask": (c_int, [c_int, c_void_p, c_int, c_int64, c_int, c_int, c_void_p, c_void_p]),
    "mp_kd_loss": (c_int, [c_int, c_void_p, c_void_p, c_int, c_int64, c_int64, c_float, c_void_p, c_void_p, c_void_p,
                           c_void_p]),
    "mp_kmeans_1d_workspace_bytes": (c_int64, []),
    "mp_kmeans_1d": (c_int, [c_int, c_void_p, c_int, c_int64, c_void_p, c_int, c_int, c_void_p, c_int64, c_void_p,
                             c_void_p, c_void_p]),
}

# CUDA errors that mean "this library cannot run on this machine" (driver too old for the CUDA 13 runtime, no
# code for this GPU, no usable device) rather than "this call went wrong": the ops then go back to the references.
UNUSABLE_ERRORS = {
    3: "cudaErrorInitializationError",
    35: "cudaErrorInsufficientDriver",
    100: "cudaErrorNoDevice",
    209: "cudaErrorNoKernelImageForDevice",
    218: "cudaErrorInvalidPtx",
    222: "cudaErrorUnsupportedPtxVersion",
}


class NativeError(RuntimeError):
    def __init__(self, function: str, code: int, message: str) -> None:
        super().__init__(f"{function} failed: {message} (CUDA error {code})")
        self.function = function
        self.code = code


def library_path() -> Path:
    return Path(os.environ.get(PATH_VARIABLE) or DEFAULT_PATH)


def load(path: Path | None = None) -> tuple[ctypes.CDLL | None, str | None]:
    """(library, None), or (None, why it is not used)."""
    path = Path(path) if path is not None else library_path()
    if not path.is_file():
        return None, f"{path} does not exist: build it with `make kernels` (needs nvcc)"
    try:
        library = ctypes.CDLL(str(path))
    except OSError as exc:
        return None, f"{path} could not be loaded: {exc}"
    try:
        for name, (restype, argtypes) in SIGNATURES.items():
            function = getattr(library, name)
            function.restype = restype
            function.argtypes = argtypes
    except AttributeError as exc:
        return None, (f"{path} is not a ModelPress kernels library or is out of date ({exc}): rebuild with "
                      "`make kernels`")
    version = library.mp_kernels_version()
    if version != ABI_VERSION:
        return None, (f"{path} was built for ABI version {version}, this code needs {ABI_VERSION}: rebuild with "
                      "`make kernels`")
    return library, None


LIBRARY, REASON = load()
PATH: Path | None = library_path() if LIBRARY is not None else None


def call(name: str, *args: object) -> None:
    """Call an entry point of the loaded library; raise NativeError on a non-zero status."""
    if LIBRARY is None:  # pragma: no cover - callers check first
        raise RuntimeError(f"the native kernels are not loaded: {REASON}")
    code = getattr(LIBRARY, name)(*args)
    if code:
        message = LIBRARY.mp_kernels_error_string(code)
        raise NativeError(name, code, message.decode() if message else "unknown error")


def workspace_bytes(name: str, *args: object) -> int:
    return int(getattr(LIBRARY, name)(*args))
