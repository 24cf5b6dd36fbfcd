"""The GPU targets (ONNX Runtime's CUDA provider, TensorRT engines): what a worker serves and why not, the engine's
name and profile, the lowering's refusals, the search's GPU candidates and `make gpu-check`. The parts that need a
GPU, TensorRT or onnxruntime-gpu skip with the reason; they run in `make gpu-check` on a GPU machine."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from app.errors import JobFailed

ROOT = Path(__file__).resolve().parents[2]


def fake_probe(*, cuda_provider: bool = False, gpu: bool = False, tensorrt: bool = False) -> dict:
    runtimes: dict = {"onnxruntime": {"version": "1.32.0", "providers": ["CPUExecutionProvider"]
                                      + (["CUDAExecutionProvider"] if cuda_provider else [])}}
    unavailable = {}
    if tensorrt:
        runtimes["tensorrt"] = {"version": "10.13.3.9", "cuda_device": "NVIDIA H100 80GB HBM3",
                                "compute_capability": "9.0"}
    else:
        unavailable["tensorrt"] = "ModuleNotFoundError: No module named 'tensorrt'"
    return {"host": "h", "cpu": {"name": "CPU", "logical_cores": 2, "isa": []}, "memory_bytes": 1, "runtimes": runtimes,
            "unavailable": unavailable, "gpus": [{"name": "NVIDIA H100 80GB HBM3", "memory_bytes": 80 << 30}] if gpu else []}


def conv_model(path: Path, *, qdq: bool = False, batch: int | str = "N") -> Path:
    weight = helper.make_tensor("w", TensorProto.FLOAT, [4, 3, 3, 3], np.random.default_rng(0).random(108).tolist())
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])]
    inits = [weight]
    if qdq:
        inits += [helper.make_tensor("s", TensorProto.FLOAT, [], [0.1]), helper.make_tensor("z", TensorProto.INT8, [], [0])]
        nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
                 helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
                 helper.make_node("Conv", ["xd", "w"], ["y"], pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 4, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def keys(targets):
    from workers.targets import target_key

    return [target_key(t) for t in targets]


# --- what a worker serves, and why not ---------------------------------------------------------------------------

def test_gpu_targets_need_the_runtime_and_a_gpu_each_with_its_reason():
    from workers.targets import servable_targets, unservable_gpu_targets

    cpu_only = fake_probe()
    assert keys(servable_targets(cpu_only)) == ["onnxruntime.cpu"]
    reasons = unservable_gpu_targets(cpu_only)
    assert "CUDAExecutionProvider" in reasons["onnxruntime.cuda"] and "onnxruntime-gpu" in reasons["onnxruntime.cuda"]
    assert "No module named 'tensorrt'" in reasons["tensorrt.cuda"]
    # The provider and the module without a GPU: nothing on CUDA is served, and the reason says so.
    no_gpu = fake_probe(cuda_provider=True, tensorrt=True)
    assert keys(servable_targets(no_gpu)) == ["onnxruntime.cpu"]
    assert set(unservable_gpu_targets(no_gpu).values()) == {"nvidia-smi lists no NVIDIA GPU on this machine"}
    gpu = servable_targets(fake_probe(cuda_provider=True, gpu=True, tensorrt=True))
    assert [(t["runtime"], t["device"], t["precision"], t["queue"]) for t in gpu] == [
        ("onnxruntime", "cpu", None, "cpu"), ("onnxruntime", "cuda", None, "gpu"),
        ("tensorrt", "cuda", "f32", "tensorrt.cuda.f32"), ("tensorrt", "cuda", "f16", "tensorrt.cuda.f16"),
        ("tensorrt", "cuda", "int8", "tensorrt.cuda.int8")]
    assert unservable_gpu_targets(fake_probe(cuda_provider=True, gpu=True, tensorrt=True)) == {}


def test_this_machines_probe_says_why_tensorrt_is_not_served():
    import torch

    from workers.targets import _tensorrt

    try:
        import tensorrt  # noqa: F401
        have = torch.cuda.is_available()
    except ImportError:
        have = False
    if have:
        pytest.skip("TensorRT and a CUDA device are here: the GPU tests cover this machine")
    with pytest.raises(Exception) as caught:
        _tensorrt()
    assert "tensorrt" in str(caught.value).lower() or "cuda" in str(caught.value).lower()


def test_the_api_accepts_tensorrt_precisions_and_asks_steps_for_onnxruntime_cuda():
    from pydantic import ValidationError

    from app.jobs.schemas import JobCreate
    from app.targets.schemas import TargetSpec, queue_for

    assert TargetSpec(runtime="tensorrt", device="cuda", precision="int8").key() == ("tensorrt", "cuda", "int8")
    assert queue_for("tensorrt", "cuda", "f16") == "tensorrt.cuda.f16"
    with pytest.raises(ValidationError, match="give steps or a recipe with the onnxruntime cuda target"):
        JobCreate(model_id="m", target={"runtime": "onnxruntime", "device": "cuda"})
    JobCreate(model_id="m", target={"runtime": "tensorrt", "device": "cuda", "precision": "f16"})


# --- engines: names, profiles, refusals -----------------------------------------------------------------------------

def test_the_engine_name_carries_the_tensorrt_version_the_gpu_and_the_precision():
    from workers.tensorrt.engine import GpuInfo, engine_name

    h100 = GpuInfo(name="NVIDIA H100 80GB HBM3", compute_capability=(9, 0))
    name = engine_name(tensorrt_version="10.13.3.9", gpu=h100, precision="int8")
    assert name == "model_tensorrt-10.13.3.9_nvidia-h100-80gb-hbm3-sm90_int8.engine"
    other = engine_name(tensorrt_version="10.13.3.9", gpu=GpuInfo("NVIDIA A10G", (8, 6)), precision="int8")
    assert other != name and "a10g-sm86" in other
    with pytest.raises(JobFailed) as caught:
        engine_name(tensorrt_version="10.0", gpu=h100, precision="bf16")
    assert caught.value.code == "invalid_params"


def test_the_profile_covers_the_job_batch_sizes_and_the_dataset_evaluation():
    from workers.tensorrt.engine import EVAL_BATCH, profile_shapes

    def shapes(batch: int) -> dict[str, list[int]]:
        return {"x": [batch, 3, 8, 8]}

    dynamic = profile_shapes(shapes, [8, 4], dynamic_batch=True)
    assert dynamic == {"x": {"min": [1, 3, 8, 8], "opt": [4, 3, 8, 8], "max": [EVAL_BATCH, 3, 8, 8]}}
    assert profile_shapes(shapes, [64], dynamic_batch=True)["x"]["max"] == [64, 3, 8, 8]
    fixed = profile_shapes(shapes, [2], dynamic_batch=False)
    assert fixed["x"]["min"] == fixed["x"]["max"] == [2, 3, 8, 8]


def test_engine_plan_reads_the_models_inputs(tmp_path):
    from workers.tensorrt.job import engine_plan

    plan = engine_plan(conv_model(tmp_path / "m.onnx"), None, [1, 8])
    assert plan["x"]["min"] == [1, 3, 8, 8] and plan["x"]["opt"] == [1, 3, 8, 8] and plan["x"]["max"][0] == 32
    fixed = engine_plan(conv_model(tmp_path / "f.onnx", batch=2), None, [1])
    assert fixed["x"]["min"] == fixed["x"]["max"] == [2, 3, 8, 8]


def test_a_qdq_model_is_told_from_a_float_one(tmp_path):
    from workers.tensorrt.engine import is_qdq

    assert not is_qdq(conv_model(tmp_path / "f.onnx"))
    assert is_qdq(conv_model(tmp_path / "q.onnx", qdq=True))


class FakeRun:
    def __init__(self) -> None:
        self.artifacts: list = []

    def progress(self, *args, **kwargs) -> None:
        pass

    def dataset(self, dataset_id):
        raise AssertionError("no dataset is read before TensorRT is found")


def test_lowering_without_tensorrt_or_a_gpu_is_refused_with_a_stable_code(tmp_path):
    from workers.lowering import lower_for_target, lowering_method

    try:
        import tensorrt  # noqa: F401
        import torch

        if torch.cuda.is_available():
            pytest.skip("TensorRT and a CUDA device are here: the engine is built by the GPU test")
    except ImportError:
        pass
    model = conv_model(tmp_path / "m.onnx")
    with pytest.raises(JobFailed) as caught:
        lower_for_target(FakeRun(), {"runtime": "tensorrt", "device": "cuda", "precision": "f16"}, model, tmp_path,
                         {"batch_sizes": [1]}, None, share=(0.0, 1.0))
    assert caught.value.code == "no_worker_for_target"
    with pytest.raises(JobFailed) as caught:
        lower_for_target(FakeRun(), {"runtime": "coreml", "device": "npu"}, model, tmp_path, {}, None, share=(0, 1))
    assert caught.value.code == "no_worker_for_target"
    with pytest.raises(JobFailed) as caught:
        lower_for_target(FakeRun(), {"runtime": "tensorrt", "device": "cuda", "precision": "bf16"}, model, tmp_path,
                         {}, None, share=(0, 1))
    assert caught.value.code == "invalid_params"
    assert lowering_method({"runtime": "tensorrt"}) == "lower.tensorrt"


# --- measurement plumbing that runs anywhere --------------------------------------------------------------------------

def test_gpu_targets_are_labelled_sized_and_charged_to_nvml(tmp_path):
    from workers.measure.energy import open_counter
    from workers.measure.targets import is_lowered, lowered_size, target_label

    assert target_label({"runtime": "tensorrt", "device": "cuda", "precision": "int8"}) == "TensorRT CUDA (int8)"
    assert target_label({"runtime": "onnxruntime", "device": "cuda"}) == "ONNX Runtime CUDA"
    engine = tmp_path / "model_tensorrt-10.13_nvidia-h100-sm90_f16.engine"
    engine.write_bytes(b"\0" * 1234)
    assert is_lowered(engine) and not is_lowered(tmp_path / "model.onnx")
    assert lowered_size(engine) == {"file_bytes": 1234, "external_data_files": 0, "parameters": None,
                                    "initializer_bytes": None, "format": "tensorrt-engine"}
    for label in ("TensorRT CUDA (f16)", "ONNX Runtime CUDA"):
        counter, why = open_counter(label)
        assert counter is not None or "NVML" in why  # the GPU's counter, never RAPL's


def test_a_cpu_baseline_is_timed_with_host_arrays_beside_bound_gpu_roles(tmp_path):
    import onnxruntime as ort

    from workers.measure.latency import bound_call

    session = ort.InferenceSession(str(conv_model(tmp_path / "m.onnx")), providers=["CPUExecutionProvider"])
    call = bound_call(session, {"x": np.ones((1, 3, 8, 8), np.float32)})
    assert call()[0].shape == (1, 4, 8, 8)  # session.run with host arrays: no device binding on the CPU


# --- the search's GPU candidates ---------------------------------------------------------------------------------------

def test_the_search_plans_gpu_candidates_only_where_the_worker_serves_them(tmp_path):
    from workers.search.run import Search, _gpu_plans, _lowering
    from workers.targets import servable_targets

    state = Search(run=None, workdir=tmp_path, original=tmp_path / "m.onnx", intake=None, input_shapes=None,
                   spec={"goal": {"families": None, "time_budget_s": 300}, "evaluate": {}})
    assert _gpu_plans(state, [t for t in servable_targets(fake_probe()) if t["device"] != "cpu"], "ds") == []
    served = [t for t in servable_targets(fake_probe(cuda_provider=True, gpu=True, tensorrt=True)) if t["device"] == "cuda"]
    plans = {p.name: p for p in _gpu_plans(state, served, "ds")}
    assert list(plans) == ["cuda", "cuda-fp16", "tensorrt-f16", "tensorrt-int8"]
    assert plans["cuda-fp16"].steps[0]["method"] == "quantize.fp16"
    assert plans["tensorrt-int8"].target == {"runtime": "tensorrt", "device": "cuda", "precision": "int8",
                                             "calibration_dataset_id": "ds"}
    assert all(p.family == "targets" for p in plans.values())
    assert _lowering(plans["tensorrt-f16"].target) == ["lower.tensorrt"] and _lowering(plans["cuda"].target) == []
    state.spec["goal"]["families"] = ["targets"]  # quantize not allowed: no fp16 step
    assert [p.name for p in _gpu_plans(state, served, None)] == ["cuda", "tensorrt-f16", "tensorrt-int8"]


# --- make gpu-check --------------------------------------------------------------------------------------------------

def test_gpu_check_without_a_gpu_says_so_and_exits_0(tmp_path):
    env = {"PATH": str(tmp_path), "HOME": str(tmp_path)}  # no nvidia-smi on this PATH
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py")], env=env, capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "needs an NVIDIA GPU" in done.stdout and "nothing written" in done.stdout


def test_gpu_check_names_what_the_machine_lacks():
    sys.path.insert(0, str(ROOT))
    from bench.gpu_check import missing_lines

    lines = missing_lines({"nvcc": None, "torch": "2.13.0+cpu", "torch_cuda": None, "onnxruntime": "1.24.1",
                           "ort_providers": ["CPUExecutionProvider"], "tensorrt": None,
                           "tensorrt_reason": "No module named 'tensorrt'", "service_missing": ["celery"]})
    text = "\n".join(lines)
    for needed in ("nvcc", "torch with CUDA", "onnxruntime-gpu", "tensorrt", "celery"):
        assert needed in text


# --- on a GPU (make gpu-check runs these) ------------------------------------------------------------------------

def needs_tensorrt():
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: the TensorRT engine tests run on a GPU machine (make gpu-check)")
    try:
        import tensorrt  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"TensorRT is not installed ({exc}): the engine tests need it")


@pytest.mark.parametrize("precision", ["f32", "f16", "int8"])
def test_engines_run_through_the_execution_context_close_to_onnx_runtime(tmp_path, precision):
    needs_tensorrt()
    import onnxruntime as ort

    from workers.tensorrt.engine import build_engine, read_meta
    from workers.tensorrt.job import engine_plan
    from workers.tensorrt.session import TensorRTSession

    model = conv_model(tmp_path / "m.onnx")
    rng = np.random.default_rng(1)
    feeds = [{"x": rng.random((1, 3, 8, 8), dtype=np.float32)} for _ in range(16)]
    engine, meta = build_engine(model, tmp_path / "e", precision=precision, profile=engine_plan(model, None, [1, 4]),
                                calibration=lambda: (feeds, "random", []))
    assert meta.tensorrt in engine.name and read_meta(engine)["precision"] == precision
    session = TensorRTSession(engine, label=f"TensorRT CUDA ({precision})")
    x = rng.random((4, 3, 8, 8), dtype=np.float32)
    expected = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = session.run(None, {"x": x})[0]
    tolerance = {"f32": 1e-4, "f16": 1e-2, "int8": 0.1}[precision]
    assert np.abs(got - expected).max() <= tolerance * max(1.0, float(np.abs(expected).max()))
    session.bind({"x": x})()  # the bound call runs


def test_cuda_prune_masks_come_from_the_kernels(monkeypatch):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: the GPU path of magnitude pruning runs on a GPU machine (make gpu-check)")
    import kernels
    from workers.prune.algorithms import magnitude_masks

    calls = []
    real = kernels.magnitude_threshold
    monkeypatch.setattr(kernels, "magnitude_threshold", lambda *a, **k: calls.append(1) or real(*a, **k))
    module = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)).cuda()
    masks = magnitude_masks(module, 0.5)
    assert calls and all(m.is_cuda for m in masks.values())
