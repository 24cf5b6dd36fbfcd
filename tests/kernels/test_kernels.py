"""The native kernels' package: references against independent computations (CPU), the ops' input checks, the
library's build and C ABI, and (marked gpu) every CUDA kernel against its reference."""
from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import kernels
from kernels import _native, reference

ROOT = Path(__file__).resolve().parents[2]
HEADER = ROOT / "kernels" / "csrc" / "modelpress_kernels.h"
IN_CI = os.environ.get("CI", "").lower() == "true"


def nvcc_path() -> str | None:
    found = shutil.which("nvcc")
    return found or (str(Path("/usr/local/cuda/bin/nvcc")) if Path("/usr/local/cuda/bin/nvcc").exists() else None)


# ---- quantize_blockwise: ONNX Runtime's RTN quantizer is the judge ----------------------------------------------

def ort_blockwise(weight: np.ndarray, bits: int, block: int, symmetric: bool):
    """What onnxruntime's MatMulNBitsQuantizer (DefaultWeightOnlyQuantizer.qbits_block_quant) computes."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    rows, cols = weight.shape
    blocks = -(-rows // block)
    per_byte = 8 // bits
    padded = np.pad(weight, ((0, blocks * block - rows), (0, 0)))
    packed = np.zeros((cols, blocks, block * bits // 8), np.uint8)
    zero_points = np.zeros((cols, -(-blocks // per_byte)), np.uint8)
    scales = np.zeros((cols, blocks), weight.dtype)
    quantize = quantize_matmul_4bits if bits == 4 else quantize_matmul_8bits
    quantize(packed, padded, scales, zero_points, block, cols, rows, symmetric)
    return packed, scales, zero_points


def weight_matrix(k: int, n: int, dtype=np.float32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, n)) * rng.uniform(0.05, 2.0, size=(1, n))
    w[:, 1] = 0.0  # an all-zero column: scale 0
    w[: k // 2, 2] = np.abs(w[: k // 2, 2])  # one-signed stretches: zero point at an end
    w[3 % k, 3] = 0.5 * w[:, 3].max()  # exact halves: roundf ties
    return w.astype(dtype)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("block", [32, 64, 128])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("k", [200, 67, 128])  # not a multiple of the block (even and odd K), and one that is
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_quantize_reference_is_bit_identical_to_onnxruntime_rtn(bits, block, symmetric, k, dtype):
    w = weight_matrix(k, 24, dtype, seed=k + block + bits)
    packed, scales, zero_points = reference.quantize_blockwise(torch.from_numpy(w), bits, block, symmetric)
    ort_packed, ort_scales, ort_zero_points = ort_blockwise(w, bits, block, symmetric)
    np.testing.assert_array_equal(packed.numpy(), ort_packed)
    np.testing.assert_array_equal(scales.numpy(), ort_scales)
    if not symmetric:  # ORT writes no zero points for symmetric blocks; ours are the implied 2^(bits-1)
        np.testing.assert_array_equal(zero_points.numpy(), ort_zero_points)
    else:
        assert (zero_points.numpy() == (0x88 if bits == 4 else 0x80)).all()


def test_quantize_bfloat16_matches_onnxruntime_on_its_float32_values():
    # ORT's quantizer converts a bf16 weight to float32, quantizes, and casts only the scales back.
    w = torch.from_numpy(weight_matrix(96, 16)).to(torch.bfloat16)
    packed, scales, zero_points = reference.quantize_blockwise(w, 4, 32, False)
    ort_packed, ort_scales, ort_zero_points = ort_blockwise(w.float().numpy(), 4, 32, False)
    np.testing.assert_array_equal(packed.numpy(), ort_packed)
    np.testing.assert_array_equal(zero_points.numpy(), ort_zero_points)
    assert torch.equal(scales, torch.from_numpy(ort_scales).to(torch.bfloat16))


def matmul_model(weight: np.ndarray):
    from onnx import TensorProto, helper, numpy_helper

    k, n = weight.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="matmul")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n])],
        [numpy_helper.from_array(weight, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def ort_quantized(model, bits: int, block: int, symmetric: bool, with_kernels: bool):
    from workers.quantize.int4_weight_only import _import_nbits_quantizer, _quantize_with_kernels

    nbits = _import_nbits_quantizer()
    config = nbits.DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=symmetric, bits=bits,
                                                op_types_to_quantize=("MatMul",))
    quantizer = nbits.MatMulNBitsQuantizer(model, bits=bits, block_size=block, is_symmetric=symmetric,
                                           algo_config=config)
    if with_kernels:  # what a CUDA worker does, with the reference standing in for the kernel
        assert _quantize_with_kernels(quantizer, nbits, "cpu")
    quantizer.process()
    return quantizer.model.model


def run_model(model, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.mark.parametrize(("bits", "block", "symmetric", "k"), [(4, 32, True, 200), (4, 64, False, 67),
                                                               (8, 128, False, 200), (4, 128, True, 131)])
def test_matmulnbits_model_from_our_codes_runs_like_onnxruntimes(bits, block, symmetric, k):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = weight_matrix(k, 20, seed=k)
    x = np.random.default_rng(1).standard_normal((3, k)).astype(np.float32)
    by_ort = ort_quantized(matmul_model(w), bits, block, symmetric, with_kernels=False)
    # The worker's path (ORT's graph rewrite, our blockwise quantization) writes the very same model.
    by_worker = ort_quantized(matmul_model(w), bits, block, symmetric, with_kernels=True)
    assert by_worker.SerializeToString() == by_ort.SerializeToString()

    # And a MatMulNBits node built by hand from the op's three outputs computes what ORT's model computes.
    packed, scales, zero_points = kernels.quantize_blockwise(torch.from_numpy(w), bits, block, symmetric)
    inputs = ["x", "B", "scales"] + ([] if symmetric else ["zero_points"])
    initializers = [numpy_helper.from_array(packed.numpy(), "B"), numpy_helper.from_array(scales.numpy(), "scales")]
    if not symmetric:
        initializers.append(numpy_helper.from_array(zero_points.numpy(), "zero_points"))
    graph = helper.make_graph(
        [helper.make_node("MatMulNBits", inputs, ["y"], domain="com.microsoft", K=k, N=w.shape[1], bits=bits,
                          block_size=block)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", w.shape[1]])], initializers)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    ours = helper.make_model(graph, opset_imports=opsets, ir_version=8)
    onnx.checker.check_model(ours)
    expected = run_model(by_ort, x)
    np.testing.assert_array_equal(run_model(ours, x), expected)
    # and it is a quantization of the float MatMul, not just the same bytes
    assert np.corrcoef(expected.ravel(), (x @ w).ravel())[0, 1] > (0.99 if bits == 4 else 0.9999)


# ---- magnitude_threshold and nm_mask ----------------------------------------------------------------------------

def kth_of_concatenation(tensors, k):
    return torch.cat([t.detach().float().abs().flatten() for t in tensors]).kthvalue(k).values


def threshold_inputs(kind: str) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    if kind == "random":
        return [torch.randn(64, 33, generator=generator), torch.randn(1000, generator=generator) * 1e-3,
                torch.randn(7, 5, generator=generator).half(), torch.randn(300, generator=generator).bfloat16()]
    if kind == "ties":  # few distinct magnitudes, many zeros and signed zeros
        values = torch.randint(-3, 4, (5000,), generator=generator).float() * 0.25
        values[::7] = -0.0
        return [values[:3000].reshape(60, 50), values[3000:], torch.zeros(17), torch.full((40,), 0.5).half()]
    return [torch.full((2000,), 0.125), torch.full((3,), -0.125)]  # "constant": every element ties


@pytest.mark.parametrize("kind", ["random", "ties", "constant"])
def test_magnitude_threshold_reference_is_kthvalue(kind):
    tensors = threshold_inputs(kind)
    total = sum(t.numel() for t in tensors)
    for k in sorted({1, 2, total // 3, total // 2, total - 1, total}):
        expected = kth_of_concatenation(tensors, k)
        assert kernels.magnitude_threshold(tensors, k).item() == expected.item(), k
        assert kernels.magnitude_threshold(tensors, k, largest=True).item() == \
            kth_of_concatenation(tensors, total - k + 1).item(), k


def test_magnitude_threshold_skips_empty_tensors():
    tensors = [torch.empty(0), torch.tensor([3.0, -1.0, 2.0]), torch.empty(0, 4)]
    assert kernels.magnitude_threshold(tensors, 2).item() == 2.0


def topk_mask(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    groups = weight.abs().float().reshape(-1, m)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, groups.topk(n, dim=1).indices, True)
    return keep.reshape(weight.shape)


def stable_mask(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the n largest, equal ones in index order: a stable descending sort."""
    groups = weight.abs().float().reshape(-1, m)
    order = torch.sort(groups, dim=1, descending=True, stable=True).indices
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, order[:, :n], True)
    return keep.reshape(weight.shape)


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (3, 4), (4, 8), (2, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_nm_mask_reference(n, m, dtype):
    generator = torch.Generator().manual_seed(n * 100 + m)
    weight = torch.randn(24, 64, generator=generator).to(dtype)
    distinct = weight.abs().float().reshape(-1, m)
    untied = (distinct.unsqueeze(1) != distinct.unsqueeze(2)).sum((1, 2)) == m * (m - 1)
    mask = kernels.nm_mask(weight, n, m)
    assert mask.dtype == torch.bool and mask.shape == weight.shape
    assert (mask.reshape(-1, m).sum(1) == n).all()
    assert torch.equal(mask.reshape(-1, m)[untied], topk_mask(weight, n, m).reshape(-1, m)[untied])
    ties = torch.randint(-2, 3, (32, 48), generator=generator).to(dtype)  # mostly ties
    assert torch.equal(kernels.nm_mask(ties, n, m), stable_mask(ties, n, m))


# ---- kd_loss ----------------------------------------------------------------------------------------------------

def eager_loss_and_grad(student: torch.Tensor, teacher: torch.Tensor, temperature: float):
    from workers.distill.losses import soft_loss

    s = student.detach().clone().requires_grad_()
    loss = soft_loss(s.float(), teacher.float(), "kl", temperature)
    loss.backward()
    return loss.detach(), s.grad


@pytest.mark.parametrize("shape", [(8, 10), (5, 37), (3, 1000), (2, 3, 301), (4, 32003)])
@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.5])
def test_kd_loss_value_and_gradient_match_autograd(shape, dtype, tolerance, temperature):
    generator = torch.Generator().manual_seed(sum(shape))
    student = (torch.randn(shape, generator=generator) * 3).to(dtype).requires_grad_()
    teacher = (torch.randn(shape, generator=generator) * 3).to(dtype)
    expected_loss, expected_grad = eager_loss_and_grad(student, teacher, temperature)
    loss = kernels.kd_loss(student, teacher, temperature)
    loss.backward()
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss.detach(), expected_loss, rtol=tolerance, atol=0)
    assert student.grad.dtype == dtype and student.grad.shape == student.shape
    # relative to the largest entry: single entries are differences of nearly equal probabilities
    scale = expected_grad.float().abs().max().item()
    torch.testing.assert_close(student.grad.float(), expected_grad.float(), rtol=tolerance, atol=tolerance * scale)


