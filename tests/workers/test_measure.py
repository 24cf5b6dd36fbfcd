"""workers.measure on small models built here, and on a real pretrained model when ../shared/models has it."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from app.errors import MeasurementFailed
from tests.helpers import SHARED_MODELS, mlp_onnx_bytes
from tests.workers.factories import linear_model, opset_model, save
from workers.measure import Stopped, measure_pair
from workers.measure.energy import energy_entry, energy_estimate, energy_report, measure_windows, rapl_counter

FAST = {"warmup": 1, "iterations": 4}
LATENCY_METRICS = {"p50_ms", "p90_ms", "p95_ms", "p99_ms", "mean_ms", "stdev_ms", "cv", "min_ms", "throughput_per_s"}


@pytest.fixture(scope="module")
def mlp(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("mlp") / "mlp.onnx"
    path.write_bytes(mlp_onnx_bytes())
    return path


@pytest.fixture(scope="module")
def mlp_perturbed(tmp_path_factory, mlp: Path) -> Path:
    """The same MLP with every weight nudged by 1% noise: close, not identical."""
    model = onnx.load(str(mlp))
    rng = np.random.default_rng(7)
    for index, tensor in enumerate(model.graph.initializer):
        values = numpy_helper.to_array(tensor)
        noisy = values + 0.01 * np.abs(values).mean() * rng.standard_normal(values.shape).astype(values.dtype)
        model.graph.initializer[index].CopyFrom(numpy_helper.from_array(noisy, tensor.name))
    return save(model, tmp_path_factory.mktemp("mlp-perturbed") / "perturbed.onnx")


@pytest.fixture(scope="module")
def mlp_vs_itself(mlp: Path) -> tuple[dict, list[tuple[float, str]]]:
    calls: list[tuple[float, str]] = []
    measured = measure_pair(mlp, mlp, batch_sizes=[4, 1], **FAST, on_progress=lambda f, m: calls.append((f, m)))
    return measured, calls


def test_a_model_against_itself_is_a_perfect_match(mlp_vs_itself):
    fidelity = mlp_vs_itself[0]["fidelity"]
    assert fidelity["cosine_similarity"] == 1.0
    assert fidelity["max_abs_diff"] == 0.0
    assert fidelity["samples"] >= 16
    (logits,) = fidelity["outputs"]
    assert logits["name"] == "logits" and logits["top1_agreement"] == 1.0
    assert "one row per sample" in logits["top1_note"]


def test_latency_is_per_batch_size_with_ordered_statistics(mlp_vs_itself):
    measured = mlp_vs_itself[0]
    latency = measured["latency"]
    assert [b["batch_size"] for b in latency["batch_sizes"]] == [1, 4]
    assert latency["skipped"] == [] and latency["provider"] == "CPUExecutionProvider"
    assert latency["iterations"] == 4 and latency["rounds"] == 4
    for entry in latency["batch_sizes"]:
        for role in ("baseline", "result"):
            stats = entry[role]
            assert stats["count"] == 4
            assert 0 < stats["min_ms"] <= stats["p50_ms"] <= stats["p90_ms"] <= stats["p99_ms"] <= stats["max_ms"]
            assert stats["throughput_per_s"] == pytest.approx(entry["batch_size"] * 1000 / stats["mean_ms"], rel=1e-3)
        assert entry["speedup"] == pytest.approx(1 / entry["p50_ratio"], rel=1e-3)
        assert entry["input_shapes"] == {"features": [entry["batch_size"], 64]}
    env = measured["environment"]
    assert env["cpu"] and env["threads"] >= 1 and env["provider"] == "CPUExecutionProvider"
    assert env["versions"]["onnxruntime"]


def test_size_counts_file_and_parameters(mlp_vs_itself, mlp):
    size = mlp_vs_itself[0]["size"]
    assert size["baseline"]["file_bytes"] == mlp.stat().st_size
    assert size["baseline"]["parameters"] == 64 * 256 + 256 + 256 * 256 + 256 + 256 * 10 + 10
    assert size["baseline"]["initializer_bytes"] == 4 * size["baseline"]["parameters"]
    assert size["ratio"] == 1.0


def test_measurement_rows_cover_every_metric_and_batch_size(mlp_vs_itself):
    rows = mlp_vs_itself[0]["measurements"]
    for role in ("baseline", "result"):
        for metric in ("file_bytes", "parameters"):
            assert any(r["model"] == role and r["metric"] == metric and r["batch_size"] is None for r in rows)
        for batch in (1, 4):
            found = {r["metric"] for r in rows if r["model"] == role and r["batch_size"] == batch}
            assert LATENCY_METRICS <= found, (role, batch)
    result_metrics = {r["metric"] for r in rows if r["model"] == "result"}
    assert {"cosine_similarity", "max_abs_diff", "top1_agreement"} <= result_metrics
    assert all(isinstance(r["value"], float) and r["provider"] == "CPUExecutionProvider" for r in rows)
    assert next(r for r in rows if r["metric"] == "file_bytes")["unit"] == "bytes"


def test_energy_is_measured_or_null_with_a_reason(mlp_vs_itself):
    energy = mlp_vs_itself[0]["energy"]
    counter, _ = rapl_counter()
    if counter is None:
        assert energy["value"] is None and energy["unit"] == "J"
        assert "RAPL" in energy["reason"]
    else:
        # Four calls of a tiny model may fall between two counter updates: zero is possible, negative is not.
        assert energy["value"]["baseline"] >= 0 and energy["reason"] is None and "RAPL" in energy["counter"]


def test_memory_is_measured_in_child_processes(mlp_vs_itself):
    memory = mlp_vs_itself[0]["memory"]
    assert memory["batch_size"] == 4
    for role in ("baseline", "result"):
        # The MLP's weights alone are 340 KB; a session costs more than that and less than a gigabyte.
        assert 340_000 < memory[role]["peak_rss_increase_bytes"] < 2**30


def test_progress_rises_to_one(mlp_vs_itself):
    fractions = [f for f, _ in mlp_vs_itself[1]]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    assert any("timing batch 4" in m for _, m in mlp_vs_itself[1])


def test_a_perturbed_copy_is_close_but_not_equal(mlp, mlp_perturbed):
    measured = measure_pair(mlp, mlp_perturbed, batch_sizes=[8], **FAST)
    fidelity = measured["fidelity"]
    assert 0.9 < fidelity["cosine_similarity"] < 1.0
    assert fidelity["max_abs_diff"] > 0
    assert fidelity["outputs"][0]["mean_abs_diff"] > 0
    # A cheap model is compared on more random samples than the 16 at least (at most 256), in whole batches.
    assert fidelity["batch_size"] == 8 and 16 <= fidelity["samples"] <= 256 and fidelity["samples"] % 8 == 0
    assert fidelity["samples"] == fidelity["runs"] * 8


def test_a_candidate_whose_outputs_broke_the_budget_is_timed_in_brief(mlp, mlp_perturbed):
    """A goal search's candidate below brief_below cannot be handed over: BRIEF_ITERATIONS calls on one session
    set give its interval, at a fraction of the full timing; one that holds is timed in full."""
    from workers.measure import BRIEF_ITERATIONS

    calls: list[float] = []
    spec = {"batch_sizes": [1], "warmup": 3, "iterations": 40, "on_progress": lambda f, m: calls.append(f)}
    broke = measure_pair(mlp, mlp_perturbed, brief_below=0.99999, **spec)
    cosine = broke["fidelity"]["worst_sample_cosine"]
    assert cosine < 0.99999
    latency = broke["latency"]
    assert latency["iterations"] == BRIEF_ITERATIONS and latency["warmup"] == 1
    assert latency["session_sets"].startswith("one set of sessions")
    assert f"cosine {cosine:.4f} is below the search's budget 0.99999" in latency["brief"]
    assert broke["latency"]["batch_sizes"][0]["speedup_ci"]["low"] is not None
    assert calls == sorted(calls) and calls[-1] == pytest.approx(1.0)

    held = measure_pair(mlp, mlp_perturbed, brief_below=0.5, **spec)
    assert held["latency"]["iterations"] == 40 and "brief" not in held["latency"]


def test_a_search_candidate_is_timed_on_fewer_session_sets(mlp, mlp_perturbed):
    """session_sets caps the sets per batch size (a target runtime compiles both models again for each)."""
    spec = {"batch_sizes": [1], "warmup": 1, "iterations": 40}
    few = measure_pair(mlp, mlp_perturbed, session_sets=3, **spec)["latency"]
    usual = measure_pair(mlp, mlp_perturbed, **spec)["latency"]
    assert few["rounds"] == usual["rounds"] == 10
    assert "every 4 rounds" in few["session_sets"] and "every 2 rounds" in usual["session_sets"]
    with pytest.raises(ValueError, match="session_sets >= 2"):
        measure_pair(mlp, mlp_perturbed, session_sets=1, **spec)


def test_fixed_batch_model_is_measured_at_its_size_and_skips_the_others(tmp_path):
    path = save(linear_model(batch=2, input_name="images"), tmp_path / "fixed.onnx")
    measured = measure_pair(path, path, batch_sizes=[1, 2, 8], **FAST)
    assert [b["batch_size"] for b in measured["latency"]["batch_sizes"]] == [2]
    skipped = measured["latency"]["skipped"]
    assert [s["batch_size"] for s in skipped] == [1, 8]
    assert skipped[0]["reason"] == "input 'images' has a fixed batch dimension of 2 (shape [2, 32])"

    # A fixed size nobody asked for is still measured, and the report says so.
    measured = measure_pair(path, path, batch_sizes=[4], **FAST)
    assert [b["batch_size"] for b in measured["latency"]["batch_sizes"]] == [2]
    assert [s["batch_size"] for s in measured["latency"]["skipped"]] == [4]
    assert any("accept only batch 2" in n for n in measured["notes"])


def test_batch_size_a_model_cannot_run_is_skipped_with_the_runtime_error(tmp_path):
    path = save(linear_model(reshape_to=[1, 32]), tmp_path / "reshape.onnx")
    measured = measure_pair(path, path, batch_sizes=[1, 4], **FAST)
    assert [b["batch_size"] for b in measured["latency"]["batch_sizes"]] == [1]
    (skip,) = measured["latency"]["skipped"]
    assert skip["batch_size"] == 4
    assert "fails to run at batch 4" in skip["reason"] and "Reshape" in skip["reason"]


def token_model(vocabulary: int) -> onnx.ModelProto:
    """Embedding lookup: input_ids index a [vocabulary, 8] table; mask and token types pass through."""
    table = numpy_helper.from_array(np.random.default_rng(0).standard_normal((vocabulary, 8)).astype(np.float32),
                                    "embeddings")
    nodes = [
        helper.make_node("Gather", ["embeddings", "input_ids"], ["hidden"]),
        helper.make_node("Cast", ["attention_mask"], ["mask_float"], to=TensorProto.FLOAT),
        helper.make_node("Cast", ["token_type_ids"], ["types_float"], to=TensorProto.FLOAT),
    ]
    seq = ["batch", "sequence"]
    graph = helper.make_graph(
        nodes, "tokens",
        [helper.make_tensor_value_info(n, TensorProto.INT64, seq) for n in ("input_ids", "attention_mask",
                                                                              "token_type_ids")],
        [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["batch", "sequence", 8]),
         helper.make_tensor_value_info("mask_float", TensorProto.FLOAT, seq),
         helper.make_tensor_value_info("types_float", TensorProto.FLOAT, seq)],
        initializer=[table],
    )
    return opset_model(graph)


def test_token_ids_stay_inside_the_vocabulary(tmp_path):
    # 30 rows: ids drawn from [0, 100) would make ONNX Runtime fail with an index error.
    path = save(token_model(vocabulary=30), tmp_path / "tokens.onnx")
    measured = measure_pair(path, path, batch_sizes=[2], **FAST)
    inputs = {i["name"]: i for i in measured["inputs"]}
    assert inputs["input_ids"]["values"] == "integers in [0, 30) (token ids)"
    assert inputs["attention_mask"]["values"].startswith("ones")
    assert inputs["token_type_ids"]["values"].startswith("zeros")
    assert measured["latency"]["batch_sizes"][0]["input_shapes"]["input_ids"] == [2, 128]
    assert any("'sequence'" in n and "128" in n for n in measured["notes"])
    outputs = {o["name"]: o for o in measured["fidelity"]["outputs"]}
    assert outputs["hidden"]["cosine_similarity"] == 1.0
    assert outputs["hidden"]["top1_agreement"] == 1.0


def test_models_with_different_inputs_cannot_be_compared(tmp_path):
    first = save(linear_model(input_name="x"), tmp_path / "x.onnx")
    second = save(linear_model(input_name="pixels"), tmp_path / "pixels.onnx")
    with pytest.raises(MeasurementFailed) as failed:
        measure_pair(first, second, batch_sizes=[1], **FAST)
    assert "same inputs" in failed.value.message and "'pixels'" in failed.value.message
    assert failed.value.code == "measurement_failed"


def test_a_model_the_runtime_cannot_load_fails_with_its_error(tmp_path):
    good = save(linear_model(), tmp_path / "good.onnx")
    graph = helper.make_graph([helper.make_node("NoSuchOperator", ["x"], ["scores"])], "broken",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 32])],
                              [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", 10])])
    broken = tmp_path / "broken.onnx"
    onnx.save_model(opset_model(graph), str(broken))  # the checker would refuse it; ONNX Runtime must say why
    with pytest.raises(MeasurementFailed) as failed:
        measure_pair(good, broken, batch_sizes=[1], **FAST)
    assert failed.value.message.startswith("ONNX Runtime could not load the compressed model")
    assert "NoSuchOperator" in failed.value.message


def test_should_stop_ends_the_measurement(mlp):
    asked = []

    def should_stop() -> bool:
        asked.append(1)
        return len(asked) > 3

    with pytest.raises(Stopped):
        measure_pair(mlp, mlp, batch_sizes=[1], warmup=0, iterations=1000, should_stop=should_stop)
    assert len(asked) == 4


def test_a_provider_this_build_lacks_is_reported_with_the_reason_and_cpu_is_still_measured(mlp):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this host's onnxruntime has CUDA")
    measured = measure_pair(mlp, mlp, batch_sizes=[1], providers=["cuda", "cpu"], **FAST)
    cuda, cpu = measured["providers"]
    assert cuda == {"provider": "CUDAExecutionProvider", "available": False, "reason": cuda["reason"]}
    assert "has no CUDAExecutionProvider" in cuda["reason"] and ort.__version__ in cuda["reason"]
    assert cpu["available"] and cpu["primary"] and measured["latency"]["provider"] == "CPUExecutionProvider"
    assert any(n.startswith("CUDAExecutionProvider was asked for and is not measured") for n in measured["notes"])
    # Nothing measured on CUDA is stored as if it were.
    assert {r["provider"] for r in measured["measurements"]} == {"CPUExecutionProvider"}


def test_a_provider_that_falls_back_to_cpu_is_not_measured_and_keeps_onnx_runtimes_words(mlp, monkeypatch):
    import os

    import onnxruntime as ort

    from workers.measure import runtime

    real = ort.InferenceSession

    def quietly_on_cpu(path, sess_options=None, providers=None):
        # What onnxruntime-gpu does without a usable GPU: log to stderr, then run on the CPU.
        os.write(2, b"[W:onnxruntime:Default] Failed to create CUDAExecutionProvider. Require cuDNN 9.*\n")
        return real(path, sess_options=sess_options, providers=["CPUExecutionProvider"])

    monkeypatch.setattr(ort, "InferenceSession", quietly_on_cpu)
    session, reason = runtime.start_provider(mlp, role="baseline", provider="CUDAExecutionProvider", threads=1)
    assert session is None
    assert "did not start for the original model; ONNX Runtime used CPUExecutionProvider" in reason
    assert "Failed to create CUDAExecutionProvider. Require cuDNN 9.*" in reason


def test_cpu_is_always_measured_and_unknown_aliases_are_kept_in_order():
    from workers.measure.runtime import requested_providers

    assert requested_providers(None) == ["CPUExecutionProvider"]
    assert requested_providers(["trt", "cuda"]) == ["TensorrtExecutionProvider", "CUDAExecutionProvider",
                                                    "CPUExecutionProvider"]
    assert requested_providers(["cpu", "gpu"]) == ["CPUExecutionProvider", "CUDAExecutionProvider"]


def test_cold_start_and_speedup_interval_are_reported(mlp_vs_itself):
    measured = mlp_vs_itself[0]
    for role in ("baseline", "result"):
        cold = measured["cold_start"][role]
        assert cold["load_ms"] > 0 and cold["first_run_ms"] > 0 and cold["batch_size"] == 1
    for entry in measured["latency"]["batch_sizes"]:
        interval = entry["speedup_ci"]
        assert interval["rounds"] == 4 and interval["low"] <= entry["speedup"] <= interval["high"]
        assert entry["speedup_text"] == f"{entry['speedup']:.2f}x ({interval['low']:.2f}-{interval['high']:.2f})"
        assert isinstance(entry["noisy"], bool)
    assert measured["samples"]["unit"] == "ns"
    rounds = measured["samples"]["providers"]["CPUExecutionProvider"]["1"]
    assert [len(r) for r in rounds["baseline"]] == [1, 1, 1, 1] and len(rounds["result"]) == 4
    assert measured["memory"]["arena"]["enable_cpu_mem_arena"] is True


def test_external_data_counts_towards_file_size(tmp_path):
    inline = save(linear_model(width=256), tmp_path / "inline.onnx")
    folder = tmp_path / "external"
    folder.mkdir()
    external = save(linear_model(width=256), folder / "model.onnx", save_as_external_data=True,
                    all_tensors_to_one_file=True, location="weights.bin", size_threshold=0)
    measured = measure_pair(inline, external, batch_sizes=[1], **FAST)
    result = measured["size"]["result"]
    assert result["external_data_files"] == 1
    assert result["file_bytes"] == external.stat().st_size + (folder / "weights.bin").stat().st_size
    assert result["parameters"] == measured["size"]["baseline"]["parameters"] == 256 * 10
    assert measured["fidelity"]["max_abs_diff"] == 0.0


def fake_rapl_zone(root: Path, energy_uj: int) -> Path:
    zone = root / "intel-rapl:0"
    zone.mkdir()
    (zone / "name").write_text("package-0\n")
    (zone / "max_energy_range_uj").write_text("1000000\n")
    (zone / "energy_uj").write_text(f"{energy_uj}\n")
    return zone


def test_rapl_counter_reads_package_energy_across_a_wrap(tmp_path):
    zone = fake_rapl_zone(tmp_path, 999000)
    (tmp_path / "intel-rapl:0:0").mkdir()  # a core sub-zone: part of the package, not counted twice
    counter, reason = rapl_counter(tmp_path)
    assert counter is not None and reason == ""
    start = counter.read_joules()
    (zone / "energy_uj").write_text("500\n")  # wrapped past max_energy_range_uj
    assert counter.read_joules() - start == pytest.approx((1000000 - 999000 + 1 + 500) / 1e6)
    assert rapl_counter(tmp_path / "absent")[0] is None


def test_energy_windows_charge_each_model_what_the_counter_moved_while_it_ran(tmp_path):
    zone = fake_rapl_zone(tmp_path, 0)
    counter, _ = rapl_counter(tmp_path)

    def drawing(microjoules: int):
        def call():
            (zone / "energy_uj").write_text(str(int((zone / "energy_uj").read_text()) + microjoules))
        return call

    totals = measure_windows(counter, {"baseline": drawing(2_000), "result": drawing(1_000)}, window_s=0.01,
                             windows=2)
    for role, per_call in (("baseline", 2_000), ("result", 1_000)):
        assert totals[role]["calls"] >= 2 and totals[role]["seconds"] >= 0.02
        assert totals[role]["joules"] == pytest.approx(per_call * totals[role]["calls"] / 1e6)
    entry = energy_entry(1, totals)
    assert entry["baseline_j_per_inference"] == pytest.approx(0.002) and entry["ratio"] == pytest.approx(0.5)
    report = energy_report(counter, [entry], "")
    assert report["value"] == {"batch_size": 1, "baseline": 0.002, "result": 0.001} and report["reason"] is None
    assert "RAPL" in report["counter"]
    assert energy_report(None, [], "no RAPL or NVML counter readable on this host (x)")["value"] is None


def test_an_energy_estimate_is_labelled_and_follows_its_formula():
    latency = [{"batch_size": 1, "baseline": {"mean_ms": 2.0}, "result": {"mean_ms": 1.0}}]
    estimate = energy_estimate(latency, tdp_watts=100, threads=2, logical_cores=8)
    assert estimate["estimate"] is True and "tdp_watts" in estimate["formula"]
    # 100 W x 2/8 of the package x 2 ms = 0.05 J
    assert estimate["batch_sizes"][0]["baseline_j_per_inference"] == pytest.approx(0.05)
    assert estimate["batch_sizes"][0]["result_j_per_inference"] == pytest.approx(0.025)


def test_real_detector_with_a_fixed_batch():
    path = SHARED_MODELS / "yolox-nano" / "yolox_nano.onnx"
    if not path.is_file():
        pytest.skip(f"{path} is absent (the real pretrained models live in ../shared/models)")
    measured = measure_pair(path, path, batch_sizes=[1, 8], warmup=1, iterations=4)
    (entry,) = measured["latency"]["batch_sizes"]
    assert entry["batch_size"] == 1 and entry["baseline"]["p50_ms"] > 0
    (skip,) = measured["latency"]["skipped"]
    assert skip["batch_size"] == 8 and "input 'images'" in skip["reason"] and "[1, 3, 416, 416]" in skip["reason"]
    assert measured["fidelity"]["cosine_similarity"] == 1.0 and 16 <= measured["fidelity"]["samples"] <= 256
    assert measured["size"]["baseline"]["file_bytes"] == path.stat().st_size


def test_io_bound_calls_give_the_same_outputs_as_plain_ones(mlp):
    # The GPU path's mechanics (inputs bound once, outputs left on the device, synchronised) checked on the
    # CPU device, which every machine has.
    import onnxruntime as ort

    from workers.measure.latency import bound_call

    session = ort.InferenceSession(str(mlp), providers=["CPUExecutionProvider"])
    feed = {"features": np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)}
    call = bound_call(session, feed, device="cpu")
    call()
    (bound,) = call.keep[0].copy_outputs_to_cpu()
    np.testing.assert_array_equal(bound, session.run(None, feed)[0])


def test_a_block_after_another_runtimes_block_settles_first(monkeypatch):
    """Another runtime's threads spin on after its last call (OpenVINO's, about 1.6 ms on opt-mnist): the next
    block starts with untimed calls of its own model, only where the runtime changes, and at least one."""
    from workers.measure import latency

    made: list[str] = []
    monkeypatch.setattr(latency, "settle", lambda call, seconds=latency.SETTLE_S: made.append(call()) or 1)
    turns = latency.Turns({"baseline": "onnxruntime", "runtime": "openvino", "result": "openvino"})
    for role in ("baseline", "result", "runtime", "baseline", "baseline", "result"):
        turns.take(role, lambda role=role: role)
    assert made == ["result", "baseline", "result"]  # ORT -> OV, OV -> ORT, ORT -> OV; not OV -> OV nor ORT -> ORT
    assert turns.settled == 3

    monkeypatch.undo()
    calls: list[int] = []
    assert latency.settle(lambda: calls.append(1), seconds=0.0) == 1 == len(calls)
    import time

    started = time.perf_counter()
    assert latency.settle(lambda: calls.append(1), seconds=0.002) >= 1
    assert time.perf_counter() - started >= 0.002


def test_sessions_are_told_apart_by_runtime(mlp):
    from workers.measure.latency import runtime_of
    from workers.measure.runtime import open_session

    assert runtime_of(open_session(mlp, role="baseline", providers=["CPUExecutionProvider"], threads=1)) == \
        "onnxruntime"
    pytest.importorskip("openvino")
    from workers.openvino.session import OpenVINOSession

    assert runtime_of(OpenVINOSession(mlp, precision="f32", threads=1)) == "openvino"


def test_a_measurement_on_another_runtime_says_its_blocks_settled(mlp):
    pytest.importorskip("openvino")
    report = measure_pair(mlp, mlp, batch_sizes=[1], warmup=1, iterations=6, threads=1,
                          target={"runtime": "openvino", "device": "cpu", "precision": "f32"})
    assert "untimed calls" in report["latency"]["order"]
    plain = measure_pair(mlp, mlp, batch_sizes=[1], **FAST, threads=1)
    assert "untimed calls" not in plain["latency"]["order"]
