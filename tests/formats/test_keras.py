"""Keras models (issue 16 item 6): `.keras` files and SavedModel zips go in through the API, are converted to ONNX
by the worker (tf2onnx, Keras safe_mode) and compressed like any upload; Python code in a model is refused with
its code at upload and nothing is kept."""
from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from app.dbmodels import Blob, Job, Model  # noqa: E402
from app.errors import JobFailed  # noqa: E402
from tests.helpers import REDIS_URL, redis_or_skip, row_count, store_files, tmp_leftovers  # noqa: E402
from tests.stack import production_stack, wait_for_job  # noqa: E402
from workers import convert  # noqa: E402
from workers.supervise import run_job  # noqa: E402

FAST = {"batch_sizes": [1], "warmup": 1, "iterations": 4}


def small_cnn(seed: int = 0) -> keras.Model:
    """Conv2D + pooling + Dense, the shape of a TF Model Optimization tutorial's MNIST model."""
    keras.utils.set_random_seed(seed)
    image = keras.Input((12, 12, 1), name="image")
    x = keras.layers.Conv2D(4, 3, activation="relu", name="conv")(image)
    x = keras.layers.MaxPooling2D(name="pool")(x)
    x = keras.layers.Flatten(name="flat")(x)
    x = keras.layers.Dense(16, activation="relu", name="hidden")(x)
    logits = keras.layers.Dense(10, name="logits")(x)
    return keras.Model(image, logits, name="small_cnn")


def keras_bytes(model: keras.Model, tmp_path: Path, name: str = "model.keras") -> bytes:
    path = tmp_path / name
    model.save(path)
    return path.read_bytes()


def savedmodel_zip(model: keras.Model, tmp_path: Path, *, folder: str = "exported") -> bytes:
    target = tmp_path / "sm" / folder
    model.export(str(target), format="tf_saved_model", verbose=False)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        for path in sorted(target.rglob("*")):
            if path.is_file():
                archive.write(path, str(path.relative_to(target.parent)))
    return buf.getvalue()


def upload(client, headers, data: bytes, filename: str):
    return client.post("/v1/models", files={"file": (filename, data)}, headers=headers)


def convert_upload(client, headers, model: dict) -> dict:
    run_job(model["conversion"]["job_id"])
    return client.get(f"/v1/models/{model['id']}", headers=headers).json()


def assert_nothing_left(data_dir: Path) -> None:
    assert row_count(Model) == 0 and row_count(Job) == 0 and row_count(Blob) == 0
    assert store_files(data_dir) == [] and tmp_leftovers(data_dir) == []


def onnx_session(content: bytes):
    import onnxruntime as ort

    return ort.InferenceSession(content, providers=["CPUExecutionProvider"])


# --- end to end ---------------------------------------------------------------------------------------------


def test_keras_file_converts_on_the_worker_and_compresses_end_to_end(client, alice, tmp_path):
    model = small_cnn()
    resp = upload(client, alice, keras_bytes(model, tmp_path), "mnist.keras")
    assert resp.status_code == 201, resp.text
    source = resp.json()
    assert source["format"] == "keras"
    inspection = source["inspection"]
    assert inspection["layers"] == 5 and inspection["model_class"] == "Functional"
    assert inspection["inputs"] == [{"name": "image", "dtype": "float32", "shape": [None, 12, 12, 1]}]
    assert inspection["outputs"] == ["logits"] and inspection["layer_histogram"]["Dense"] == 2
    assert source["conversion"]["status"] == "queued"

    source = convert_upload(client, alice, source)
    assert source["conversion"]["status"] == "succeeded", source["conversion"]["error"]["message"]
    converted = client.get(f"/v1/models/{source['conversion']['converted_model_id']}", headers=alice).json()
    assert converted["source_model_id"] == source["id"] and converted["format"] == "onnx"
    assert [i["name"] for i in converted["inspection"]["inputs"]] == ["image"]
    assert [o["name"] for o in converted["inspection"]["outputs"]] == ["logits"]
    check = converted["inspection"]["converted_from"]["check"]
    assert check["passed"] and check["max_abs_diff"]["logits"] <= check["atol"]
    assert converted["inspection"]["converted_from"]["exporter"].startswith("tf2onnx")

    # The downloaded ONNX model computes what Keras computes, on inputs and a batch the check did not use.
    content = client.get(f"/v1/models/{converted['id']}/download", headers=alice).content
    x = np.random.default_rng(7).normal(size=(5, 12, 12, 1)).astype(np.float32)
    got = onnx_session(content).run(None, {"image": x})[0]
    np.testing.assert_allclose(got, model.predict(x, verbose=0), atol=1e-4, rtol=1e-3)

    # A job on the upload's id runs on its converted model.
    spec = {"model_id": source["id"], "steps": [{"method": "quantize.int8_dynamic"}], "evaluate": FAST}
    job = client.post("/v1/jobs", json=spec, headers=alice)
    assert job.status_code == 202, job.text
    assert job.json()["model_id"] == converted["id"]
    run_job(job.json()["id"])
    job = client.get(f"/v1/jobs/{job.json()['id']}", headers=alice).json()
    assert job["status"] == "succeeded", job
    assert job["summary"]["size_ratio"] is not None


