"""cluster.kmeans: weight sharing, the second stage of Han et al.'s Deep Compression.

Each large weight matrix of a Conv/Gemm/MatMul is replaced by `clusters` shared values found
by 1-D k-means over its non-zero weights (linearly initialised between the smallest and the
largest weight, which the paper found best), with exact zeros kept as zeros so that a pruned
model stays pruned. In the ONNX file a clustered weight is a codebook (k floats) and one uint8
index per weight, expanded by Cast + Gather; ONNX Runtime folds those constants when it loads
the model, so it runs at the original's speed while the file is up to 4x smaller, and far smaller
again once packed with zstd (`pack: "zstd"`), since indices of a few shared values compress well.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.catalog.cluster.kmeans import ClusterParams
from app.errors import StepFailed
from workers.methods import implements
from workers.methods.base import StepContext, StepOutput

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

WEIGHTED_OPS = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1}  # op -> input index of its weight


def kmeans_1d(values: np.ndarray, k: int, iterations: int) -> np.ndarray:
    """Centroids (sorted) of 1-D k-means with linear initialisation; assignment by midpoints (O(n log k))."""
    import numpy as np

    low, high = float(values.min()), float(values.max())
    if low == high or k == 1:
        return np.array([low], dtype=np.float64)
    centroids = np.linspace(low, high, k)
    if _cuda_available():
        return _kmeans_1d_cuda(values, centroids, iterations)
    ordered = np.sort(values.astype(np.float64))
    prefix = np.concatenate([[0.0], np.cumsum(ordered)])
    for _ in range(iterations):
        edges = np.searchsorted(ordered, (centroids[1:] + centroids[:-1]) / 2)
        starts, stops = np.concatenate([[0], edges]), np.concatenate([edges, [len(ordered)]])
        counts = stops - starts
        sums = prefix[stops] - prefix[starts]
        updated = np.where(counts > 0, sums / np.maximum(counts, 1), centroids)
        if np.allclose(updated, centroids, rtol=0, atol=1e-12):
            break
        centroids = np.sort(updated)
    return np.unique(centroids)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _kmeans_1d_cuda(values: np.ndarray, centroids: np.ndarray, iterations: int) -> np.ndarray:
    """kmeans_1d on the GPU (kernels.kmeans_1d): the same Lloyd iterations on float32 centroids, each one
    streaming the values once instead of sorting them."""
    import numpy as np
    import torch

    import kernels

    device = torch.device("cuda")
    final, _labels, _inertia = kernels.kmeans_1d(
        torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).to(device),
        torch.from_numpy(centroids.astype(np.float32)).to(device), iterations)
    return np.unique(final.cpu().numpy().astype(np.float64))


def cluster(weight: np.ndarray, k: int, iterations: int) -> tuple[np.ndarray, np.ndarray]:
    """(codebook float32 [<= k], indices uint8 of weight's shape); exact zeros stay zero."""
    import numpy as np

    flat = weight.ravel()
    nonzero = flat != 0
    has_zeros = not nonzero.all()
    centroids = kmeans_1d(flat[nonzero], k - 1 if has_zeros else k, iterations) if nonzero.any() else np.zeros(0)
    codebook = np.concatenate([[0.0], centroids]) if has_zeros else centroids
    codebook = codebook.astype(np.float32)
    order = np.argsort(codebook)
    ordered = codebook[order]
    nearest = np.searchsorted((ordered[1:] + ordered[:-1]) / 2, flat)
    indices = order[nearest]
    if has_zeros:
        zero_index = int(np.flatnonzero(codebook == 0)[0])
        indices = np.where(nonzero, indices, zero_index)
    return codebook, indices.astype(np.uint8).reshape(weight.shape)


@implements("cluster.kmeans")
def run(input_path: Path, params: ClusterParams, out_dir: Path, ctx: StepContext) -> StepOutput:
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(input_path))
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    users: dict[str, list[Any]] = {}
    for node in graph.node:
        for position, name in enumerate(node.input):
            users.setdefault(name, []).append((node, position))
    targets = []
    for name, tensor in initializers.items():
        uses = users.get(name, [])
        if (uses and tensor.data_type == onnx.TensorProto.FLOAT
                and all(WEIGHTED_OPS.get(node.op_type) == position for node, position in uses)):
            targets.append(name)
    layers: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    expand_nodes = []
    for number, name in enumerate(targets, start=1):
        weight = numpy_helper.to_array(initializers[name])
        if weight.size < params.min_weights:
            skipped[name] = f"{weight.size} weights, fewer than min_weights ({params.min_weights})"
            continue
        ctx.report(0.05 + 0.7 * number / len(targets), f"clustering {name} ({weight.size:,} weights)")
        codebook, indices = cluster(weight, params.clusters, params.iterations)
        shared = codebook[indices.astype(np.int64)]
        error = float(np.sqrt(np.mean((shared - weight) ** 2)))
        layers[name] = {"weights": int(weight.size), "values": int(len(codebook)),
                        "zeros": int((weight == 0).sum()), "rms_error": error,
                        "rms_weight": float(np.sqrt(np.mean(weight.astype(np.float64) ** 2)))}
        graph.initializer.remove(initializers[name])
        graph.initializer.extend([numpy_helper.from_array(codebook, f"{name}__codebook"),
                                  numpy_helper.from_array(indices, f"{name}__indices")])
        expand_nodes += [
            helper.make_node("Cast", [f"{name}__indices"], [f"{name}__index64"], to=onnx.TensorProto.INT64,
                             name=f"{name}__cast"),
            helper.make_node("Gather", [f"{name}__codebook", f"{name}__index64"], [name], axis=0,
                             name=f"{name}__expand"),
        ]
    if not layers:
        raise StepFailed(
            "no weight could be clustered: it needs float32 weights of Conv, Gemm or MatMul nodes with at least "
            f"min_weights ({params.min_weights}) elements"
            + (f"; skipped: {', '.join(f'{n} ({r})' for n, r in list(skipped.items())[:3])}" if skipped else ""),
            code="nothing_to_cluster")
    # The expansions come first so that every consumer of a weight follows its producer.
    nodes = expand_nodes + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    dst = out_dir / "model.onnx"
    onnx.save(model, str(dst))
    onnx.checker.check_model(str(dst))
    ctx.report(0.85, "checking the clustered model against its input")
    check = _check(input_path, dst, ctx.input_shapes)
    if check["cosine"] < params.min_cosine:
        raise StepFailed(
            f"clustering to {params.clusters} values per layer moved the outputs too far: cosine {check['cosine']:.4f} "
            f"to the input model's, below min_cosine {params.min_cosine}; use more clusters", code="accuracy_budget")
    details: dict[str, Any] = {"clusters": params.clusters, "layers": layers, "skipped": skipped, "check": check,
                               "sizes": {"input_bytes": input_path.stat().st_size, "model_bytes": dst.stat().st_size}}
    packed = {}
    if params.pack == "zstd":
        ctx.report(0.9, "packing the model with zstd")
        packed_path = out_dir / "model.onnx.zst"
        details["sizes"] |= _pack(input_path, dst, packed_path)
        packed[".zst"] = packed_path
        details["warnings"] = [
            f"the zstd-packed model (model.onnx.zst, {details['sizes']['zstd_bytes']:,} bytes) is "
            f"{details['sizes']['input_bytes'] / details['sizes']['zstd_bytes']:.1f}x smaller than the model this "
            "step received; model.onnx is the same model unpacked (ONNX Runtime loads that one, at the input "
            "model's speed: the shared values are expanded when it loads)"]
    return StepOutput(model_path=dst, details=details, packed=packed)