def test_kd_loss_backward_scales_with_the_outer_gradient_and_needs_no_grad_without_it():
    student = torch.randn(6, 50, requires_grad=True)
    teacher = torch.randn(6, 50)
    (0.25 * kernels.kd_loss(student, teacher, 2.0)).backward()
    _, expected = eager_loss_and_grad(student, teacher, 2.0)
    torch.testing.assert_close(student.grad, 0.25 * expected)
    with torch.no_grad():
        loss, grad = kernels.ops.kd_loss(student, teacher, 2.0, False)
    assert grad.numel() == 0 and loss.item() > 0
    with pytest.raises(ValueError, match="teacher"):
        kernels.kd_loss(student, teacher.requires_grad_(), 2.0)


# ---- kmeans_1d ----------------------------------------------------------------------------------------------------

def numpy_lloyd(values: np.ndarray, centroids: np.ndarray, iterations: int):
    """Plain Lloyd: nearest centroid by distance, mean of each cluster, until nothing moves."""
    c = np.sort(centroids.astype(np.float64))
    v = values.astype(np.float64)
    for _ in range(iterations):
        labels = np.abs(v[:, None] - c[None, :]).argmin(axis=1)
        moved = np.array([v[labels == j].mean() if (labels == j).any() else c[j] for j in range(len(c))])
        if np.allclose(moved, c, rtol=0, atol=1e-12):
            break
        c = np.sort(moved)
    labels = np.abs(v[:, None] - c[None, :]).argmin(axis=1)
    return c, labels, float(((v - c[labels]) ** 2).sum())