@pytest.mark.integration
def test_keras_upload_on_postgres_redis_and_a_real_worker(tmp_path, postgres_database, queue_prefix):
    """The production path: the API queues the conversion through Redis, a Celery worker converts the .keras
    file, and a compression job on the upload's id runs on the converted model."""
    import httpx

    redis_or_skip()
    model = small_cnn(seed=4)
    with production_stack(tmp_path, postgres_database, REDIS_URL, queue_prefix) as (base, keys):
        key = keys["acme"]
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=60) as http:
            resp = http.post("/v1/models", files={"file": ("cnn.keras", keras_bytes(model, tmp_path))})
            assert resp.status_code == 201, resp.text
            source = resp.json()
            conversion = wait_for_job(http, source["conversion"]["job_id"])
            assert conversion["status"] == "succeeded", conversion
            source = http.get(f"/v1/models/{source['id']}").json()
            converted_id = source["conversion"]["converted_model_id"]
            job = http.post("/v1/jobs", json={"model_id": source["id"], "evaluate": FAST,
                                              "steps": [{"method": "quantize.int8_dynamic"}]}).json()
            assert job["model_id"] == converted_id
            job = wait_for_job(http, job["id"])
            assert job["status"] == "succeeded", job
            result = http.get(f"/v1/jobs/{job['id']}/artifacts/model.onnx").content
    x = np.random.default_rng(9).random((3, 12, 12, 1), dtype=np.float32)
    quantized = onnx_session(result).run(None, {"image": x})[0]
    # int8 weights: the same predictions as Keras, to quantization's accuracy.
    np.testing.assert_allclose(quantized, model.predict(x, verbose=0), atol=0.05)


def test_sequential_model_keeps_its_input_and_output_names(client, alice, tmp_path):
    keras.utils.set_random_seed(1)
    seq = keras.Sequential([keras.Input((6,), name="features"), keras.layers.Dense(8, activation="tanh"),
                            keras.layers.BatchNormalization(), keras.layers.Dense(3, name="scores")])
    source = upload(client, alice, keras_bytes(seq, tmp_path, "seq.keras"), "seq.keras").json()
    assert source["inspection"]["outputs"] == ["scores"]
    source = convert_upload(client, alice, source)
    assert source["conversion"]["status"] == "succeeded", source["conversion"]["error"]["message"]
    converted = client.get(f"/v1/models/{source['conversion']['converted_model_id']}", headers=alice).json()
    content = client.get(f"/v1/models/{converted['id']}/download", headers=alice).content
    session = onnx_session(content)
    assert [o.name for o in session.get_outputs()] == ["scores"]
    x = np.random.default_rng(3).random((4, 6), dtype=np.float32)
    np.testing.assert_allclose(session.run(None, {"features": x})[0], seq.predict(x, verbose=0), atol=1e-4, rtol=1e-3)


def test_savedmodel_zip_converts_and_matches_tensorflow(client, alice, tmp_path):
    model = small_cnn(seed=2)
    resp = upload(client, alice, savedmodel_zip(model, tmp_path), "exported.zip")
    assert resp.status_code == 201, resp.text
    source = resp.json()
    assert source["format"] == "savedmodel-zip"
    assert source["inspection"]["signature"] == "serving_default" and source["inspection"]["folder"] == "exported"
    assert source["inspection"]["inputs"] == [{"name": "image", "dtype": "float32", "shape": [None, 12, 12, 1]}]
    assert source["inspection"]["op_histogram"]["Conv2D"] == 1
    source = convert_upload(client, alice, source)
    assert source["conversion"]["status"] == "succeeded", source["conversion"]["error"]["message"]
    converted = client.get(f"/v1/models/{source['conversion']['converted_model_id']}", headers=alice).json()
    assert converted["inspection"]["converted_from"]["source_format"] == "savedmodel-zip"
    content = client.get(f"/v1/models/{converted['id']}/download", headers=alice).content
    x = np.random.default_rng(5).random((2, 12, 12, 1), dtype=np.float32)
    np.testing.assert_allclose(onnx_session(content).run(None, {"image": x})[0], model.predict(x, verbose=0),
                               atol=1e-4, rtol=1e-3)