def _check(original: Path, clustered: Path, shapes=None) -> dict[str, Any]:
    """Per-output cosine and max abs diff of the clustered model against its input, on generated inputs."""
    import numpy as np
    import onnx

    from workers.bridge.check import figures, run_onnx, sample_count, session
    from workers.onnx_tools.inputs import plan_inputs

    paths = {"baseline": original, "result": clustered}
    sessions = {role: session(path) for role, path in paths.items()}
    structures = {role: onnx.load(str(path), load_external_data=False) for role, path in paths.items()}
    plan = plan_inputs(sessions, structures, shapes=shapes)
    feeds = [plan.feeds(plan.fixed_batch or 2, np.random.default_rng(0))["baseline"]]
    names = [o.name for o in sessions["baseline"].get_outputs()]
    return figures(run_onnx(original, feeds, names), run_onnx(clustered, feeds, names), names,
                   inputs="generated", samples=sample_count(feeds))


def _pack(original: Path, clustered: Path, dst: Path) -> dict[str, int]:
    import zstandard

    from workers.prune.algorithms.magnitude import ZSTD_LEVEL, compressed_sizes

    dst.write_bytes(zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(clustered.read_bytes()))
    return {"zstd_bytes": dst.stat().st_size, "input_zstd_bytes": compressed_sizes(original)["zstd"]}
