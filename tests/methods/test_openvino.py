"""The OpenVINO target: lowering to IR at f32 / bf16 / NNCF int8, the IR loaded back as a user would, and the
three-way measurement (ONNX Runtime fp32 original, OpenVINO f32 original, OpenVINO result) whose gains are
checked here against the raw per-call times."""
from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from app.errors import JobFailed
from tests.helpers import SHARED_MODELS, digits_cnn_file

ov = pytest.importorskip("openvino")


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return digits_cnn_file(tmp_path_factory.mktemp("digits"))


def reference(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def run_ir_as_a_user_would(archive: Path, folder: Path, x: np.ndarray) -> tuple[np.ndarray, object]:
    """Unzip the artifact and compile the IR with the config it ships (what the report's how_to_run says)."""
    import json
    import zipfile

    with zipfile.ZipFile(archive) as opened:
        assert sorted(opened.namelist()) == ["model.bin", "model.xml", "openvino_config.json"]
        opened.extractall(folder)
    config = json.loads((folder / "openvino_config.json").read_text())
    compiled = ov.Core().compile_model(str(folder / "model.xml"), "CPU", config)
    return np.asarray(compiled(x)[0]), compiled


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.mark.parametrize("precision", ["f32", "bf16"])
def test_lowered_ir_runs_like_the_original_and_carries_its_precision(digits, tmp_path, precision):
    from workers.openvino.lower import lower

    path, x, _ = digits
    lowered = lower(path, tmp_path / "ir", precision=precision, threads=1)
    assert lowered.xml.is_file() and lowered.bin.is_file()
    out, compiled = run_ir_as_a_user_would(lowered.zip(tmp_path / "model_openvino.zip"), tmp_path / "user", x)
    assert {"f32": "float32", "bf16": "bfloat16"}[precision] in str(compiled.get_property("INFERENCE_PRECISION_HINT"))
    expected = reference(path, x)
    worst = cosines(expected, out).min()
    agree = (expected.argmax(1) == out.argmax(1)).mean()
    if precision == "f32":
        assert worst > 0.99999 and agree == 1.0
    else:  # bf16 keeps 8 bits of mantissa: close, not equal
        assert worst > 0.99 and agree > 0.97
        assert not np.array_equal(expected, out)


def test_int8_with_accuracy_control_keeps_the_top1_drop_within_budget(digits, tmp_path):
    from workers.openvino.lower import Validation, lower

    path, x, y = digits
    calibration = [{"images": x[i:i + 1]} for i in range(100)]
    held_x, held_y = x[100:], y[100:]
    validation = Validation(feeds=[{"images": held_x[i:i + 1]} for i in range(len(held_x))],
                            labels=[held_y[i:i + 1] for i in range(len(held_y))], name="digits held out")
    lowered = lower(path, tmp_path / "ir", precision="int8", threads=1,
                    calibration=lambda: (calibration, "dataset digits", []), validation=validation,
                    max_accuracy_drop=0.02)
    record = lowered.details["nncf"]
    assert record["mode"] == "accuracy_control" and record["max_drop"] == 0.02
    assert record["fake_quantize_nodes"] > 0
    out, _ = run_ir_as_a_user_would(lowered.zip(tmp_path / "int8.zip"), tmp_path / "user", held_x)
    original = (reference(path, held_x).argmax(1) == held_y).mean()
    quantized = (out.argmax(1) == held_y).mean()
    assert original - quantized <= 0.02 + 1e-9, (original, quantized)
    # int8 really ran: the IR holds int8 weights, so it is smaller than the f32 IR
    f32 = lower(path, tmp_path / "f32", precision="f32", threads=1)
    assert lowered.bin.stat().st_size < 0.5 * f32.bin.stat().st_size


def test_int8_takes_an_already_quantized_model_as_it_is(digits, tmp_path):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    from workers.openvino.lower import lower

    path, x, _ = digits

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{"images": x[i:i + 1]} for i in range(20)])

        def get_next(self):
            return next(self.items, None)

    qdq = tmp_path / "qdq.onnx"
    quantize_static(str(path), str(qdq), Reader(), quant_format=QuantFormat.QDQ)
    lowered = lower(qdq, tmp_path / "ir", precision="int8", threads=1,
                    calibration=lambda: pytest.fail("an already quantized model needs no calibration"))
    assert "already quantized" in lowered.details["nncf"]["skipped"]
    out, _ = run_ir_as_a_user_would(lowered.zip(tmp_path / "qdq.zip"), tmp_path / "user", x[:50])
    assert cosines(reference(qdq, x[:50]), out).min() > 0.99


