"""Build a TensorRT engine from an ONNX model at f32, f16 or int8.

An engine is compiled for one GPU model and one TensorRT version (its kernels are chosen by timing them on that
GPU): it is not portable, so its file name and its metadata say both (`engine_name`, `EngineMeta`). int8 comes
two ways. A QDQ model (Quantize/DequantizeLinear from a quantize.* step) is explicitly quantized: TensorRT uses
its scales and no calibration runs. A float model is calibrated by TensorRT's entropy calibrator
(IInt8EntropyCalibrator2) on the job's calibration samples; where this TensorRT no longer has that calibrator
(it is deprecated since 10.1 in favour of explicit quantization), the model is first quantized to QDQ by ONNX
Runtime's static quantizer with its entropy calibration on the same samples, as NVIDIA's ModelOpt does, and built
from that. int8 engines also allow f16 for the layers that stay float, as `trtexec --int8 --fp16` does.

Device memory for calibration batches comes from torch (the GPU worker's torch is a CUDA build).
"""
from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from app.errors import JobFailed

PRECISIONS = ("f32", "f16", "int8")
ENGINE_SUFFIX = ".engine"
META_SUFFIX = ".json"
WORKSPACE_BYTES = 4 << 30
QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
# The dataset evaluation's batch (workers.measure.accuracy.DEFAULT_BATCH): a dynamic batch axis is built for it too.
EVAL_BATCH = 32


@dataclass(frozen=True)
class GpuInfo:
    """The GPU an engine is built on and bound to."""

    name: str
    compute_capability: tuple[int, int]
    memory_bytes: int | None = None

    @property
    def sm(self) -> str:
        return f"sm{self.compute_capability[0]}{self.compute_capability[1]}"


@dataclass
class EngineMeta:
    """What an engine is bound to and how it was built: written beside it as <engine>.json and into the report."""

    tensorrt: str
    gpu: str
    compute_capability: str
    precision: str
    int8_source: str | None = None          # "qdq" (the model's own scales) | "entropy_calibrator" | "ort_entropy_qdq"
    calibration: dict[str, Any] | None = None
    profile: dict[str, dict[str, list[int]]] | None = None
    builder_flags: list[str] = field(default_factory=list)
    build_s: float | None = None
    portable: bool = False
    note: str = ("a TensorRT engine runs only on the GPU model and TensorRT version named here; on any other, "
                 "build it again from the ONNX model")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def slug(text: str) -> str:
    """Lower-case letters, digits, dots and dashes: safe in an artifact name."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9.]+", "-", text.lower())).strip("-.") or "unknown"


def engine_name(*, tensorrt_version: str, gpu: GpuInfo, precision: str) -> str:
    """model_tensorrt-10.13.3.9_nvidia-h100-80gb-hbm3-sm90_f16.engine: the engine's version and GPU in its name,
    so a downloaded engine says where it runs."""
    check_precision(precision)
    return f"model_tensorrt-{slug(tensorrt_version)}_{slug(gpu.name)}-{gpu.sm}_{precision}{ENGINE_SUFFIX}"


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise JobFailed(f"the tensorrt target has no precision {precision!r}; it builds {', '.join(PRECISIONS)}",
                        code="invalid_params")
    return precision


def is_qdq(model_path: Path) -> bool:
    """Whether the ONNX model holds Quantize/DequantizeLinear nodes (explicit quantization)."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    return any(node.op_type in QDQ_OPS for node in model.graph.node)


def profile_shapes(shapes_at: Callable[[int], dict[str, list[int]]], batch_sizes: Sequence[int], *,
                   dynamic_batch: bool) -> dict[str, dict[str, list[int]]]:
    """The optimization profile (per input: min, opt, max) for the batch sizes the engine will be run at: the
    job's, the fidelity batch and the dataset evaluation's (EVAL_BATCH) where the batch axis is dynamic, the
    model's own shapes where it is not. opt is the smallest of the job's batch sizes (the latency objective's)."""
    wanted = sorted(set(batch_sizes)) or [1]
    if not dynamic_batch:
        fixed = shapes_at(wanted[0])
        return {name: {"min": s, "opt": s, "max": s} for name, s in fixed.items()}
    low, opt, high = shapes_at(1), shapes_at(wanted[0]), shapes_at(max(wanted[-1], EVAL_BATCH))
    return {name: {"min": low[name], "opt": opt[name], "max": high[name]} for name in opt}


