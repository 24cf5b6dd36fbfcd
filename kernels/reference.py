"""Pure-PyTorch references of the native kernels: what runs on the CPU, and what the CUDA kernels are tested against.

Each function computes exactly what its kernel in kernels/csrc computes (same rounding steps, same tie rules), on
any device. Inputs are assumed checked (kernels/ops.py checks them before calling).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

# float32 bit patterns are split into these digits, most significant first (mp_magnitude_threshold does the same).
RADIX_DIGITS = ((20, 12), (8, 12), (0, 8))  # (shift, width)


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    """C's roundf: halves go away from zero (torch.round goes to even). x - trunc(x) is exact in float32."""
    whole = torch.trunc(x)
    return whole + torch.where((x - whole).abs() >= 0.5, torch.sign(x), torch.zeros_like(x))


def quantize_blockwise(weight: torch.Tensor, bits: int, block_size: int, symmetric: bool,
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed uint8 [N, blocks, block_size*bits/8], scales [N, blocks] in weight's dtype, zero_points uint8).

    As ONNX Runtime's RTN (MlasQuantizeBlockwise) lays them out for MatMulNBits; see modelpress_kernels.h.
    """
    k, n = weight.shape
    blocks = -(-k // block_size)
    code_max, mid = (1 << bits) - 1, 1 << (bits - 1)
    # + 0.0 turns -0.0 into +0.0, so that which zero is "largest" cannot depend on the order of comparisons.
    values = weight.float().t() + 0.0  # [N, K]
    values = torch.nn.functional.pad(values, (0, blocks * block_size - k)).view(n, blocks, block_size)
    valid = (torch.arange(blocks * block_size, device=weight.device) < k).view(1, blocks, block_size)
    inf = torch.tensor(float("inf"), device=weight.device)
    lo = torch.where(valid, values, inf).amin(dim=-1)
    hi = torch.where(valid, values, -inf).amax(dim=-1)
    if symmetric:
        extreme = torch.where(hi.abs() > lo.abs(), hi, lo)
        scale_f = -extreme / float(mid)
        zero_point = torch.full_like(scale_f, float(mid))
    else:
        lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
        scale_f = (hi - lo) / float(code_max)
        zero_fp = torch.where(scale_f != 0, 0.0 - lo / scale_f, lo)
        zero_point = torch.where(zero_fp < 0, torch.zeros_like(zero_fp),
                                 torch.where(zero_fp > code_max, torch.full_like(zero_fp, float(code_max)),
                                             _round_half_away(zero_fp)))
    stored = scale_f.to(weight.dtype)
    # MLAS stores fp16 scales and quantizes with the stored value; ORT's Python quantizes bf16 weights in float32.
    scale = stored.float() if weight.dtype == torch.float16 else scale_f
    reciprocal = torch.where(scale != 0, torch.ones_like(scale).div(scale), torch.zeros_like(scale))
    codes = _round_half_away(values * reciprocal.unsqueeze(-1) + zero_point.unsqueeze(-1))
    codes = torch.where(valid, codes.clamp(0, code_max), torch.zeros_like(codes)).to(torch.uint8)
    zero_point = zero_point.to(torch.uint8)
    if bits == 4:
        if k % 2:
            # The padding nibble after an odd K: MLAS writes whatever high-nibble code it computed last in the
            # same 2-block stretch (row K-2), or 0 when there is none; copied so that the bytes are identical.
            start = (k - 1) // (2 * block_size) * (2 * block_size)
            if k - 2 >= start:
                codes = codes.clone()
                codes[:, (k - 1) // block_size, (k - 1) % block_size + 1] = codes[:, (k - 2) // block_size,
                                                                                  (k - 2) % block_size]
        packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
        if blocks % 2:
            zero_point = torch.cat([zero_point, torch.full_like(zero_point[:, :1], mid)], dim=1)
        zero_points = zero_point[:, 0::2] | (zero_point[:, 1::2] << 4)
    else:
        packed, zero_points = codes, zero_point
    return packed.contiguous(), stored.contiguous(), zero_points.contiguous()


def magnitude_threshold(tensors: Sequence[torch.Tensor], k: int) -> torch.Tensor:
    """The k-th smallest |w| (1-based) over all tensors, as a float32 scalar: torch.kthvalue of their
    concatenation, computed as the kernel does it (a radix select on float32 bit patterns, one histogram per
    digit, tensor by tensor) so that no concatenated copy is ever made."""
    device = tensors[0].device
    prefix, remaining = 0, int(k)
    for shift, width in RADIX_DIGITS:
        high = shift + width
        hist = torch.zeros(1 << width, dtype=torch.int64, device=device)
        for tensor in tensors:
            pattern = tensor.detach().reshape(-1).float().abs().view(torch.int32)
            if high < 32:
                pattern = pattern[(pattern >> high) == (prefix >> high)]
            hist += torch.bincount((pattern >> shift) & ((1 << width) - 1), minlength=1 << width)
        cumulative = hist.cumsum(0)
        digit = int(torch.searchsorted(cumulative, torch.tensor([remaining], device=device)).item())
        remaining -= int(cumulative[digit - 1]) if digit else 0
        prefix |= digit << shift
    return torch.tensor([prefix], dtype=torch.int32).view(torch.float32)[0].to(device)


def nm_mask(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Bool mask keeping the n largest |w| of every m consecutive elements; equal values: the lower index wins."""
    groups = weight.detach().float().abs().reshape(-1, m)
    # rank of i = how many elements beat it: larger ones, and equal ones at a lower index
    larger = groups.unsqueeze(1) > groups.unsqueeze(2)  # [g, i, j]: value j > value i
    lower = torch.ones(m, m, dtype=torch.bool, device=weight.device).tril(-1)  # j < i
    beaten_by_equal = (groups.unsqueeze(1) == groups.unsqueeze(2)) & lower
    rank = (larger | beaten_by_equal).sum(dim=2)
    return (rank < n).reshape(weight.shape)


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float, with_grad: bool,
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, grad): T^2 * KL(softmax(t/T) || softmax(s/T)) with batchmean over rows (workers.distill.losses),
    and its gradient wrt the student, (softmax(s/T) - softmax(t/T)) * T / rows in the student's dtype (an empty
    tensor when with_grad is false)."""
    vocab = student.shape[-1]
    s = student.detach().reshape(-1, vocab).float() / temperature
    t = teacher.detach().reshape(-1, vocab).float() / temperature
    rows = s.shape[0]
    log_s, log_t = torch.log_softmax(s, dim=-1), torch.log_softmax(t, dim=-1)
    loss = torch.nn.functional.kl_div(log_s, log_t, reduction="batchmean", log_target=True) * temperature ** 2
    if not with_grad:
        return loss, student.new_empty(0)
    grad = (log_s.exp() - log_t.exp()) * (temperature / rows)
    return loss, grad.to(student.dtype).reshape(student.shape)


def kmeans_1d(values: torch.Tensor, centroids: torch.Tensor, iterations: int,
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(centroids float32 [k] sorted, labels uint8 [n], inertia float32): Lloyd's 1-D k-means from `centroids`.

    Assignment by midpoints (a value on a midpoint goes to the lower centroid); a centroid moves by the mean
    residual of its values and keeps its place when it has none; the centroids are sorted after each update,
    and the loop stops once none moves (the moved ones are then not taken, as in cluster_kmeans.kmeans_1d).
    """
    v = values.detach().reshape(-1).float()
    c = centroids.detach().float().sort().values
    k = c.numel()
    for _ in range(iterations):
        labels = torch.searchsorted((c[1:] + c[:-1]) * 0.5, v)
        residual = torch.zeros(k, dtype=torch.float64, device=v.device).index_add_(
            0, labels, v.double() - c.double()[labels])
        counts = torch.bincount(labels, minlength=k)
        moved = (c.double() + residual / counts.clamp(min=1)).float()
        updated = torch.where(counts > 0, moved, c).sort().values
        if bool(((updated - c).abs() <= 1e-12).all()):
            break
        c = updated
    labels = torch.searchsorted((c[1:] + c[:-1]) * 0.5, v)
    inertia = ((v.double() - c.double()[labels]) ** 2).sum().float()
    return c, labels.to(torch.uint8), inertia