def test_a_model_openvino_cannot_read_fails_with_lowering_failed(tmp_path):
    from onnx import TensorProto, helper

    from workers.openvino.lower import lower

    node = helper.make_node("NoSuchOp", ["x"], ["y"], domain="example.custom")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("example.custom", 1)])
    path = tmp_path / "custom.onnx"
    onnx.save(model, str(path))
    with pytest.raises(JobFailed) as caught:
        lower(path, tmp_path / "ir", precision="f32", threads=1)
    assert caught.value.code == "lowering_failed"
    assert "NoSuchOp" in caught.value.message


def test_target_measurement_reports_the_runtime_and_the_compression_gains(digits, tmp_path):
    """The three models take turns; each gain is the ratio of the medians of the raw per-call times, which the test
    recomputes from the samples the report hands over."""
    from workers.measure import MeasureSpec, measure_pair
    from workers.openvino.lower import lower

    path, _, _ = digits
    lowered = lower(path, tmp_path / "ir", precision="bf16", threads=1)
    report = measure_pair(path, lowered.xml, MeasureSpec(
        batch_sizes=[1, 8], warmup=4, iterations=40, threads=1,
        target={"runtime": "openvino", "device": "cpu", "precision": "bf16"}))
    assert report["latency"]["provider"] == "OpenVINO CPU (bf16)"
    assert report["environment"]["target"]["precision"] == "bf16" and report["environment"]["versions"]["openvino"]
    assert set(report["cold_start"]) >= {"baseline", "runtime", "result"}
    assert report["size"]["result"]["format"] == "openvino-ir"
    samples = report["samples"]["providers"]["OpenVINO CPU (bf16)"]
    for entry in report["latency"]["batch_sizes"]:
        calls = {role: np.concatenate(samples[str(entry["batch_size"])][role]) for role in ("baseline", "runtime",
                                                                                            "result")}
        median = {role: float(np.median(times)) for role, times in calls.items()}
        assert len(calls["runtime"]) == len(calls["result"]) == len(calls["baseline"]) == 40
        assert entry["speedup"] == pytest.approx(median["baseline"] / median["result"], abs=1e-4)
        assert entry["runtime_speedup"] == pytest.approx(median["baseline"] / median["runtime"], abs=1e-4)
        assert entry["compression_speedup"] == pytest.approx(median["runtime"] / median["result"], abs=1e-4)
        assert entry["speedup"] == pytest.approx(entry["runtime_speedup"] * entry["compression_speedup"], rel=1e-3)
        for part in ("runtime", "compression"):
            interval = entry[f"{part}_speedup_ci"]
            assert interval["low"] <= entry[f"{part}_speedup"] <= interval["high"]
        assert entry["runtime"]["count"] == 40
    # fidelity is against ONNX Runtime fp32: the f32 runtime is faithful, bf16 moves the outputs a little
    assert report["fidelity"]["runtime"]["worst_sample_cosine"] > 0.99999
    assert 0.99 < report["fidelity"]["worst_sample_cosine"] < 1.0
    assert report["memory"]["result"]["peak_rss_increase_bytes"] > 0


@pytest.mark.skipif(not (SHARED_MODELS / "ultraface-rfb320").is_dir(), reason="../shared/models is absent")
def test_a_real_detector_lowers_and_runs_at_each_precision(tmp_path):
    """Ultra-Light face detector (weights listed as graph inputs, opset 9), as uploaded."""
    from workers.openvino.lower import lower

    path = SHARED_MODELS / "ultraface-rfb320" / "version-RFB-320.onnx"
    x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 240, 320)).astype(np.float32)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"input": x[:1]})
    calibration = [{"input": x[i:i + 1]} for i in range(2)]
    for precision, floor in (("f32", 0.99999), ("bf16", 0.99), ("int8", 0.9)):
        lowered = lower(path, tmp_path / precision, precision=precision, threads=1,
                        calibration=lambda: (calibration, "random data", []))
        _, compiled = run_ir_as_a_user_would(lowered.zip(tmp_path / f"{precision}.zip"), tmp_path / f"u-{precision}",
                                             x[:1])
        got = compiled(x[:1])
        for index, want in enumerate(expected):
            assert cosines(want, np.asarray(got[index])).min() > floor, (precision, index)