def tensorrt_version() -> str:
    import tensorrt as trt

    return str(trt.__version__)


def require_tensorrt() -> None:
    """JobFailed no_worker_for_target where this process cannot build engines (no tensorrt module, or no CUDA
    device): a job reached a worker that should not have taken it."""
    try:
        import tensorrt  # noqa: F401
    except ImportError as exc:
        raise JobFailed(f"this worker has no TensorRT ({exc}): the tensorrt target needs the tensorrt package and "
                        "an NVIDIA GPU (GET /v1/targets lists the workers that serve it)",
                        code="no_worker_for_target") from exc
    current_gpu()


def current_gpu() -> GpuInfo:
    """The CUDA device 0 as torch sees it; JobFailed no_worker_for_target where there is none."""
    import torch

    if not torch.cuda.is_available():
        raise JobFailed("the tensorrt target needs a CUDA GPU, and this worker has none", code="no_worker_for_target")
    props = torch.cuda.get_device_properties(0)
    return GpuInfo(name=str(props.name), compute_capability=(int(props.major), int(props.minor)),
                   memory_bytes=int(props.total_memory))


class _Logger:
    """A TensorRT logger that keeps warnings and errors for the error message and the report."""

    def __init__(self, trt) -> None:
        self.messages: list[str] = []
        trt_logger = self

        class Logger(trt.ILogger):
            def __init__(self) -> None:
                trt.ILogger.__init__(self)

            def log(self, severity, msg) -> None:
                if severity <= trt.ILogger.Severity.WARNING:
                    trt_logger.messages.append(f"{severity.name}: {msg}"[:1000])

        self.logger = Logger()

    def tail(self, count: int = 6) -> str:
        return " | ".join(self.messages[-count:])


def _calibrator(trt, feeds: list[dict[str, np.ndarray]], input_names: list[str], cache: Path):
    """IInt8EntropyCalibrator2 over `feeds` (one calibration batch each), staged in device memory by torch."""
    import torch

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.index = 0
            self.feeds = feeds
            self.batch = int(next(iter(feeds[0].values())).shape[0]) if feeds and feeds[0] else 1
            self.staged: dict[str, Any] = {}

        def get_batch_size(self) -> int:
            return self.batch

        def get_batch(self, names, p_str=None):  # TensorRT calls it with the input names (and a legacy argument)
            if self.index >= len(feeds):
                return None
            feed = feeds[self.index]
            self.index += 1
            self.staged = {name: torch.from_numpy(np.ascontiguousarray(feed[name])).cuda() for name in input_names}
            return [int(self.staged[name].data_ptr()) for name in names]

        def read_calibration_cache(self):
            return cache.read_bytes() if cache.is_file() else None

        def write_calibration_cache(self, data) -> None:
            cache.write_bytes(bytes(data))

    return EntropyCalibrator()


