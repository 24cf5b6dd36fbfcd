"""The typed, versioned report (app.reports) and the measurement's spec object (workers.measure.spec).

tests/data/report_v1.json is a real job (two steps, an eval dataset with labels) as the code before
versioning wrote it: its report and its job JSON, captured through the API."""
from __future__ import annotations

import copy
import io
import json
from pathlib import Path

import numpy as np
import pytest
from pydantic import TypeAdapter, ValidationError

from app.db import session_scope
from app.dbmodels import Job
from app.reports import REPORT_VERSION, AnySummary, ConversionReport, JobReport, Verdict, load_report
from workers.measure.spec import MeasureSpec
from workers.supervise import run_job

V1 = json.loads((Path(__file__).parent / "data" / "report_v1.json").read_text())
FAST = {"batch_sizes": [1, 4], "warmup": 1, "iterations": 4}  # as the captured job


def npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def keys(value, prefix=""):
    """Every key path of a JSON document (list items merged), to compare structures whose figures differ."""
    found = set()
    if isinstance(value, dict):
        for key, inner in value.items():
            found |= {f"{prefix}/{key}"} | keys(inner, f"{prefix}/{key}")
    elif isinstance(value, list):
        for inner in value:
            found |= keys(inner, prefix + "[]")
    return found


@pytest.fixture
def finished_job(client, alice, mlp_onnx) -> tuple[str, dict]:
    """A job run now (two steps, an eval dataset with labels), its id and its job JSON."""
    model_id = client.post("/v1/models", files={"file": ("mlp.onnx", mlp_onnx)}, headers=alice).json()["id"]
    rng = np.random.default_rng(0)
    data = client.post("/v1/datasets", headers=alice, files={"file": ("d.npz", npz(
        features=rng.standard_normal((24, 64)).astype(np.float32), labels=rng.integers(0, 10, 24)))})
    assert data.status_code in (200, 201), data.text
    steps = [{"method": "prune.magnitude", "params": {"sparsity": 0.5}}, {"method": "quantize.int8_dynamic"}]
    resp = client.post("/v1/jobs", headers=alice, json={
        "model_id": model_id, "steps": steps, "evaluate": FAST | {"eval_dataset_id": data.json()["id"]}})
    assert resp.status_code == 202, resp.text
    job_id = resp.json()["id"]
    run_job(job_id)
    job = client.get(f"/v1/jobs/{job_id}", headers=alice).json()
    assert job["status"] == "succeeded", job
    return job_id, job


def test_a_stored_version_1_report_loads_as_version_1_and_serves_unchanged(client, alice, finished_job):
    job_id, _ = finished_job
    loaded = load_report(copy.deepcopy(V1["report"]))
    assert isinstance(loaded, JobReport) and loaded.report_version == 1
    assert loaded.summary.accuracy is not None and loaded.summary.trajectory is not None
    assert loaded.model_dump(mode="json") == V1["report"]  # no key added, none dropped, no value changed
    with session_scope() as db:  # the row as the code before versioning left it
        job = db.get(Job, job_id)
        job.report, job.summary = copy.deepcopy(V1["report"]), copy.deepcopy(V1["job"]["summary"])
    served = client.get(f"/v1/jobs/{job_id}/report", headers=alice)
    assert served.status_code == 200
    assert served.json() == V1["report"]
    assert "report_version" not in served.json()
    assert client.get(f"/v1/jobs/{job_id}", headers=alice).json()["summary"] == V1["job"]["summary"]


def test_a_new_report_is_version_2_with_the_fields_of_version_1(client, alice, finished_job):
    job_id, job = finished_job
    report = client.get(f"/v1/jobs/{job_id}/report", headers=alice).json()
    assert report["report_version"] == REPORT_VERSION == 2
    assert isinstance(load_report(report), JobReport)
    # The same fields as before (the dashboard reads them); added: report_version, the worst sample's cosine, the
    # budget in evaluate, and the verdict and Pareto front with what they read. Figures differ per run.
    verdicts = ("/verdict", "/pareto", "/summary/verdict", "/summary/speedup_interval")
    # The replay recipe (workers.replay) is a part of its own, tested in tests/api/test_replay.py.
    assert {"/recipe/digest", "/recipe/provenance/model/sha256", "/recipe/libraries/onnxruntime"} <= keys(report)
    added = {k for k in keys(report) - keys(V1["report"]) if not k.startswith("/recipe")}
    assert {k for k in added if not k.startswith(verdicts)} == {
        "/report_version", "/measurement/fidelity/worst_sample_cosine",
        "/measurement/dataset/fidelity/worst_sample_cosine", "/evaluate/objective", "/evaluate/objective_batch_size",
        "/evaluate/min_cosine", "/evaluate/max_accuracy_drop", "/summary/trajectory[]/worst_cosine",
        "/summary/trajectory[]/energy_j"}
    assert {"/verdict/verdict", "/verdict/reason", "/verdict/checks[]/passed", "/verdict/budget/min_cosine",
            "/pareto[]/on_front", "/pareto[]/dominated_by", "/summary/speedup_interval/1/low"} <= added
    assert keys(V1["report"]) - keys(report) == set()
    assert {k for k in keys(job["summary"]) if not k.startswith(("/verdict", "/speedup_interval"))} == \
        keys(V1["job"]["summary"]) | {"/trajectory[]/worst_cosine", "/trajectory[]/energy_j"}
    assert job["summary"] == report["summary"] and report["verdict"] == job["summary"]["verdict"]
    assert [p["name"] for p in report["pareto"]] == ["original", "step 1 (prune.magnitude)",
                                                     "step 2 (quantize.int8_dynamic)"]
    stored = json.loads(client.get(f"/v1/jobs/{job_id}/artifacts/report.json", headers=alice).content)
    assert stored == report
    summary = job["summary"]
    assert summary["accuracy"]["samples"] == 24 and summary["fidelity_on"].endswith("(24 samples)")
    assert [t["method"] for t in summary["trajectory"]] == ["prune.magnitude", "quantize.int8_dynamic"]
    assert set(summary["speedup"]) == {"1", "4"}


