"""Measurements in a fresh, pinned child process: the same report, the child's environment, and every way
the child can end (stopped, failed, killed, too slow) turned into a clear error for the job."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest

from app.errors import MeasurementFailed
from tests.workers.factories import linear_model, save
from workers.datasets import Dataset
from workers.measure import Stopped
from workers.measure.isolated import _outcome, measure_isolated


@pytest.fixture(scope="module")
def mlp(tmp_path_factory) -> Path:
    return save(linear_model(), tmp_path_factory.mktemp("isolated") / "mlp.onnx")


def test_measures_in_a_pinned_child_with_the_dataset(mlp):
    rng = np.random.default_rng(0)
    data = Dataset({"x": rng.standard_normal((20, 32)).astype(np.float32)},
                   labels=rng.integers(0, 10, 20), name="twenty rows")
    seen: list[float] = []
    report = measure_isolated(mlp, mlp, batch_sizes=[1, 2], warmup=1, iterations=6, dataset=data,
                              on_progress=lambda f, _m: seen.append(f))
    process = report["environment"]["process"]
    assert process["isolated"] is True and process["pid"] != os.getpid()
    pinned = report["environment"]["pinned_cores"]
    assert pinned and set(pinned) <= os.sched_getaffinity(0) and len(pinned) == report["environment"]["threads"]
    assert [b["batch_size"] for b in report["latency"]["batch_sizes"]] == [1, 2]
    assert report["dataset"]["accuracy"]["samples"] == 20
    assert report["dataset"]["accuracy"]["original"]["top1"] == report["dataset"]["accuracy"]["compressed"]["top1"]
    assert report["samples"]["providers"]["CPUExecutionProvider"]["2"]["baseline"]
    assert seen and seen == sorted(seen) and seen[-1] == pytest.approx(1.0)


def test_a_stop_request_reaches_the_child(mlp):
    asked = []

    def should_stop() -> bool:
        asked.append(1)
        return True

    with pytest.raises(Stopped):
        measure_isolated(mlp, mlp, batch_sizes=[1], warmup=0, iterations=200_000, should_stop=should_stop)
    assert asked


def test_a_measurement_over_its_time_limit_is_stopped(mlp):
    with pytest.raises(MeasurementFailed) as caught:
        measure_isolated(mlp, mlp, batch_sizes=[1], warmup=0, iterations=5_000_000, timeout_s=3)
    assert caught.value.code == "measurement_timeout" and "limit of 3 s" in caught.value.message


def test_a_model_the_runtime_rejects_fails_with_its_words(tmp_path):
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"\x08\x07\x12\x00not a graph")
    with pytest.raises(MeasurementFailed) as caught:
        measure_isolated(broken, broken, batch_sizes=[1], warmup=0, iterations=2)
    assert caught.value.code == "measurement_failed"


def test_a_killed_child_is_explained(tmp_path):
    errors = tmp_path / "stderr.txt"
    errors.write_text("loading\nonnxruntime: allocating 40 GB\n")
    with pytest.raises(MeasurementFailed) as caught:
        _outcome(-signal.SIGKILL, tmp_path, errors)
    assert caught.value.code == "measurement_crashed"
    assert "killed by SIGKILL" in caught.value.message and "ran out of memory" in caught.value.message
    assert "allocating 40 GB" in caught.value.message
    with pytest.raises(MeasurementFailed, match="exited with status 1"):
        _outcome(1, tmp_path, errors)