def separated_values(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = np.array([-3.0, -1.2, 0.1, 0.9, 2.5])
    values = np.concatenate([c + 0.05 * rng.standard_normal(800 + 100 * i) for i, c in enumerate(centres)])
    return rng.permutation(values).astype(np.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kmeans_reference_matches_numpy_lloyd(dtype):
    values = torch.from_numpy(separated_values()).to(dtype)
    start = torch.linspace(float(values.min()), float(values.max()), 5)
    centroids, labels, inertia = kernels.kmeans_1d(values, start, 50)
    np_centroids, np_labels, np_inertia = numpy_lloyd(values.float().numpy(), start.numpy(), 50)
    assert labels.dtype == torch.uint8 and labels.shape == values.shape
    np.testing.assert_array_equal(labels.numpy(), np_labels)
    np.testing.assert_allclose(centroids.numpy(), np_centroids, rtol=1e-6)
    assert inertia.item() == pytest.approx(np_inertia, rel=1e-4)


def test_kmeans_reference_agrees_with_the_cluster_method():
    from workers.cluster.kmeans import kmeans_1d as method_kmeans

    values = separated_values(1)
    expected = method_kmeans(values, 5, 30)  # numpy, float64, sorted values with prefix sums
    start = torch.linspace(float(values.min()), float(values.max()), 5)
    centroids, _, _ = kernels.kmeans_1d(torch.from_numpy(values), start, 30)
    np.testing.assert_allclose(np.unique(centroids.numpy()), expected, rtol=1e-6)


def test_kmeans_keeps_an_empty_cluster_and_takes_k_of_one():
    values = torch.tensor([0.0, 0.1, 0.2, 5.0, 5.1])
    centroids, labels, _ = kernels.kmeans_1d(values, torch.tensor([0.1, 2.5, 5.05]), 10)
    assert centroids.tolist() == pytest.approx([0.1, 2.5, 5.05])  # nothing lands on 2.5: it stays
    assert labels.tolist() == [0, 0, 0, 2, 2]
    centroids, labels, inertia = kernels.kmeans_1d(values, torch.tensor([0.0]), 5)
    assert centroids.item() == pytest.approx(values.mean().item()) and labels.sum().item() == 0


# ---- input checks (fake implementations) and opcheck -----------------------------------------------------------

def meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device="meta")


def test_fake_implementations_give_shapes():
    packed, scales, zero_points = torch.ops.modelpress.quantize_blockwise(meta(200, 24), 4, 64, False)
    assert (packed.shape, scales.shape, zero_points.shape) == ((24, 4, 32), (24, 4), (24, 2))
    packed, scales, zero_points = torch.ops.modelpress.quantize_blockwise(meta(67, 5, dtype=torch.float16), 8, 32, True)
    assert (packed.shape, scales.shape, scales.dtype, zero_points.shape) == ((5, 3, 32), (5, 3), torch.float16, (5, 3))
    assert torch.ops.modelpress.magnitude_threshold([meta(10), meta(3, 3)], 19, False).shape == ()
    assert torch.ops.modelpress.nm_mask(meta(8, 16), 2, 4).dtype == torch.bool
    loss, grad = torch.ops.modelpress.kd_loss(meta(4, 7), meta(4, 7), 2.0, True)
    assert loss.shape == () and grad.shape == (4, 7)
    centroids, labels, inertia = torch.ops.modelpress.kmeans_1d(meta(3, 50), meta(16), 10)
    assert centroids.shape == (16,) and labels.shape == (3, 50) and labels.dtype == torch.uint8


@pytest.mark.parametrize(("call", "message"), [
    (lambda: torch.ops.modelpress.quantize_blockwise(meta(64, 8, dtype=torch.int32), 4, 32, True), "float32, float16"),
    (lambda: torch.ops.modelpress.quantize_blockwise(meta(64), 4, 32, True), "2-D"),
    (lambda: torch.ops.modelpress.quantize_blockwise(meta(64, 8), 2, 32, True), "bits must be 4 or 8"),
    (lambda: torch.ops.modelpress.quantize_blockwise(meta(64, 8), 4, 16, True), "block_size must be 32, 64 or 128"),
    (lambda: torch.ops.modelpress.quantize_blockwise(meta(0, 8), 4, 32, True), "must not be empty"),
    (lambda: torch.ops.modelpress.magnitude_threshold([], 1, False), "at least one tensor"),
    (lambda: torch.ops.modelpress.magnitude_threshold([meta(10)], 11, False), r"k must be in \[1, 10\]"),
    (lambda: torch.ops.modelpress.magnitude_threshold([meta(10)], 0, False), r"k must be in \[1, 10\]"),
    (lambda: torch.ops.modelpress.magnitude_threshold([meta(0)], 1, False), "no element"),
    (lambda: torch.ops.modelpress.magnitude_threshold([meta(4), torch.zeros(3)], 1, False), "one device"),
    (lambda: torch.ops.modelpress.nm_mask(meta(8, 10), 2, 4), "divisible by m=4"),
    (lambda: torch.ops.modelpress.nm_mask(meta(8, 12), 2, 3), "m must be 4, 8 or 16"),
    (lambda: torch.ops.modelpress.nm_mask(meta(8, 12), 4, 4), r"n must be in \[1, 3\]"),
    (lambda: torch.ops.modelpress.kd_loss(meta(4, 7), meta(4, 8), 2.0, True), "one shape"),
    (lambda: torch.ops.modelpress.kd_loss(meta(4, 7), meta(4, 7, dtype=torch.float16), 2.0, True), "one dtype"),
    (lambda: torch.ops.modelpress.kd_loss(meta(4, 7), meta(4, 7), 0.0, True), "temperature"),
    (lambda: torch.ops.modelpress.kd_loss(meta(0, 7), meta(0, 7), 1.0, True), "at least one element"),
    (lambda: torch.ops.modelpress.kmeans_1d(meta(100), meta(257), 10), "1 to 256"),
    (lambda: torch.ops.modelpress.kmeans_1d(meta(100), meta(0), 10), "1 to 256"),
    (lambda: torch.ops.modelpress.kmeans_1d(meta(100), meta(4), -1), "iterations"),
    (lambda: torch.ops.modelpress.kmeans_1d(meta(0), meta(4), 3), "at least one element"),
])
def test_fake_implementations_check_inputs(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_eager_calls_check_inputs_too():
    with pytest.raises(ValueError, match="block_size"):
        kernels.quantize_blockwise(torch.randn(64, 8), 4, 48)
    with pytest.raises(ValueError, match="k must be"):
        kernels.magnitude_threshold([torch.randn(5)], 6)


@pytest.mark.parametrize(("op", "args"), [
    ("quantize_blockwise", (torch.randn(70, 5), 4, 32, False)),
    ("magnitude_threshold", ([torch.randn(70, 5), torch.randn(3).half()], 7, False)),
    ("nm_mask", (torch.randn(6, 8), 2, 4)),
    ("kd_loss", (torch.randn(6, 37, requires_grad=True), torch.randn(6, 37), 2.0, True)),
    ("kmeans_1d", (torch.randn(100), torch.tensor([-1.0, 0.0, 1.0]), 5)),
])
def test_opcheck(op, args):
    torch.library.opcheck(getattr(torch.ops.modelpress, op).default, args)


# ---- the library: loading, build, ABI -----------------------------------------------------------------------------

def test_import_without_the_library_uses_the_references(tmp_path):
    env = {**os.environ, _native.PATH_VARIABLE: str(tmp_path / "missing.so")}
    script = ("import json, torch, kernels; "
              "mask = kernels.nm_mask(torch.tensor([[1.0, -3.0, 2.0, 0.5]]), 2, 4); "
              "print(json.dumps({'backend': kernels.backend(), 'mask': mask.tolist()}))")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["backend"]["library"] is None
    assert "missing.so does not exist" in result["backend"]["reason"] and "make kernels" in result["backend"]["reason"]
    assert set(result["backend"]["ops"].values()) == {"reference"}
    assert result["mask"] == [[False, True, True, False]]


def test_load_says_why_a_file_is_not_the_library(tmp_path, monkeypatch):
    monkeypatch.setenv(_native.PATH_VARIABLE, str(tmp_path / "nothing.so"))
    assert _native.load() == (None, f"{tmp_path / 'nothing.so'} does not exist: build it with `make kernels` "
                                    "(needs nvcc)")
    junk = tmp_path / "junk.so"
    junk.write_bytes(b"not an ELF file")
    library, reason = _native.load(junk)
    assert library is None and "could not be loaded" in reason


def test_backend_reports_every_op():
    report = kernels.backend()
    assert set(report) == {"library", "reason", "cuda", "ops"}
    assert set(report["ops"]) == {"quantize_blockwise", "magnitude_threshold", "nm_mask", "kd_loss", "kmeans_1d"}
    if not torch.cuda.is_available():
        assert set(report["ops"].values()) == {"reference"} and report["reason"]


C_TYPES = {
    "int": ctypes.c_int, "int64_t": ctypes.c_int64, "float": ctypes.c_float, "const char*": ctypes.c_char_p,
    "void*": ctypes.c_void_p, "const void*": ctypes.c_void_p, "uint8_t*": ctypes.c_void_p, "float*": ctypes.c_void_p,
    "cudaStream_t": ctypes.c_void_p, "const void* const*": ctypes.POINTER(ctypes.c_void_p),
    "const int64_t*": ctypes.POINTER(ctypes.c_int64), "const int*": ctypes.POINTER(ctypes.c_int),
}


def header_prototypes() -> dict[str, tuple[object, list[object]]]:
    text = re.sub(r"/\*.*?\*/", "", HEADER.read_text(), flags=re.S)
    found = {}
    for restype, name, params in re.findall(r"^([\w ]+\*?)\s*(mp_\w+)\(([^)]*)\);", text, flags=re.M):
        argtypes = []
        for param in params.split(","):
            param = " ".join(param.split())
            if param in ("", "void"):
                continue
            ctype = re.sub(r"\s*\b\w+$", "", param)  # drop the parameter's name
            argtypes.append(C_TYPES[ctype])
        found[name] = (C_TYPES[restype.strip()], argtypes)
    return found


def test_ctypes_signatures_match_the_header():
    prototypes = header_prototypes()
    assert list(prototypes) == list(_native.SIGNATURES)
    for name, (restype, argtypes) in _native.SIGNATURES.items():
        assert prototypes[name] == (restype, argtypes), name


def test_library_builds_with_nvcc_and_exports_the_abi():
    nvcc = nvcc_path()
    if nvcc is None:
        if IN_CI:
            pytest.fail("CI must build the kernels: nvcc is not on PATH")
        pytest.skip("nvcc is not installed here: the library cannot be built (the ops use their references)")
    # Incremental: `make test` built it already, so this only checks that it is up to date with its sources.
    done = subprocess.run(["make", "-s", "kernels", f"NVCC={nvcc}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=1200)
    assert done.returncode == 0, done.stdout + done.stderr
    path = _native.DEFAULT_PATH
    assert path.is_file()
    nm = subprocess.run(["nm", "-D", "--defined-only", str(path)], capture_output=True, text=True, check=True)
    exported = {line.split()[-1] for line in nm.stdout.splitlines() if line.strip()}
    assert exported == set(_native.SIGNATURES), "the library must export the C ABI and nothing else"
    library, reason = _native.load(path)
    assert reason is None and library.mp_kernels_version() == _native.ABI_VERSION
    assert library.mp_kernels_error_string(1) == b"invalid argument"
    # Arguments are checked before CUDA is touched, so this works without a GPU too.
    assert library.mp_nm_mask(0, None, 0, 8, 2, 4, None, None) == 1


@pytest.mark.parametrize("op", ["quantize_blockwise", "magnitude_threshold", "nm_mask", "kd_loss", "kmeans_1d"])
def test_cuda_paths_pass_their_arguments_and_fall_back_where_cuda_cannot_run(op, monkeypatch):
    """Without a GPU, drive each op's CUDA implementation with CPU tensors: ctypes must accept every argument and
    the library's own checks must pass them, so the call gets as far as selecting the device, which fails (no
    driver or no device); the op then warns, uses its reference, and backend() says why."""
    from kernels import ops

    if _native.LIBRARY is None:
        pytest.skip(f"the library is not built: {_native.REASON}")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the gpu tests cover these paths")
    monkeypatch.setattr(ops, "_disabled_reason", None)
    monkeypatch.setattr(ops, "_stream", lambda device: None)
    cuda_impl = ops.OPS[op][1]
    args = {
        "quantize_blockwise": (torch.randn(100, 8), 4, 32, False),
        "magnitude_threshold": ([torch.randn(10), torch.randn(5).half()], 3, False),
        "nm_mask": (torch.randn(4, 8), 2, 4),
        "kd_loss": (torch.randn(3, 9), torch.randn(3, 9), 2.0, True),
        "kmeans_1d": (torch.randn(50), torch.tensor([-1.0, 1.0]), 3),
    }[op]
    got = cuda_impl(*args)
    expected = getattr(ops, op)(*args)  # the CPU op: the reference
    for ours, theirs in zip(got if isinstance(got, tuple) else (got,),
                            expected if isinstance(expected, tuple) else (expected,)):
        assert torch.equal(ours, theirs)
    assert "cannot run on this machine" in ops._disabled_reason
    assert kernels.backend()["reason"] == ops._disabled_reason


# ---- CUDA kernels against the references (pytest -m gpu, where a GPU is) ------------------------------------------

def needs_native_cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    report = kernels.backend()
    if set(report["ops"].values()) != {"cuda"}:
        pytest.skip(f"the native kernels are not in use: {report['reason']}")


CUDA_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("block", [32, 64, 128])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize(("k", "n"), [(200, 48), (67, 33), (129, 1), (1, 130), (4096, 4096)])
def test_cuda_quantize_blockwise_is_bit_identical(dtype, bits, block, symmetric, k, n):
    needs_native_cuda()
    weight = torch.from_numpy(weight_matrix(k, n, seed=k * n)).to(dtype)
    expected = reference.quantize_blockwise(weight, bits, block, symmetric)
    got = kernels.quantize_blockwise(weight.cuda(), bits, block, symmetric)
    for name, ours, theirs in zip(("packed", "scales", "zero_points"), got, expected):
        assert torch.equal(ours.cpu(), theirs), name


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["random", "ties", "constant"])
def test_cuda_magnitude_threshold_is_exact(kind):
    needs_native_cuda()
    tensors = [t.cuda() for t in threshold_inputs(kind)]
    total = sum(t.numel() for t in tensors)
    for k in sorted({1, 2, total // 3, total // 2, total - 1, total}):
        assert kernels.magnitude_threshold(tensors, k).item() == kth_of_concatenation(tensors, k).item(), k


@pytest.mark.gpu
@pytest.mark.parametrize("candidates", ["fit", "overflow"])
def test_cuda_magnitude_threshold_large(candidates):
    needs_native_cuda()
    generator = torch.Generator(device="cuda").manual_seed(0)
    if candidates == "fit":  # the last pass reads the compacted candidates
        tensors = [torch.randn(4096, 4096, device="cuda", generator=generator),
                   torch.randn(3000, 1111, device="cuda", generator=generator).bfloat16()]
    else:  # one top-12-bit bin holds most elements: the last pass re-reads the tensors
        tensors = [torch.full((2_000_000,), 0.3, device="cuda") + torch.rand(2_000_000, device="cuda",
                                                                             generator=generator) * 1e-6]
    total = sum(t.numel() for t in tensors)
    for fraction in (0.0, 0.5, 0.9, 1.0):
        k = max(1, int(fraction * total))
        assert kernels.magnitude_threshold(tensors, k).item() == kth_of_concatenation(tensors, k).item()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (4, 8), (8, 16)])
def test_cuda_nm_mask(dtype, n, m):
    needs_native_cuda()
    for weight in (torch.randn(257, 64 * m), torch.randint(-2, 3, (33, 16 * m)).float()):
        weight = weight.to(dtype)
        assert torch.equal(kernels.nm_mask(weight.cuda(), n, m).cpu(), reference.nm_mask(weight, n, m))
    unaligned = torch.randn(1 + 8 * m, dtype=torch.float32).to(dtype).cuda()[1:].reshape(8, m)  # no vector loads
    assert torch.equal(kernels.nm_mask(unaligned, n, m).cpu(), reference.nm_mask(unaligned.cpu(), n, m))


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(8, 10), (5, 37), (64, 1000), (3, 2, 129), (256, 32000), (16, 32003),
                                   (4, 152064)])
@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-5), (torch.float16, 1e-2),
                                                  (torch.bfloat16, 1e-2)])