def build_engine(model_path: Path, out_dir: Path, *, precision: str, profile: dict[str, dict[str, list[int]]],
                 calibration: Callable[[], tuple[list[dict[str, np.ndarray]], str, list[str]]] | None = None,
                 workspace_bytes: int = WORKSPACE_BYTES,
                 say: Callable[[float, str], None] | None = None) -> tuple[Path, EngineMeta]:
    """The engine for `model_path` at `precision` in out_dir (named by engine_name, its EngineMeta beside it).

    calibration() -> (feeds, described, notes): called for int8 on a float model only. Raises JobFailed:
    lowering_failed (TensorRT cannot parse or build the model), calibration_failed, no_worker_for_target."""
    check_precision(precision)
    require_tensorrt()
    import tensorrt as trt

    say = say or (lambda _f, _m: None)
    gpu = current_gpu()
    started = time.perf_counter()
    meta = EngineMeta(tensorrt=str(trt.__version__), gpu=gpu.name, compute_capability=gpu.sm.removeprefix("sm"),
                      precision=precision, profile=profile)
    out_dir.mkdir(parents=True, exist_ok=True)
    source = model_path
    calibrator = None
    if precision == "int8":
        if is_qdq(model_path):
            meta.int8_source = "qdq"
        elif calibration is None:
            raise JobFailed("int8 on the tensorrt target needs calibration inputs", code="calibration_failed")
        else:
            say(0.05, "building the calibration inputs")
            feeds, described, notes = calibration()
            meta.calibration = {"samples": sum(int(next(iter(f.values())).shape[0]) for f in feeds if f),
                                "source": described, "notes": notes}
            if hasattr(trt, "IInt8EntropyCalibrator2"):
                meta.int8_source = "entropy_calibrator"
                calibrator = _calibrator(trt, feeds, list(profile), out_dir / "calibration.cache")
            else:
                meta.int8_source = "ort_entropy_qdq"
                source = _ort_entropy_qdq(model_path, feeds, out_dir / "model_qdq.onnx")
    log = _Logger(trt)
    builder = trt.Builder(log.logger)
    major = int(str(trt.__version__).split(".")[0])
    flags = 0 if major >= 10 else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, log.logger)
    say(0.2, f"TensorRT {trt.__version__} parsing the model")
    if not parser.parse_from_file(str(source)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise JobFailed(f"TensorRT {trt.__version__} cannot parse the model: {errors[:1500] or log.tail()}",
                        code="lowering_failed")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    wanted = {"f32": [], "f16": ["FP16"], "int8": ["INT8", "FP16"]}[precision]
    for name in wanted:
        config.set_flag(getattr(trt.BuilderFlag, name))
    meta.builder_flags = wanted
    optimization = builder.create_optimization_profile()
    for name, dims in profile.items():
        optimization.set_shape(name, dims["min"], dims["opt"], dims["max"])
    config.add_optimization_profile(optimization)
    if calibrator is not None:
        config.int8_calibrator = calibrator
        # Calibration runs at the calibration batch's shapes: a profile of its own, min = opt = max.
        first = calibration_feed_shapes(calibrator)
        if first is not None and any(first[n] != dims["opt"] for n, dims in profile.items() if n in first):
            calibration_profile = builder.create_optimization_profile()
            for name, shape in first.items():
                calibration_profile.set_shape(name, shape, shape, shape)
            config.set_calibration_profile(calibration_profile)
    say(0.3, f"TensorRT building the {precision} engine (it times its kernels on this GPU)")
    try:
        serialized = builder.build_serialized_network(network, config)
    except Exception as exc:  # calibration errors surface here (a get_batch that raised)
        raise JobFailed(f"TensorRT could not build the engine: {type(exc).__name__}: {exc} {log.tail()}"[:2000],
                        code="calibration_failed" if calibrator is not None else "lowering_failed") from exc
    if serialized is None:
        raise JobFailed(f"TensorRT could not build the {precision} engine: {log.tail() or 'no message'}"[:2000],
                        code="lowering_failed")
    path = out_dir / engine_name(tensorrt_version=str(trt.__version__), gpu=gpu, precision=precision)
    path.write_bytes(bytes(serialized))
    meta.build_s = round(time.perf_counter() - started, 3)
    path.with_suffix(META_SUFFIX).write_text(json.dumps(meta.to_json(), indent=2) + "\n")
    say(0.95, f"engine built in {meta.build_s:.1f} s")
    return path, meta


def calibration_feed_shapes(calibrator) -> dict[str, list[int]] | None:
    """The shapes of the calibrator's first batch (what the calibration profile must be)."""
    feeds = getattr(calibrator, "feeds", None)
    return {name: list(a.shape) for name, a in feeds[0].items()} if feeds else None


def _ort_entropy_qdq(model_path: Path, feeds: list[dict[str, np.ndarray]], out: Path) -> Path:
    """The float model as QDQ (per-channel weights, entropy-calibrated activations) by ONNX Runtime's quantizer,
    for a TensorRT without implicit-quantization calibrators."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(feeds)

        def get_next(self):
            return next(self.items, None)

    try:
        quantize_static(str(model_path), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.Entropy,
                        # TensorRT takes int8 Q/DQ with zero points of 0 only
                        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
    except Exception as exc:
        raise JobFailed(f"ONNX Runtime could not quantize the model to QDQ for TensorRT: {type(exc).__name__}: "
                        f"{exc}"[:1500], code="calibration_failed") from exc
    return out


def read_meta(engine: Path) -> dict[str, Any]:
    path = Path(engine).with_suffix(META_SUFFIX)
    return json.loads(path.read_text()) if path.is_file() else {}