def test_openapi_shows_the_report_and_summary_models(client):
    spec = client.get("/openapi.json").json()
    report = spec["paths"]["/v1/jobs/{job_id}/report"]["get"]["responses"]["200"]["content"]["application/json"]
    assert {r["$ref"] for r in report["schema"]["oneOf"]} == {"#/components/schemas/JobReport",
                                                              "#/components/schemas/ConversionReport"}
    schemas = spec["components"]["schemas"]
    assert "report_version" in schemas["JobReport"]["properties"]
    assert {"candidates", "verdict", "pareto"} <= set(schemas["JobReport"]["properties"])
    assert {"checks", "improvement", "budget"} <= set(schemas["Verdict"]["properties"])
    job = schemas.get("JobPublic") or schemas["JobPublic-Output"]
    assert "#/components/schemas/JobSummary" in json.dumps(job["properties"]["summary"])
    assert {"speedup", "size_ratio", "accuracy"} <= set(schemas["JobSummary"]["properties"])


def test_a_report_the_models_do_not_describe_still_serves_as_stored(client, alice, finished_job):
    job_id, _ = finished_job
    odd = {"job_id": job_id, "written_by": "a release that never existed"}
    with session_scope() as db:
        db.get(Job, job_id).report = odd
    assert client.get(f"/v1/jobs/{job_id}/report", headers=alice).json() == odd


def test_strict_where_the_report_does_not_vary():
    bad = copy.deepcopy(V1["report"])
    bad["summary"]["speedup"] = {"1": "fast"}
    with pytest.raises(ValidationError, match="speedup"):
        load_report(bad)
    missing = copy.deepcopy(V1["report"])
    del missing["measurement"]["latency"]["batch_sizes"][0]["speedup"]
    with pytest.raises(ValidationError, match="speedup"):
        load_report(missing)
    with pytest.raises(ValidationError):
        Verdict.model_validate({"verdict": "maybe", "reason": "?"})
    # Lenient where it varies: a method's own details and a provider's extra figures are kept as given.
    extra = copy.deepcopy(V1["report"])
    extra["steps"][0]["details"]["per_layer"] = {"fc1": 0.5}
    extra["measurement"]["providers"][0]["tensorrt_engine"] = {"version": "10"}
    assert load_report(extra).model_dump(mode="json") == extra


def test_a_conversion_report_has_its_own_model():
    report = {"report_version": 2, "job_id": "j1", "kind": "convert", "sandbox": {},
              "conversion": {"exporter": "tf2onnx", "task": None, "check": {"max_abs_diff": 1e-6}},
              "converted": {"artifact": "model.onnx", "format": "onnx", "inspection": {"inputs": []}},
              "summary": {"converted_format": "onnx", "converted_size_bytes": 1234, "task": None,
                          "exporter": "tf2onnx", "check": {"max_abs_diff": 1e-6}, "duration_s": 1.5},
              "artifacts": [{"name": "model.onnx", "kind": "model", "sha256": "ab", "size_bytes": 1234},
                            {"name": "report.json", "kind": "report"}]}
    loaded = load_report(report)
    assert isinstance(loaded, ConversionReport)
    assert loaded.model_dump(mode="json") == report
    summary = TypeAdapter(AnySummary).validate_python(report["summary"])
    assert type(summary).__name__ == "ConversionSummary"
    with pytest.raises(ValidationError):
        load_report(report | {"summary": {"converted_format": "onnx"}})


def test_measure_spec_travels_as_json_without_its_callbacks_and_dataset():
    spec = MeasureSpec(batch_sizes=[8, 1, 8], warmup=2, iterations=5, providers=["cpu"], threads=2,
                       dataset=object(), dataset_max_samples=10, include_io=True, energy_estimate_tdp_watts=65.0,
                       input_shapes={"dims": {"H": 48}}, on_progress=lambda f, m: None, should_stop=lambda: False)
    sent = spec.to_json()
    assert {"on_progress", "should_stop", "dataset"}.isdisjoint(sent)
    assert json.loads(json.dumps(sent)) == sent
    back = MeasureSpec.from_json(sent, should_stop=lambda: True)
    assert back.should_stop() is True and back.dataset is None and back.energy_estimate_tdp_watts == 65.0
    assert back.checked().batch_sizes == [1, 8]
    with pytest.raises(TypeError, match="not \\['threads'\\]"):
        MeasureSpec.from_json(sent, threads=3)
    for bad, words in (({"batch_sizes": [0]}, "positive"), ({"iterations": 0}, "iterations"),
                       ({"threads": -1}, "threads")):
        with pytest.raises(ValueError, match=words):
            MeasureSpec(**({"batch_sizes": [1], "warmup": 0, "iterations": 1} | bad)).checked()


def test_measure_pair_takes_a_spec_or_its_fields_not_both(tmp_path):
    from tests.workers.factories import linear_model, save
    from workers.measure import measure_pair

    path = save(linear_model(), tmp_path / "m.onnx")
    spec = MeasureSpec(batch_sizes=[2], warmup=0, iterations=2)
    by_spec = measure_pair(path, path, spec)
    assert [b["batch_size"] for b in by_spec["latency"]["batch_sizes"]] == [2]
    assert by_spec["latency"]["iterations"] == 2
    with pytest.raises(TypeError, match="not both"):
        measure_pair(path, path, spec, warmup=3)
