"""The LiteRT target end to end through the session's `modelpress run` service (its worker advertises the litert
targets where ai-edge-litert and onnx2tf are installed): a full-integer int8 job on the digits CNN, its .tflite
downloaded and run as the report says, the job's figures checked against that run; and the submit-time refusal of
int8 without samples, which creates nothing. The exporter itself is tested in tests/workers/test_litert.py."""
from __future__ import annotations

import time

import onnxruntime as ort
import pytest

from tests.helpers import digits_cnn_file, npz_bytes, queued_messages

pytest.importorskip("ai_edge_litert")
pytest.importorskip("onnx2tf")

INT8 = {"runtime": "litert", "device": "cpu", "precision": "int8"}


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return digits_cnn_file(tmp_path_factory.mktemp("digits"))


def upload(http, route: str, name: str, content: bytes) -> str:
    resp = http.post(route, files={"file": (name, content)})
    assert resp.status_code == 201, resp.text
    return resp.json()["id"]


def wait_until_served(http, key: str, timeout: float = 90) -> None:
    """The worker registers what it serves once it is ready, which may be a moment after the API answers."""
    deadline = time.monotonic() + timeout
    while True:
        targets = http.get("/v1/targets").json()["targets"]
        if any((t["runtime"], t["device"], t["precision"]) == tuple(key.split(".")) for t in targets):
            return
        assert time.monotonic() < deadline, targets
        time.sleep(0.5)


def test_a_litert_int8_job_end_to_end_with_the_tflite_run_as_the_report_says(http, digits, tmp_path):
    """No steps: the export's precision is the compression. Calibrated on 100 digits, measured on the other 297
    with their labels; the downloaded model.tflite gives the top-1 the job reports, within a point of the
    original's."""
    from ai_edge_litert.interpreter import Interpreter

    from tests.stack import wait_for_job

    path, x, y = digits
    model_id = upload(http, "/v1/models", "digits-cnn.onnx", path.read_bytes())
    eval_id = upload(http, "/v1/datasets", "eval.npz", npz_bytes(images=x[100:], labels=y[100:]))
    calibration_id = upload(http, "/v1/datasets", "calib.npz", npz_bytes(images=x[:100]))
    wait_until_served(http, "litert.cpu.int8")
    created = http.post("/v1/jobs", json={
        "model_id": model_id, "target": INT8 | {"calibration_dataset_id": calibration_id},
        "evaluate": {"batch_sizes": [1], "warmup": 2, "iterations": 12, "eval_dataset_id": eval_id}})
    assert created.status_code == 202, created.text
    assert created.json()["queue"] == "litert.cpu.int8"
    job = wait_for_job(http, created.json()["id"], timeout=600)
    assert job["status"] == "succeeded", job
    summary = job["summary"]
    assert {k: summary["target"][k] for k in INT8} == INT8
    assert set(summary["runtime_speedup"]) == set(summary["compression_speedup"]) == {"1"}
    assert summary["speedup"]["1"] == pytest.approx(summary["runtime_speedup"]["1"] *
                                                    summary["compression_speedup"]["1"], rel=2e-3)

    report = http.get(f"/v1/jobs/{job['id']}/report").json()
    assert [s["method"] for s in report["steps"]] == ["lower.litert"]
    export = report["target"]["export"]
    assert export["precision"] == "int8" and export["calibration"]["samples"] == 100
    assert export["calibration"]["on"].startswith("dataset")
    assert export["precisions"]["int8"]["operators"]["QUANTIZE"] == 1  # full-integer: float only at the edges
    names = {a["name"] for a in http.get(f"/v1/jobs/{job['id']}/artifacts").json()}
    assert "model.tflite" in names and "model.onnx" not in names

    downloaded = tmp_path / "model.tflite"
    downloaded.write_bytes(http.get(f"/v1/jobs/{job['id']}/artifacts/model.tflite").content)
    runner = Interpreter(model_path=str(downloaded), num_threads=1).get_signature_runner()
    got = runner(images=x[100:])["output_0"]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"images": x[100:]})[0]
    assert got.shape == expected.shape == (297, 10)
    accuracy = summary["accuracy"]
    assert accuracy["original_top1"] == pytest.approx((expected.argmax(1) == y[100:]).mean(), abs=1e-6)
    # the job measured what the user downloads: the same top-1 on the same samples
    assert accuracy["compressed_top1"] == pytest.approx((got.argmax(1) == y[100:]).mean(), abs=1e-6)
    assert accuracy["original_top1"] - accuracy["compressed_top1"] <= 0.01 + 1e-9

    rows = http.get(f"/v1/jobs/{job['id']}/measurements", params={"metric": "p50_ms"}).json()["items"]
    assert {r["model_role"] for r in rows} == {"baseline", "runtime", "result"}
    assert {r["provider"] for r in rows} == {"LiteRT CPU (int8)"}
    assert all(r["value"] > 0 for r in rows)


def test_int8_without_samples_is_refused_at_submit_and_creates_nothing(http, service, digits):
    """Full-integer int8 fixes every activation's range from real samples: with neither a calibration nor an eval
    dataset, 422 calibration_required before any job row or queued message exists."""
    path, _, _ = digits
    model_id = upload(http, "/v1/models", "digits-cnn.onnx", path.read_bytes())

    def jobs() -> set[str]:
        return {j["id"] for j in http.get("/v1/jobs", params={"limit": 200}).json()["items"]}

    broker = service["tmp"] / "data"
    before, queued = jobs(), queued_messages(broker)
    for evaluate in ({}, {"batch_sizes": [1], "warmup": 1, "iterations": 4}):
        resp = http.post("/v1/jobs", json={"model_id": model_id, "target": INT8, "evaluate": evaluate})
        assert resp.status_code == 422, resp.text
        problem = resp.json()
        assert (problem["code"], problem["field"]) == ("calibration_required", "target.calibration_dataset_id")
        assert "calibration_dataset_id" in problem["detail"]
    assert jobs() == before
    assert queued_messages(broker) == queued