def tf_keras_file(model: keras.Model, tmp_path: Path) -> bytes:
    """The .keras file tf_keras 2 (what TF Model Optimization trains with) writes for `model`: the same layers,
    its model class under tf_keras' module and a 2.x version (checked against a file tf_keras 2.21 wrote)."""
    good = keras_bytes(model, tmp_path, "k3.keras")
    with zipfile.ZipFile(io.BytesIO(good)) as archive:
        config = json.loads(archive.read("config.json"))
    config["module"], config["registered_name"] = "tf_keras.src.engine.functional", "Functional"
    metadata = {"keras_version": "2.21.0", "date_saved": "2026-12-04@20:47:58"}
    return _rezip(good, {"config.json": json.dumps(config).encode(), "metadata.json": json.dumps(metadata).encode()})


def test_tf_keras_file_as_tf_model_optimization_writes_it_converts(client, alice, tmp_path):
    model = small_cnn(seed=6)
    source = upload(client, alice, tf_keras_file(model, tmp_path), "pruned.keras").json()
    assert source["format"] == "keras" and source["inspection"]["keras_version"] == "2.21.0", source
    source = convert_upload(client, alice, source)
    assert source["conversion"]["status"] == "succeeded", source["conversion"]["error"]["message"]
    converted = client.get(f"/v1/models/{source['conversion']['converted_model_id']}", headers=alice).json()
    content = client.get(f"/v1/models/{converted['id']}/download", headers=alice).content
    x = np.random.default_rng(8).random((2, 12, 12, 1), dtype=np.float32)
    np.testing.assert_allclose(onnx_session(content).run(None, {"image": x})[0], model.predict(x, verbose=0),
                               atol=1e-4, rtol=1e-3)


def fake_quant_savedmodel(tmp_path: Path) -> Path:
    """A quantization-aware graph as TF Model Optimization exports it: fake-quant on input, weights, output."""
    rng = np.random.default_rng(11)
    weights = tf.constant(rng.normal(size=(8, 4)).astype(np.float32))

    class Module(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 8], tf.float32, name="x")])
        def serve(self, x):
            q = tf.quantization.fake_quant_with_min_max_vars(x, -1.0, 1.0)
            w = tf.quantization.fake_quant_with_min_max_vars(weights, -3.0, 3.0, narrow_range=True)
            return {"y": tf.quantization.fake_quant_with_min_max_vars(tf.matmul(q, w), -6.0, 6.0)}

    folder = tmp_path / "qat"
    module = Module()
    tf.saved_model.save(module, str(folder), signatures={"serving_default": module.serve})
    return folder