# --- end to end: `modelpress run` (its worker registers the OpenVINO targets it can serve) ---------------------

def npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def test_an_openvino_int8_job_end_to_end_with_the_ir_loaded_back(http, digits, tmp_path):
    """No steps: the target's precision is the compression. With a labelled eval dataset, int8 is NNCF's
    accuracy-controlled quantization; the IR is downloaded, unzipped and run as the report says, and the job's
    figures are checked against that."""
    from tests.stack import wait_for_job

    path, x, y = digits
    model = http.post("/v1/models", files={"file": ("digits-cnn.onnx", path.read_bytes())}).json()
    evaluation = http.post("/v1/datasets", files={"file": ("eval.npz", npz(images=x[100:], labels=y[100:]))})
    calibration = http.post("/v1/datasets", files={"file": ("calib.npz", npz(images=x[:100]))})
    assert evaluation.status_code == calibration.status_code == 201, evaluation.text
    # The worker registers what it serves once it is ready, which may be a moment after the API answers.
    deadline = time.monotonic() + 90
    while True:
        targets = http.get("/v1/targets").json()
        if any(t["runtime"] == "openvino" and t["precision"] == "int8" for t in targets["targets"]):
            break
        assert time.monotonic() < deadline, targets
        time.sleep(0.5)
    spec = {"model_id": model["id"],
            "target": {"runtime": "openvino", "device": "cpu", "precision": "int8", "max_accuracy_drop": 0.02,
                       "calibration_dataset_id": calibration.json()["id"]},
            "evaluate": {"batch_sizes": [1], "warmup": 2, "iterations": 12,
                         "eval_dataset_id": evaluation.json()["id"]}}
    created = http.post("/v1/jobs", json=spec)
    assert created.status_code == 202, created.text
    assert created.json()["queue"] == "openvino.cpu.int8"
    job = wait_for_job(http, created.json()["id"])
    assert job["status"] == "succeeded", job
    summary = job["summary"]
    assert summary["target"] == {"runtime": "openvino", "device": "cpu", "precision": "int8"} | {
        k: v for k, v in summary["target"].items() if k not in ("runtime", "device", "precision")}
    assert set(summary["runtime_speedup"]) == set(summary["compression_speedup"]) == {"1"}
    assert summary["speedup"]["1"] == pytest.approx(summary["runtime_speedup"]["1"] *
                                                    summary["compression_speedup"]["1"], rel=2e-3)
    report = http.get(f"/v1/jobs/{job['id']}/report").json()
    lowering = report["target"]["lowering"]
    assert lowering["nncf"]["mode"] == "accuracy_control" and lowering["nncf"]["calibration"].startswith("dataset")
    assert [s["method"] for s in report["steps"]] == ["lower.openvino"]
    names = {a["name"] for a in http.get(f"/v1/jobs/{job['id']}/artifacts").json()}
    assert "model_openvino.zip" in names and "model.onnx" not in names
    archive = tmp_path / "model_openvino.zip"
    archive.write_bytes(http.get(f"/v1/jobs/{job['id']}/artifacts/model_openvino.zip").content)
    out, _ = run_ir_as_a_user_would(archive, tmp_path / "user", x[100:])
    original = (reference(path, x[100:]).argmax(1) == y[100:]).mean()
    accuracy = summary["accuracy"]
    assert accuracy["original_top1"] == pytest.approx(original, abs=1e-6)
    # the job measured what the user downloads: the same top-1 on the same samples
    assert accuracy["compressed_top1"] == pytest.approx((out.argmax(1) == y[100:]).mean(), abs=1e-6)
    assert accuracy["original_top1"] - accuracy["compressed_top1"] <= 0.02 + 1e-9
    rows = http.get(f"/v1/jobs/{job['id']}/measurements", params={"metric": "p50_ms"}).json()["items"]
    assert {r["model_role"] for r in rows} == {"baseline", "runtime", "result"}
    assert {r["provider"] for r in rows} == {"OpenVINO CPU (int8)"}