def test_cuda_kd_loss(shape, dtype, tolerance):
    needs_native_cuda()
    student = (torch.randn(shape) * 3).to(dtype)
    teacher = (torch.randn(shape) * 3).to(dtype)
    expected_loss, expected_grad = reference.kd_loss(student, teacher, 2.0, True)
    cuda_student = student.cuda().requires_grad_()
    loss = kernels.kd_loss(cuda_student, teacher.cuda(), 2.0)
    loss.backward()
    torch.testing.assert_close(loss.detach().cpu(), expected_loss, rtol=tolerance, atol=0)
    scale = expected_grad.float().abs().max().item()
    torch.testing.assert_close(cuda_student.grad.float().cpu(), expected_grad.float(), rtol=tolerance,
                               atol=tolerance * scale)
    with torch.no_grad():
        loss_only, grad = kernels.ops.kd_loss(cuda_student, teacher.cuda(), 2.0, False)
    assert grad.numel() == 0 and loss_only.item() == loss.item()  # deterministic


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
def test_cuda_kmeans_1d(dtype):
    needs_native_cuda()
    values = torch.from_numpy(separated_values(2)).to(dtype)
    start = torch.linspace(float(values.min()), float(values.max()), 5)
    expected = reference.kmeans_1d(values, start, 50)
    centroids, labels, inertia = kernels.kmeans_1d(values.cuda(), start.cuda(), 50)
    assert torch.equal(labels.cpu(), expected[1])
    torch.testing.assert_close(centroids.cpu(), expected[0], rtol=1e-6, atol=0)
    assert inertia.item() == pytest.approx(expected[2].item(), rel=1e-4)
    big = torch.randn(3_000_000).to(dtype)
    start = torch.linspace(float(big.min()), float(big.max()), 256)
    expected = reference.kmeans_1d(big, start, 5)
    centroids, labels, inertia = kernels.kmeans_1d(big.cuda(), start.cuda(), 5)
    torch.testing.assert_close(centroids.cpu(), expected[0], rtol=1e-5, atol=1e-6)
    assert inertia.item() == pytest.approx(expected[2].item(), rel=1e-4)
    assert (labels.cpu() != expected[1]).float().mean().item() < 1e-4  # only values on a midpoint may differ


@pytest.mark.gpu
def test_cuda_workers_use_the_kernels_with_the_cpu_results():
    needs_native_cuda()
    from torch import nn

    from workers.distill.losses import soft_loss
    from workers.prune.algorithms.magnitude import magnitude_masks
    from workers.prune.algorithms.semi_structured import nm_masks

    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32))
    cpu_masks = magnitude_masks(model, 0.7)
    cuda_masks = magnitude_masks(model.cuda(), 0.7)
    assert all(torch.equal(cpu_masks[name], cuda_masks[name].cpu()) for name in cpu_masks)
    cuda_nm, _ = nm_masks(model, 2, 4)
    cpu_nm, _ = nm_masks(model.cpu(), 2, 4)
    assert all(torch.equal(cpu_nm[name], cuda_nm[name].cpu()) for name in cpu_nm)
    student, teacher = torch.randn(16, 100), torch.randn(16, 100)
    torch.testing.assert_close(soft_loss(student.cuda(), teacher.cuda(), "kl", 2.0).cpu(),
                               soft_loss(student, teacher, "kl", 2.0), rtol=1e-5, atol=0)