def test_quantization_aware_savedmodel_converts_to_qdq_within_one_step(tmp_path):
    import onnx

    folder = fake_quant_savedmodel(tmp_path)
    source = tmp_path / "qat.zip"
    with zipfile.ZipFile(source, "w") as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                archive.write(path, str(path.relative_to(folder)))
    out = tmp_path / "out"
    out.mkdir()
    result = convert.get("savedmodel-zip")(source, out, {})
    ops = {node.op_type for node in onnx.load(str(result.model_path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    check = result.details["check"]
    assert check["quantization_steps"]["y"] == pytest.approx(12.0 / 255, rel=1e-3)
    assert check["max_abs_diff"]["y"] <= check["quantization_steps"]["y"] * 1.001


# --- refusals at upload -------------------------------------------------------------------------------------


def test_lambda_layer_is_refused_at_upload_and_nothing_is_kept(client, alice, data_dir, tmp_path):
    inp = keras.Input((4,), name="x")
    hidden = keras.layers.Dense(4, name="d")(inp)
    out = keras.layers.Lambda(lambda t: t * 2.0, name="double")(hidden)
    resp = upload(client, alice, keras_bytes(keras.Model(inp, out), tmp_path), "lambda.keras")
    assert resp.status_code == 422, resp.text
    body = resp.json()
    assert body["code"] == "unsafe_layer_refused" and body["layer"] == "double"
    assert "Lambda" in body["detail"]
    assert_nothing_left(data_dir)


def test_lambda_nested_in_a_sub_model_is_refused_naming_it(client, alice, data_dir, tmp_path):
    block = keras.Sequential([keras.Input((4,)), keras.layers.Dense(4), keras.layers.Lambda(lambda t: -t, name="neg")],
                             name="block")
    inp = keras.Input((4,), name="x")
    model = keras.Model(inp, keras.layers.Dense(2)(block(inp)))
    resp = upload(client, alice, keras_bytes(model, tmp_path), "nested.keras")
    assert resp.status_code == 422 and resp.json()["code"] == "unsafe_layer_refused", resp.text
    assert resp.json()["layer"] == "neg"
    assert_nothing_left(data_dir)


@keras.saving.register_keras_serializable(package="userpkg")
class Scale(keras.layers.Layer):
    def call(self, x):
        return x * 3.0


def user_activation(x):
    return x * 0.5


@pytest.mark.parametrize("build,needle", [
    (lambda inp: Scale(name="scale")(keras.layers.Dense(3)(inp)), "userpkg>Scale"),
    (lambda inp: keras.layers.Dense(3, activation=user_activation, name="act")(inp), "user_activation"),
])
def test_custom_objects_are_refused_at_upload(client, alice, data_dir, tmp_path, build, needle):
    inp = keras.Input((4,), name="x")
    resp = upload(client, alice, keras_bytes(keras.Model(inp, build(inp)), tmp_path), "custom.keras")
    assert resp.status_code == 422, resp.text
    body = resp.json()
    assert body["code"] == "custom_object_refused" and body["object"] == needle
    assert_nothing_left(data_dir)


def _rezip(data: bytes, replace: dict[str, bytes | None]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w") as dst:
        for name in src.namelist():
            if name in replace:
                if replace[name] is not None:
                    dst.writestr(name, replace[name])
            else:
                dst.writestr(name, src.read(name))
    return out.getvalue()


@pytest.mark.parametrize("damage,code,needle", [
    (lambda good: good[: len(good) // 2], "invalid_model", "not a .keras file"),
    (lambda good: b"not a zip at all" * 10, "invalid_model", "not a .keras file"),
    (lambda good: _rezip(good, {"config.json": b"{not json"}), "invalid_model", "JSON"),
    (lambda good: _rezip(good, {"model.weights.h5": None}), "invalid_model", "no weights"),
    (lambda good: _rezip(good, {"model.weights.h5": b"\x80\x04pickle"}), "invalid_model", "HDF5"),
    (lambda good: _rezip(good, {"config.json": json.dumps([1, 2]).encode()}), "invalid_model", "config"),
    (lambda good: _rezip(good, {"metadata.json": None}), "invalid_model", "metadata.json"),
])
def test_corrupt_keras_files_are_refused(client, alice, data_dir, tmp_path, damage, code, needle):
    good = keras_bytes(small_cnn(), tmp_path)
    resp = upload(client, alice, damage(good), "broken.keras")
    assert resp.status_code == 422, resp.text
    assert resp.json()["code"] == code and needle in resp.json()["detail"], resp.json()
    assert_nothing_left(data_dir)


@pytest.mark.parametrize("filename,needle", [("model.h5", "save it as a .keras file"),
                                              ("saved_model.pb", "zip the whole SavedModel folder")])
def test_legacy_h5_and_bare_saved_model_pb_are_refused_saying_what_to_send(client, alice, data_dir, filename,
                                                                           needle):
    resp = upload(client, alice, b"\x89HDF\r\n\x1a\n" + b"\0" * 64, filename)
    assert resp.status_code == 422 and resp.json()["code"] == "invalid_model", resp.text
    assert needle in resp.json()["detail"]
    assert_nothing_left(data_dir)


def test_savedmodel_zip_without_variables_is_refused(client, alice, data_dir, tmp_path):
    data = savedmodel_zip(small_cnn(), tmp_path)
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        kept = {n: archive.read(n) for n in archive.namelist() if "/variables/" not in n}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        for name, content in kept.items():
            archive.writestr(name, content)
    resp = upload(client, alice, buf.getvalue(), "novars.zip")
    assert resp.status_code == 422 and resp.json()["code"] == "invalid_model", resp.text
    assert "variables" in resp.json()["detail"]
    assert_nothing_left(data_dir)


def test_savedmodel_calling_python_is_refused(client, alice, data_dir, tmp_path):
    class Module(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32, name="x")])
        def serve(self, x):
            return {"y": tf.py_function(lambda t: t * 2, [x], tf.float32)}

    folder = tmp_path / "pyfunc"
    module = Module()
    tf.saved_model.save(module, str(folder), signatures={"serving_default": module.serve})
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                archive.write(path, str(path.relative_to(folder)))
    resp = upload(client, alice, buf.getvalue(), "pyfunc.zip")
    assert resp.status_code == 422 and resp.json()["code"] == "unsupported_op", resp.text
    assert "EagerPyFunc" in resp.json()["detail"]
    assert_nothing_left(data_dir)


# --- the conversion's own check -----------------------------------------------------------------------------


def test_conversion_check_names_the_first_differing_layer(tmp_path):
    """With no tolerance at all, float32 summation order alone differs: the check fails, naming the layer."""
    source = tmp_path / "m.keras"
    small_cnn().save(source)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(JobFailed) as failed:
        convert.get("keras")(source, out, {"max_abs_tolerance": 0.0, "max_rel_tolerance": 0.0})
    assert failed.value.code == "conversion_failed"
    assert "first differing layer" in failed.value.message
    assert failed.value.extra["layer"].split(" ")[0] in {"conv", "pool", "flat", "hidden", "logits"}
    # Within the stated tolerance the same model converts, and the report gives the figures.
    out2 = tmp_path / "out2"
    out2.mkdir()
    result = convert.get("keras")(source, out2, {})
    assert result.details["check"]["passed"] and result.details["check"]["batches"] == [1, 3]
    assert result.model_path.parent == out2 / "onnx" and [p.name for p in result.model_path.parent.iterdir()] == [
        "model.onnx"]


def test_the_worker_checks_again_before_loading(tmp_path):
    """A stored upload is checked again in the worker (a newer worker, or a blob stored before a check existed):
    a Lambda fails the conversion with its own code, and Keras never deserializes it."""
    inp = keras.Input((4,), name="x")
    source = tmp_path / "lambda.keras"
    keras.Model(inp, keras.layers.Lambda(lambda t: t + 1.0, name="plus")(inp)).save(source)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(JobFailed) as failed:
        convert.get("keras")(source, out, {})
    assert failed.value.code == "unsafe_layer_refused" and failed.value.extra["layer"] == "plus"
    assert not (out / "source").exists()


def test_several_inputs_and_outputs_keep_their_names_and_order(tmp_path):
    """Inputs named against alphabetical order, two outputs, a nested Sequential: each ONNX input and output is the
    Keras one of the same name."""
    keras.utils.set_random_seed(12)
    zeta, alpha = keras.Input((5,), name="zeta"), keras.Input((3,), name="alpha")
    block = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4, activation="relu")], name="block")
    joined = keras.layers.Concatenate()([block(zeta), alpha])
    model = keras.Model([zeta, alpha], [keras.layers.Dense(2, name="score")(joined),
                                        keras.layers.Dense(6, name="embed")(joined)])
    source = tmp_path / "two.keras"
    model.save(source)
    out = tmp_path / "out"
    out.mkdir()
    result = convert.get("keras")(source, out, {})
    session = onnx_session(result.model_path.read_bytes())
    assert sorted(i.name for i in session.get_inputs()) == ["alpha", "zeta"]
    rng = np.random.default_rng(2)
    feeds = {"zeta": rng.random((3, 5), dtype=np.float32), "alpha": rng.random((3, 3), dtype=np.float32)}
    got = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
    want = model.predict([feeds["zeta"], feeds["alpha"]], verbose=0)
    np.testing.assert_allclose(got["score"], want[0], atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(got["embed"], want[1], atol=1e-5, rtol=1e-4)


def test_the_api_checks_keras_uploads_without_tensorflow(tmp_path):
    """The API process never imports TensorFlow, Keras or tf2onnx, even while it checks Keras uploads."""
    import subprocess
    import sys

    from tests.helpers import ROOT

    small_cnn().save(tmp_path / "m.keras")
    with zipfile.ZipFile(tmp_path / "sm.zip", "w") as archive:
        archive.writestr("m/saved_model.pb", b"")  # holds_savedmodel only reads the member list
    code = ("import sys, pathlib, app.main; from app.formats.limits import Limits; from app.formats.onnx_files import validate_upload; "
            f"p = pathlib.Path({str(tmp_path)!r}); "
            "fmt, _ = validate_upload(p / 'm.keras', filename='m.keras', workdir=p / 'w', limits=Limits()); "
            "from app.formats.keras_files import holds_savedmodel; assert holds_savedmodel(p / 'sm.zip'); "
            "heavy = [m for m in ('tensorflow', 'keras', 'tf2onnx', 'h5py', 'torch') if m in sys.modules]; "
            "print(fmt, heavy); sys.exit(1 if heavy or fmt != 'keras' else 0)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
