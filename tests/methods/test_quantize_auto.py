"""quantize.auto: candidates built and judged on the eval dataset, the best within budget kept, every one reported."""
from __future__ import annotations

import io

import numpy as np
import onnx
import pytest
from pydantic import ValidationError

from app.errors import StepFailed
from tests.helpers import digits_classifier
from workers import methods
from workers.datasets import Dataset
from workers.supervise import run_job

AUTO = "quantize.auto"
QUICK = {"latency_iterations": 5, "eval_max_samples": 64}


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    onnx_bytes, x, y = digits_classifier("mlp")
    path = tmp_path_factory.mktemp("auto") / "digits.onnx"
    path.write_bytes(onnx_bytes)
    return path, Dataset({"features": x}, labels=y, name="digits")


def run_auto(path, data, tmp_path, **params):
    method = methods.get(AUTO)
    ctx = methods.StepContext(datasets={"eval_dataset_id": data})
    return method.run(path, method.params_model.model_validate({"eval_dataset_id": "d"} | QUICK | params),
                      tmp_path / "out", ctx)


def test_smallest_within_budget_is_chosen_and_every_candidate_reported(digits, tmp_path):
    path, data = digits
    out = run_auto(path, data, tmp_path, max_accuracy_drop=2.0, objective="size",
                   schemes=["int8_dynamic", "fp16"])
    details = out.details
    by_label = {c["label"]: c for c in details["candidates"]}
    assert set(by_label) == {"int8_dynamic", "fp16"}
    for candidate in by_label.values():
        assert candidate["status"] == "measured" and candidate["within_budget"]
        assert candidate["accuracy"]["original_top1"] > 0.9
        assert candidate["p50_ms"]["original"] > 0 and candidate["speedup"] > 0
    # int8 is about a quarter of fp32, fp16 about a half: the smallest wins.
    assert by_label["int8_dynamic"]["size_ratio"] < by_label["fp16"]["size_ratio"] < 0.6
    assert details["chosen"] == "int8_dynamic"
    assert out.model_path.stat().st_size == by_label["int8_dynamic"]["size_bytes"]
    onnx.checker.check_model(str(out.model_path))


def test_unreachable_budget_searches_exclusions_then_returns_the_original(digits, tmp_path):
    path, data = digits
    out = run_auto(path, data, tmp_path, min_cosine=1.0, schemes=["int8_dynamic"], max_excluded_layers=2)
    candidates = out.details["candidates"]
    assert candidates[0]["label"] == "int8_dynamic" and not candidates[0]["within_budget"]
    assert "mean cosine" in candidates[0]["reason"]
    ranking = candidates[0]["most_sensitive_layers"]
    assert ranking and {"node", "error", "added_error"} <= ranking[0].keys()
    assert [c["label"] for c in candidates[1:]] == ["int8_dynamic (1 layer(s) in float)",
                                                     "int8_dynamic (2 layer(s) in float)"]
    assert candidates[1]["excluded_layers"] == [ranking[0]["node"]]
    assert out.details["chosen"] is None
    assert "no candidate met the budget" in " ".join(out.details["warnings"])
    assert out.model_path.read_bytes() == path.read_bytes()


def test_budget_is_required_and_accuracy_needs_labels(digits, tmp_path):
    path, data = digits
    with pytest.raises(ValidationError, match="give a budget"):
        methods.get(AUTO).params_model.model_validate({"eval_dataset_id": "d"})
    with pytest.raises(StepFailed) as info:
        run_auto(path, Dataset(data.inputs, name="no labels"), tmp_path, max_accuracy_drop=1.0)
    assert info.value.code == "needs_labels"


def test_auto_through_the_api_links_its_eval_dataset(client, alice, digits):
    path, data = digits
    model = client.post("/v1/models", files={"file": ("digits.onnx", path.read_bytes())}, headers=alice).json()
    buf = io.BytesIO()
    np.savez(buf, features=data.inputs["features"][:64], labels=data.labels[:64])
    dataset = client.post("/v1/datasets", files={"file": ("eval.npz", buf.getvalue())}, headers=alice).json()
    step = {"method": AUTO, "params": {"eval_dataset_id": dataset["id"], "min_cosine": 0.99, "objective": "size",
                                       "schemes": ["int8_dynamic"]} | QUICK}
    job = client.post("/v1/jobs", json={"model_id": model["id"], "steps": [step],
                                        "evaluate": {"batch_sizes": [1], "warmup": 1, "iterations": 3,
                                                     "eval_dataset_id": dataset["id"]}}, headers=alice)
    assert job.status_code == 202, job.text
    run_job(job.json()["id"])
    done = client.get(f"/v1/jobs/{job.json()['id']}", headers=alice).json()
    assert done["status"] == "succeeded", done
    report = client.get(f"/v1/jobs/{job.json()['id']}/report", headers=alice).json()
    details = report["steps"][0]["details"]
    assert details["chosen"] == "int8_dynamic" and details["eval_samples"] == 64
    assert done["summary"]["size_ratio"] < 0.5


def test_a_candidate_must_be_clearly_faster_to_win_on_latency():
    from workers.quantize.auto import MIN_SPEEDUP, _choose

    params = methods.get(AUTO).params_model.model_validate({"eval_dataset_id": "d", "min_cosine": 0.9})
    noise = {"label": "fp16", "within_budget": True, "speedup": 1.01, "size_bytes": 50, "size_ratio": 0.5}
    assert _choose([noise], params) is None
    clear = {"label": "int8", "within_budget": True, "speedup": MIN_SPEEDUP + 0.5, "size_bytes": 30, "size_ratio": 0.3}
    over = {"label": "int4", "within_budget": False, "speedup": 3.0, "size_bytes": 10, "size_ratio": 0.1}
    assert _choose([noise, clear, over], params)["label"] == "int8"
    by_size = params.model_copy(update={"objective": "size"})
    assert _choose([noise, clear, over], by_size)["label"] == "int8"  # int4 is out of budget
