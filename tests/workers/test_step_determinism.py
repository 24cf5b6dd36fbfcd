"""A step repeats itself byte for byte (issue 21, part 3): what makes a replay of a CPU job come out byte-identical
is a property of the methods, so it is tested here, in this process, for every method a replay promises it of
(calibrated quantization, pruning with fine-tuning, distillation, clustering, and dynamic quantization). Each
case runs what a job's process runs before its measurement twice on the same inputs: the upload normalized
(workers.intake), then workers.steps.run_method with the step's seed (step 1: seed 1, as workers.steps.execute
gives it); the two output models must have one sha256. Between the two runs the global generators are left
where the first run put them, so only the step's own seeding can make the second run repeat the first.
tests/api/test_replay.py keeps what needs the production stack: the recipe, replays through the API, the
comparison, the refusals, the client and the CLI."""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from app.store import file_sha256
from tests.helpers import clear_caches, digits_classifier
from tests.methods.factories import npz

TRAIN = {"epochs": 2, "lr": 2e-3, "batch_size": 32, "patience": None}
# The datasets a step names, by the id the job's spec would carry.
METHODS = {
    "quantize.int8_dynamic": {},
    "quantize.int8_static": {"calibration_dataset_id": "calibration"},
    "prune.channels": {"ratio": 0.5, "train_dataset_id": "train", **TRAIN},
    "distill.kd": {"student": "width", "width_ratio": 0.5, "train_dataset_id": "train", **TRAIN},
    "cluster.kmeans": {"clusters": 16},
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The digits CNN and its train, calibration and eval datasets as files, as the worker lays them out for a
    job's process (the same files tests/api/test_replay.py uploads)."""
    onnx_bytes, x, y = digits_classifier("cnn")
    folder = tmp_path_factory.mktemp("determinism-inputs")
    (folder / "model.onnx").write_bytes(onnx_bytes)
    files = {"train": npz(images=x[:200], labels=y[:200]), "calibration": npz(images=x[:64]),
             "eval": npz(images=x[200:360], labels=y[200:360])}
    datasets = {}
    for role, content in files.items():
        path = folder / f"{role}.npz"
        path.write_bytes(content)
        datasets[role] = (str(path), "npz", f"{role}.npz")
    return {"model": folder / "model.onnx", "datasets": datasets}


@pytest.fixture(autouse=True)
def settings(tmp_path, monkeypatch):
    """Settings of a data folder of this test's own (the datasets' unpacking limits come from them)."""
    monkeypatch.setenv("MODELPRESS_DATA_DIR", str(tmp_path / "data"))
    clear_caches()
    yield
    clear_caches()


def run_step(inputs: dict, folder: Path, method: str, params: dict) -> tuple[str, str]:
    """One job's work up to its measurement in `folder`: (sha256 of the normalized upload, sha256 of the
    step's output model)."""
    from workers.intake import normalize
    from workers.steps import JobRun, _input_shapes, run_method

    folder.mkdir()
    messages: list[dict] = []
    run = JobRun(job_id="determinism", folder=folder, send=messages.append, stop_file=folder / "stop",
                 datasets=inputs["datasets"])
    step = {"method": method, "params": params}
    spec = {"steps": [step], "evaluate": {"batch_sizes": [1], "warmup": 1, "iterations": 4,
                                          "eval_dataset_id": "eval"}}
    workdir = folder / "work"
    (workdir / "input").mkdir(parents=True)
    original = Path(shutil.copy(inputs["model"], workdir / "input" / "model.onnx"))
    input_shapes = _input_shapes(run, spec)
    intake = normalize(original, batch=1, input_shapes=input_shapes)
    out_dir = workdir / "step-1"
    out_dir.mkdir()
    output, _ = run_method(run, step, intake.path, out_dir, workdir, input_shapes, seed=1, label="step 1",
                           progress=lambda fraction, message, milestone=False: None)
    return file_sha256(intake.path), file_sha256(output.model_path)


@pytest.mark.parametrize("method", list(METHODS))
def test_a_step_run_twice_with_the_jobs_seed_writes_the_same_model_bytes(inputs, tmp_path, method):
    params = METHODS[method]
    first = run_step(inputs, tmp_path / "first", method, params)
    second = run_step(inputs, tmp_path / "second", method, params)
    assert first[0] == second[0], "the normalized upload differs between two runs"
    assert first[1] == second[1], f"{method} wrote other model bytes on the second run with the same seed"
    # The step did something: its model is not the normalized upload passed through.
    assert first[1] != first[0]
    assert first[1] != hashlib.sha256(inputs["model"].read_bytes()).hexdigest()
