"""Benchmark: the native CUDA kernels against their PyTorch references on the same GPU and against the memory floor.

All four kernels are memory-bound, so the floor for each is the bytes it must move (read its inputs once, write
its outputs once) divided by the device's copy bandwidth, measured in this run with a device-to-device copy of
1 GiB (read + write). A row reports the kernel's median time, the reference's, the bytes, the achieved GB/s on
those bytes and that as a fraction of the measured bandwidth. Also: ONNX Runtime's own 4-bit quantizer on the
CPU for the same 4096x4096 matrix (the user's alternative), and the eager distillation loss's peak memory.

Goals (issue 7): every kernel >= 60% of the measured bandwidth at the large sizes; quantize_blockwise >= 100x
faster than ONNX Runtime's CPU quantizer at 4096x4096; kd_loss >= 2x faster and >= 4x less peak memory than
the eager loss at vocab 32000.

    .venv/bin/python bench/kernels.py [--no-write] [--repeats 20]

Needs a CUDA GPU and the built library (`make kernels`); without a GPU it says so and exits 0, writing nothing.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import kernels  # noqa: E402
from kernels import reference  # noqa: E402

GIB = 1 << 30


def time_ms(fn: Callable[[], Any], repeats: int, warmup: int = 3) -> float:
    """Median wall time of fn on the GPU, from CUDA events around each call."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


