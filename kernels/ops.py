"""The ops, declared once each as torch.library custom ops in the `modelpress` namespace.

Each op has: a check of its inputs (ValueError with a readable message) shared by every implementation; a fake
implementation that only checks and shapes (torch.compile, meta tensors); the pure-PyTorch reference
(kernels/reference.py) as the implementation for every device; and, when the native library is loaded, the
CUDA implementation that calls it through ctypes on torch's current stream. If the library turns out unusable
on this machine at the first call (a driver older than its CUDA runtime, a GPU it has no code for), the ops
warn once and use the references from then on.
"""
# No `from __future__ import annotations`: torch.library reads these annotations to build each op's schema.
import ctypes
import logging
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from kernels import _native, reference

logger = logging.getLogger(__name__)

NAMESPACE = "modelpress"
FLOAT_TYPES = (torch.float32, torch.float16, torch.bfloat16)
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
QUANT_BITS = (4, 8)
BLOCK_SIZES = (32, 64, 128)
NM_GROUPS = (4, 8, 16)
MAX_CLUSTERS = 256

# Set when the loaded library proved unusable here (see _native.UNUSABLE_ERRORS); the ops then use references.
_disabled_reason: str | None = None


def native_reason() -> str | None:
    """Why the CUDA implementations are not used, or None when they are (given CUDA tensors)."""
    return _disabled_reason or _native.REASON


def _run_native(op: str, native: Callable[[], object], fallback: Callable[[], object]) -> object:
    global _disabled_reason
    if _disabled_reason is None:
        try:
            return native()
        except _native.NativeError as exc:
            if exc.code not in _native.UNUSABLE_ERRORS:
                raise
            _disabled_reason = f"{_native.PATH} cannot run on this machine: {exc}"
            logger.warning("modelpress kernels: %s; using the PyTorch references", _disabled_reason)
    return fallback()


def _check_float(name: str, tensor: Tensor) -> None:
    if tensor.dtype not in FLOAT_TYPES:
        raise ValueError(f"{name} must be float32, float16 or bfloat16, got {tensor.dtype}")


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _index(device: torch.device) -> int:
    return device.index or 0


def _pointer(tensor: Tensor) -> int | None:
    return tensor.data_ptr() if tensor.numel() else None


# ---- quantize_blockwise ---------------------------------------------------------------------------------------

def _check_quantize(weight: Tensor, bits: int, block_size: int) -> None:
    _check_float("weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D matrix [K, N] (quantized along K), got shape {tuple(weight.shape)}")
    if weight.shape[0] < 1 or weight.shape[1] < 1:
        raise ValueError(f"weight must not be empty, got shape {tuple(weight.shape)}")
    if bits not in QUANT_BITS:
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"block_size must be 32, 64 or 128, got {block_size}")


