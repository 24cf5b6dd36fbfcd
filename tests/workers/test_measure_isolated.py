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


# --- one measuring process for many measurements (a goal search's candidates) ------------------------------------

def test_one_process_serves_many_measurements_with_the_same_report(mlp):
    from workers.measure import MeasureSpec
    from workers.measure.isolated import MeasuringProcess

    rng = np.random.default_rng(0)
    data = Dataset({"x": rng.standard_normal((8, 32)).astype(np.float32)}, labels=rng.integers(0, 10, 8))
    spec = MeasureSpec(batch_sizes=[1], warmup=1, iterations=4, dataset=data, memory=False)
    with MeasuringProcess() as measurer:
        reports = [measurer.measure(mlp, mlp, spec) for _ in range(3)]
        child = measurer.child
        assert child is not None and child.poll() is None
    assert child.wait(timeout=10) == 0  # closed with the block: no process left behind
    pids = {r["environment"]["process"]["pid"] for r in reports}
    assert len(pids) == 1 and os.getpid() not in pids
    assert "measurement 3, process 1" in reports[-1]["environment"]["process"]["how"]
    assert reports[0]["environment"]["pinned_cores"]
    assert all(r["dataset"]["accuracy"]["samples"] == 8 for r in reports)
    assert reports[0]["memory"]["baseline"] is None and "not asked for" in reports[0]["memory"]["reason"]
    assert not any("memory" in note for note in reports[0]["notes"])
    # The same measurement through a process of its own has the same keys, and memory where asked for.
    alone = measure_isolated(mlp, mlp, MeasureSpec(batch_sizes=[1], warmup=1, iterations=4, dataset=data))
    assert set(alone) == set(reports[0]) and alone["memory"]["baseline"]["peak_rss_increase_bytes"] > 0


def test_a_served_measurement_that_fails_or_stops_leaves_the_process_serving(mlp, tmp_path):
    from workers.measure import MeasureSpec
    from workers.measure.isolated import MeasuringProcess

    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"\x08\x07\x12\x00not a graph")
    with MeasuringProcess() as measurer:
        with pytest.raises(MeasurementFailed) as caught:
            measurer.measure(broken, broken, MeasureSpec(batch_sizes=[1], warmup=0, iterations=2))
        assert caught.value.code == "measurement_failed"
        with pytest.raises(Stopped):
            measurer.measure(mlp, mlp, MeasureSpec(batch_sizes=[1], warmup=0, iterations=200_000,
                                                   should_stop=lambda: True))
        report = measurer.measure(mlp, mlp, MeasureSpec(batch_sizes=[1], warmup=0, iterations=2, memory=False))
        assert measurer.started == 1 and "measurement 3, process 1" in report["environment"]["process"]["how"]


def test_a_served_process_that_dies_is_explained_and_replaced(mlp):
    import threading

    from workers.measure import MeasureSpec
    from workers.measure.isolated import MeasuringProcess

    with MeasuringProcess() as measurer:
        first = measurer.measure(mlp, mlp, MeasureSpec(batch_sizes=[1], warmup=0, iterations=2, memory=False))
        pid = first["environment"]["process"]["pid"]
        killer = threading.Timer(1.0, os.kill, (pid, signal.SIGKILL))
        killer.start()
        try:
            with pytest.raises(MeasurementFailed) as caught:
                measurer.measure(mlp, mlp, MeasureSpec(batch_sizes=[1], warmup=0, iterations=5_000_000))
        finally:
            killer.cancel()
        assert caught.value.code == "measurement_crashed" and "killed by SIGKILL" in caught.value.message
        again = measurer.measure(mlp, mlp, MeasureSpec(batch_sizes=[1], warmup=0, iterations=2, memory=False))
        assert again["environment"]["process"]["pid"] != pid and measurer.started == 2


def test_a_served_measurement_over_its_limit_stops_the_process(mlp):
    from workers.measure import MeasureSpec
    from workers.measure.isolated import MeasuringProcess

    with MeasuringProcess() as measurer:
        with pytest.raises(MeasurementFailed) as caught:
            measurer.measure(mlp, mlp, MeasureSpec(batch_sizes=[1], warmup=0, iterations=5_000_000), timeout_s=2)
        assert caught.value.code == "measurement_timeout"
        assert measurer.child is None  # killed, not left running; the next measurement starts another
        assert measurer.measure(mlp, mlp, MeasureSpec(batch_sizes=[1], warmup=0, iterations=2, memory=False))