def copy_bandwidth(repeats: int) -> float:
    """GB/s of a device-to-device copy of 1 GiB, counting the read and the write."""
    source = torch.empty(GIB, dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    ms = time_ms(lambda: target.copy_(source), repeats)
    source = target = None  # frees the 2 GiB now (a `del` of names a closure reads is a NameError waiting)
    torch.cuda.empty_cache()
    return 2 * GIB / (ms / 1e3) / 1e9


def peak_extra_mb(fn: Callable[[], Any]) -> float:
    """Peak memory fn allocates beyond what was allocated before it, in MB."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 1e6


def row(name: str, size: str, ours_ms: float, reference_ms: float | None, nbytes: int, bandwidth: float,
        note: str = "") -> list[str]:
    achieved = nbytes / (ours_ms / 1e3) / 1e9
    return [name, size, f"{ours_ms:.3f}", f"{reference_ms:.3f}" if reference_ms else "n/a",
            f"{reference_ms / ours_ms:.1f}x" if reference_ms else "n/a", f"{nbytes / 1e6:.0f}",
            f"{achieved:.0f}", f"{achieved / bandwidth:.0%}", note]


def bench_quantize(bandwidth: float, repeats: int) -> list[list[str]]:
    rows = []
    for dtype, k, n in ((torch.float16, 8192, 8192), (torch.float32, 8192, 8192)):
        w = torch.randn(k, n, device="cuda").to(dtype)
        blocks = k // 32
        nbytes = w.numel() * w.element_size() + n * blocks * 16 + n * blocks * w.element_size() + n * blocks // 2
        ours = time_ms(lambda: kernels.quantize_blockwise(w, 4, 32, False), repeats)
        ref = time_ms(lambda: reference.quantize_blockwise(w, 4, 32, False), max(3, repeats // 4))
        rows.append(row("quantize_blockwise (4-bit, block 32, asym)", f"{k}x{n} {str(dtype)[6:]}", ours, ref, nbytes,
                        bandwidth))
    # the user's alternative: ONNX Runtime's C++ RTN quantizer on this machine's CPU, same 4096x4096 matrix
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits

    k = n = 4096
    w = torch.randn(k, n)
    w_np = w.numpy()
    packed = np.zeros((n, k // 32, 16), np.uint8)
    scales = np.zeros((n, k // 32), np.float32)
    zero_points = np.zeros((n, k // 64), np.uint8)
    cpu_times = []
    for _ in range(5):
        start = time.perf_counter()
        quantize_matmul_4bits(packed, w_np, scales, zero_points, 32, n, k, False)
        cpu_times.append((time.perf_counter() - start) * 1e3)
    cpu_ms = statistics.median(cpu_times)
    w_gpu = w.cuda()
    ours = time_ms(lambda: kernels.quantize_blockwise(w_gpu, 4, 32, False), repeats)
    identical = np.array_equal(kernels.quantize_blockwise(w_gpu, 4, 32, False)[0].cpu().numpy(), packed)
    nbytes = k * n * 4 + n * (k // 32) * (16 + 4) + n * (k // 64)
    rows.append(row("quantize_blockwise vs ONNX Runtime on the CPU", "4096x4096 float32", ours, cpu_ms, nbytes,
                    bandwidth, f"reference column = ORT quantize_matmul_4bits (CPU); codes identical: {identical}"))
    return rows


def bench_threshold(bandwidth: float, repeats: int) -> list[list[str]]:
    rows = []
    for dtype in (torch.float16, torch.float32):
        tensors = [torch.randn(8192, 1024, device="cuda").to(dtype) for _ in range(8)]  # 8192x8192 in 8 layers
        total = sum(t.numel() for t in tensors)
        k = total // 2
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        ours = time_ms(lambda: kernels.magnitude_threshold(tensors, k), repeats)
        ref = time_ms(lambda: reference.magnitude_threshold(tensors, k), max(3, repeats // 4))
        cat_kth = time_ms(lambda: torch.cat([t.abs().flatten().float() for t in tensors]).kthvalue(k), 3)
        rows.append(row("magnitude_threshold (k = half)", f"8 x 8192x1024 {str(dtype)[6:]}", ours, ref, nbytes,
                        bandwidth, f"floor = one read; 3 passes (2 full reads + candidates); cat+kthvalue "
                                   f"{cat_kth:.2f} ms"))
    return rows


def bench_nm(bandwidth: float, repeats: int) -> list[list[str]]:
    rows = []
    for dtype in (torch.float16, torch.float32):
        w = torch.randn(8192, 8192, device="cuda").to(dtype)
        nbytes = w.numel() * (w.element_size() + 1)
        ours = time_ms(lambda: kernels.nm_mask(w, 2, 4), repeats)
        ref = time_ms(lambda: reference.nm_mask(w, 2, 4), max(3, repeats // 4))
        rows.append(row("nm_mask 2:4", f"8192x8192 {str(dtype)[6:]}", ours, ref, nbytes, bandwidth))
    return rows


def bench_kd(bandwidth: float, repeats: int) -> list[list[str]]:
    rows = []
    rows_count, vocab = 8192, 32000
    for dtype in (torch.bfloat16, torch.float32):
        student = (torch.randn(rows_count, vocab, device="cuda") * 3).to(dtype).requires_grad_()
        teacher = (torch.randn(rows_count, vocab, device="cuda") * 3).to(dtype)

        def ours_step():
            student.grad = None
            kernels.kd_loss(student, teacher, 2.0).backward()

        def eager_step():
            # workers.distill.losses.soft_loss's "kl" formula, inlined: on CUDA soft_loss itself calls the kernel
            student.grad = None
            loss = torch.nn.functional.kl_div(
                torch.log_softmax(student.float() / 2.0, dim=-1), torch.log_softmax(teacher.float() / 2.0, dim=-1),
                reduction="batchmean", log_target=True) * 4.0
            loss.backward()

        nbytes = 3 * student.numel() * student.element_size()  # read s and t, write the gradient
        ours = time_ms(ours_step, repeats)
        eager = time_ms(eager_step, max(3, repeats // 4))
        student.grad = None
        ours_mb = peak_extra_mb(ours_step)
        student.grad = None
        eager_mb = peak_extra_mb(eager_step)
        student.grad = None
        rows.append(row("kd_loss forward + backward (T=2)", f"{rows_count}x{vocab} {str(dtype)[6:]}", ours, eager,
                        nbytes, bandwidth, f"peak extra memory {ours_mb:.0f} MB vs eager {eager_mb:.0f} MB "
                                           f"({eager_mb / max(ours_mb, 1e-9):.1f}x less)"))
        student = teacher = None  # frees them before the next dtype's pair is allocated
        torch.cuda.empty_cache()
    return rows


def bench_kmeans(bandwidth: float, repeats: int) -> list[list[str]]:
    rows = []
    iterations = 10
    values = torch.randn(8192 * 8192, device="cuda") * 0.02
    start = torch.linspace(float(values.min()), float(values.max()), 256, device="cuda")
    nbytes = values.numel() * 4 * (iterations + 1) + values.numel()  # one read per iteration, then labels
    ours = time_ms(lambda: kernels.kmeans_1d(values, start, iterations), max(3, repeats // 2))
    ref = time_ms(lambda: reference.kmeans_1d(values, start, iterations), 3)
    rows.append(row(f"kmeans_1d (k 256, {iterations} iterations + labels)", "8192x8192 float32", ours, ref, nbytes,
                    bandwidth, "k=256 on Gaussian weights does not converge in 10 iterations"))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-write", action="store_true", help="print only; do not append to bench/RESULTS.md")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench/kernels.py needs a CUDA GPU and this machine has none; nothing measured, nothing written.")
        return 0
    backend = kernels.backend()
    if set(backend["ops"].values()) != {"cuda"}:
        print(f"the native kernels are not in use ({backend['reason']}); build them with `make kernels`")
        return 2
    started = time.time()
    gpu = torch.cuda.get_device_name()
    bandwidth = copy_bandwidth(args.repeats)
    print(f"{gpu}: device-to-device copy {bandwidth:.0f} GB/s")
    rows = []
    rows += bench_quantize(bandwidth, args.repeats)
    rows += bench_threshold(bandwidth, args.repeats)
    rows += bench_nm(bandwidth, args.repeats)
    rows += bench_kd(bandwidth, args.repeats)
    rows += bench_kmeans(bandwidth, args.repeats)
    header = ["kernel", "size", "ours (ms)", "reference (ms)", "speedup", "MB moved", "GB/s", "of copy BW", "note"]
    table = "\n".join(["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
                      + ["| " + " | ".join(r) + " |" for r in rows])
    from bench.results import publish

    how = (f"GPU: {gpu}, torch {torch.__version__}, CUDA runtime of the library: 13.0; measured device-to-device "
           f"copy bandwidth {bandwidth:.0f} GB/s (1 GiB, read + write). Times are medians of CUDA-event-timed calls "
           f"({args.repeats} for ours); 'reference' is kernels/reference.py on the same GPU unless the note says "
           "otherwise; MB moved = the bytes the op must read and write once; GB/s = MB moved / our time.")
    publish(f"Native kernels on {gpu}", how, table, started=started, write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