def _quantize_shapes(weight: Tensor, bits: int, block_size: int):
    k, n = weight.shape
    blocks = (k + block_size - 1) // block_size
    return (n, blocks, block_size * bits // 8), (n, blocks), (n, (blocks * bits + 7) // 8)


@torch.library.custom_op(f"{NAMESPACE}::quantize_blockwise", mutates_args=())
def quantize_blockwise(weight: Tensor, bits: int, block_size: int, symmetric: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(packed, scales, zero_points) of a [K, N] weight in ONNX Runtime's MatMulNBits layout (its RTN codes)."""
    _check_quantize(weight, bits, block_size)
    return reference.quantize_blockwise(weight, bits, block_size, symmetric)


@quantize_blockwise.register_fake
def _(weight, bits, block_size, symmetric):
    _check_quantize(weight, bits, block_size)
    packed, scales, zero_points = _quantize_shapes(weight, bits, block_size)
    return (weight.new_empty(packed, dtype=torch.uint8), weight.new_empty(scales),
            weight.new_empty(zero_points, dtype=torch.uint8))


def _quantize_cuda(weight, bits, block_size, symmetric):
    _check_quantize(weight, bits, block_size)

    def native():
        source = weight.contiguous()
        shapes = _quantize_shapes(source, bits, block_size)
        packed = torch.empty(shapes[0], dtype=torch.uint8, device=source.device)
        scales = torch.empty(shapes[1], dtype=source.dtype, device=source.device)
        zero_points = torch.empty(shapes[2], dtype=torch.uint8, device=source.device)
        _native.call("mp_quantize_blockwise", _index(source.device), source.data_ptr(), DTYPE_CODES[source.dtype],
                     source.shape[0], source.shape[1], bits, block_size, int(symmetric), packed.data_ptr(),
                     scales.data_ptr(), zero_points.data_ptr(), _stream(source.device))
        return packed, scales, zero_points

    return _run_native("quantize_blockwise", native,
                       lambda: reference.quantize_blockwise(weight, bits, block_size, symmetric))


# ---- magnitude_threshold ----------------------------------------------------------------------------------------

def _check_threshold(tensors: Sequence[Tensor], k: int) -> int:
    if len(tensors) == 0:
        raise ValueError("magnitude_threshold needs at least one tensor")
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {', '.join(sorted(map(str, devices)))}")
    for index, tensor in enumerate(tensors):
        _check_float(f"tensors[{index}]", tensor)
    total = sum(t.numel() for t in tensors)
    if total < 1:
        raise ValueError("the tensors hold no element")
    if not 1 <= k <= total:
        raise ValueError(f"k must be in [1, {total}] (the number of elements), got {k}")
    return total


@torch.library.custom_op(f"{NAMESPACE}::magnitude_threshold", mutates_args=())
def magnitude_threshold(tensors: list[Tensor], k: int, largest: bool) -> Tensor:
    """The k-th smallest (or with `largest` the k-th largest) |w| over all tensors, a float32 scalar."""
    total = _check_threshold(tensors, k)
    return reference.magnitude_threshold(tensors, total - k + 1 if largest else k)


@magnitude_threshold.register_fake
def _(tensors, k, largest):
    _check_threshold(tensors, k)
    return tensors[0].new_empty((), dtype=torch.float32)


def _threshold_cuda(tensors, k, largest):
    total = _check_threshold(tensors, k)
    rank = total - k + 1 if largest else k

    def native():
        device = tensors[0].device
        sources = [t.detach().contiguous() for t in tensors]
        count = len(sources)
        pointers = (ctypes.c_void_p * count)(*[_pointer(t) for t in sources])
        numels = (ctypes.c_int64 * count)(*[t.numel() for t in sources])
        dtypes = (ctypes.c_int * count)(*[DTYPE_CODES[t.dtype] for t in sources])
        size = _native.workspace_bytes("mp_magnitude_threshold_workspace_bytes", total)
        workspace = torch.empty(size, dtype=torch.uint8, device=device)
        result = torch.empty((), dtype=torch.float32, device=device)
        _native.call("mp_magnitude_threshold", _index(device), pointers, numels, dtypes, count, rank,
                     workspace.data_ptr(), size, result.data_ptr(), _stream(device))
        return result

    return _run_native("magnitude_threshold", native, lambda: reference.magnitude_threshold(tensors, rank))


# ---- nm_mask ----------------------------------------------------------------------------------------------------

def _check_nm(weight: Tensor, n: int, m: int) -> None:
    _check_float("weight", weight)
    if m not in NM_GROUPS:
        raise ValueError(f"m must be 4, 8 or 16, got {m}")
    if not 0 < n < m:
        raise ValueError(f"n must be in [1, {m - 1}] to keep n of every {m}, got {n}")
    if weight.dim() < 1 or weight.numel() < 1:
        raise ValueError(f"weight must have at least one element, got shape {tuple(weight.shape)}")
    if weight.shape[-1] % m:
        raise ValueError(f"the last dimension ({weight.shape[-1]}) must be divisible by m={m}: groups run along it")


@torch.library.custom_op(f"{NAMESPACE}::nm_mask", mutates_args=())
def nm_mask(weight: Tensor, n: int, m: int) -> Tensor:
    """Bool mask keeping the n largest |w| of every m consecutive weights along the last dimension."""
    _check_nm(weight, n, m)
    return reference.nm_mask(weight, n, m)


@nm_mask.register_fake
def _(weight, n, m):
    _check_nm(weight, n, m)
    return torch.empty_like(weight, dtype=torch.bool)


def _nm_mask_cuda(weight, n, m):
    _check_nm(weight, n, m)

    def native():
        source = weight.detach().contiguous()
        mask = torch.empty(source.shape, dtype=torch.bool, device=source.device)
        _native.call("mp_nm_mask", _index(source.device), source.data_ptr(), DTYPE_CODES[source.dtype], source.numel(),
                     n, m, mask.data_ptr(), _stream(source.device))
        return mask

    return _run_native("nm_mask", native, lambda: reference.nm_mask(weight, n, m))


# ---- kd_loss ----------------------------------------------------------------------------------------------------

def _check_kd(student: Tensor, teacher: Tensor, temperature: float) -> None:
    _check_float("student", student)
    if teacher.dtype != student.dtype:
        raise ValueError(f"student and teacher logits must have one dtype, got {student.dtype} and {teacher.dtype}")
    if student.shape != teacher.shape:
        raise ValueError(f"student and teacher logits must have one shape, got {tuple(student.shape)} and "
                         f"{tuple(teacher.shape)}")
    if student.device != teacher.device:
        raise ValueError(f"student and teacher logits must be on one device, got {student.device} and {teacher.device}")
    if student.dim() < 1 or student.numel() < 1:
        raise ValueError(f"logits must be [..., classes] with at least one element, got shape {tuple(student.shape)}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive number, got {temperature}")


@torch.library.custom_op(f"{NAMESPACE}::kd_loss", mutates_args=())
def kd_loss(student: Tensor, teacher: Tensor, temperature: float, with_grad: bool) -> tuple[Tensor, Tensor]:
    """(loss, grad): T^2 * KL(softmax(t/T) || softmax(s/T)), batch mean over rows, and d loss / d student
    (empty unless with_grad)."""
    _check_kd(student, teacher, temperature)
    return reference.kd_loss(student, teacher, temperature, with_grad)


@kd_loss.register_fake
def _(student, teacher, temperature, with_grad):
    _check_kd(student, teacher, temperature)
    loss = student.new_empty((), dtype=torch.float32)
    return loss, (torch.empty_like(student) if with_grad else student.new_empty(0))


def _kd_loss_cuda(student, teacher, temperature, with_grad):
    _check_kd(student, teacher, temperature)

    def native():
        s, t = student.detach().contiguous(), teacher.detach().contiguous()
        vocab = s.shape[-1]
        rows = s.numel() // vocab
        grad = torch.empty_like(s) if with_grad else s.new_empty(0)
        row_loss = torch.empty(rows, dtype=torch.float32, device=s.device)
        loss = torch.empty((), dtype=torch.float32, device=s.device)
        _native.call("mp_kd_loss", _index(s.device), s.data_ptr(), t.data_ptr(), DTYPE_CODES[s.dtype], rows, vocab,
                     float(temperature), grad.data_ptr() if with_grad else None, row_loss.data_ptr(),
                     loss.data_ptr(), _stream(s.device))
        return loss, grad

    return _run_native("kd_loss", native, lambda: reference.kd_loss(student, teacher, temperature, with_grad))


def _kd_setup_context(ctx, inputs, output) -> None:
    ctx.with_grad = inputs[3]
    grad = output[1]
    ctx.mark_non_differentiable(grad)
    ctx.save_for_backward(grad)


def _kd_backward(ctx, grad_loss, _grad_of_grad):
    if not ctx.with_grad:
        raise RuntimeError("modelpress::kd_loss ran with with_grad=False, so it kept no gradient; call "
                           "kernels.kd_loss, which asks for one when the student requires grad")
    (grad,) = ctx.saved_tensors
    return grad * grad_loss, None, None, None


kd_loss.register_autograd(_kd_backward, setup_context=_kd_setup_context)


# ---- kmeans_1d --------------------------------------------------------------------------------------------------

def _check_kmeans(values: Tensor, centroids: Tensor, iterations: int) -> None:
    _check_float("values", values)
    _check_float("centroids", centroids)
    if values.numel() < 1:
        raise ValueError("values must hold at least one element")
    if centroids.dim() != 1 or not 1 <= centroids.shape[0] <= MAX_CLUSTERS:
        raise ValueError(f"centroids must be a 1-D tensor of 1 to {MAX_CLUSTERS} values, got shape "
                         f"{tuple(centroids.shape)}")
    if values.device != centroids.device:
        raise ValueError(f"values and centroids must be on one device, got {values.device} and {centroids.device}")
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")


@torch.library.custom_op(f"{NAMESPACE}::kmeans_1d", mutates_args=())
def kmeans_1d(values: Tensor, centroids: Tensor, iterations: int) -> tuple[Tensor, Tensor, Tensor]:
    """(centroids float32 [k] sorted, labels uint8 shaped like values, inertia float32) of Lloyd's 1-D k-means."""
    _check_kmeans(values, centroids, iterations)
    final, labels, inertia = reference.kmeans_1d(values, centroids, iterations)
    return final, labels.reshape(values.shape), inertia


@kmeans_1d.register_fake
def _(values, centroids, iterations):
    _check_kmeans(values, centroids, iterations)
    return (centroids.new_empty(centroids.shape, dtype=torch.float32), torch.empty_like(values, dtype=torch.uint8),
            values.new_empty((), dtype=torch.float32))


def _kmeans_cuda(values, centroids, iterations):
    _check_kmeans(values, centroids, iterations)

    def native():
        source = values.detach().contiguous()
        device = source.device
        final = centroids.detach().float().sort().values.contiguous()  # a fresh tensor the kernel updates in place
        size = _native.workspace_bytes("mp_kmeans_1d_workspace_bytes")
        workspace = torch.empty(size, dtype=torch.uint8, device=device)
        labels = torch.empty(source.shape, dtype=torch.uint8, device=device)
        inertia = torch.empty((), dtype=torch.float32, device=device)
        _native.call("mp_kmeans_1d", _index(device), source.data_ptr(), DTYPE_CODES[source.dtype], source.numel(),
                     final.data_ptr(), final.numel(), iterations, workspace.data_ptr(), size, labels.data_ptr(),
                     inertia.data_ptr(), _stream(device))
        return final, labels, inertia

    def fallback():
        final, labels, inertia = reference.kmeans_1d(values, centroids, iterations)
        return final, labels.reshape(values.shape), inertia

    return _run_native("kmeans_1d", native, fallback)


OPS = {
    "quantize_blockwise": (quantize_blockwise, _quantize_cuda),
    "magnitude_threshold": (magnitude_threshold, _threshold_cuda),
    "nm_mask": (nm_mask, _nm_mask_cuda),
    "kd_loss": (kd_loss, _kd_loss_cuda),
    "kmeans_1d": (kmeans_1d, _kmeans_cuda),
}

if _native.LIBRARY is not None:
    for _op, _cuda_impl in OPS.values():
        _op.register_kernel("cuda")(_cuda_impl)
