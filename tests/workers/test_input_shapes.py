"""Input shapes (issue 16, item 1): a model whose dynamic dims need given sizes is measured at them, or fails with
input_shape_required naming the dims; shapes that contradict the model are refused at submit."""
from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from app.dbmodels import Job, JobDataset
from app.errors import InputShapeRequired, JobFailed
from app.formats.input_shapes import GIVEN, GUESSED, InputShapes, ShapeError, check_against_model, resolve
from tests.helpers import npz_bytes, onnx_bytes, queued_messages, row_count
from workers.onnx_tools.inputs import plan_inputs
from workers.supervise import run_job

FAST = {"batch_sizes": [1, 2], "warmup": 1, "iterations": 4}
HEIGHT = 48


def recognizer_onnx(height: int = HEIGHT) -> bytes:
    """[N, 3, H, W] -> [N, 9]: a Conv, then per-row features concatenated with a constant [N, 1, height, 1]
    expanded to the batch: the Concat only works when H == height, like a text recognizer made for H = 48."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("ReduceMean", ["conv"], ["rows"], axes=[3], keepdims=1),     # [N, 8, H, 1]
        helper.make_node("Shape", ["x"], ["xshape"]),
        helper.make_node("Gather", ["xshape", "zero"], ["n"], axis=0),              # [1]: N
        helper.make_node("Concat", ["n", "tail"], ["target"], axis=0),              # [N, 1, height, 1]
        helper.make_node("Expand", ["bias_rows", "target"], ["bias"]),
        helper.make_node("Concat", ["rows", "bias"], ["joined"], axis=1),           # needs H == height
        helper.make_node("ReduceMean", ["joined"], ["y"], axes=[2, 3], keepdims=0),
    ]
    inits = [
        numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b"),
        numpy_helper.from_array(np.array([0], np.int64), "zero"),
        numpy_helper.from_array(np.array([1, height, 1], np.int64), "tail"),
        numpy_helper.from_array(rng.standard_normal((1, 1, height, 1)).astype(np.float32), "bias_rows"),
    ]
    return onnx_bytes(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 9])], inits)


class _Sessions:
    """plan_inputs' view of one model as both roles."""

    def __init__(self, model: bytes) -> None:
        import onnx

        self.session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
        self.structure = onnx.load_from_string(model)

    def plan(self, **kwargs):
        return plan_inputs({"baseline": self.session, "result": self.session},
                           {"baseline": self.structure, "result": self.structure}, **kwargs)


# --- plan_inputs and the shape rules ------------------------------------------------------------------

def test_plan_without_shapes_guesses_and_the_probe_names_the_dims():
    with pytest.raises(InputShapeRequired) as caught:
        _Sessions(recognizer_onnx()).plan()
    message = caught.value.message
    assert caught.value.code == "input_shape_required"
    assert "axis 2 ('H') = 224" in message and "axis 3 ('W') = 224" in message
    assert '{"dims": {"H": <size>, "W": <size>}} or {"x": [1, 3, <size>, <size>]}' in message
    assert "--dim H=<size> --dim W=<size>" in message
    # ONNX Runtime's words come last, as a detail, never as the whole message.
    assert message.index("ONNX Runtime said") > message.index("evaluate.input_shapes")
    assert [(g["input"], g["axis"], g["dim"]) for g in caught.value.extra["guessed"]] == [("x", 2, "H"), ("x", 3, "W")]


def test_plan_takes_given_shapes_and_says_where_each_size_came_from():
    sessions = _Sessions(recognizer_onnx())
    plan = sessions.plan(shapes=InputShapes.parse({"x": [None, 3, 48, 320]}))
    assert plan.shapes(2) == {"x": [2, 3, 48, 320]}
    assert plan.sources() == {"x": ["batch size", "declared by the model", GIVEN, GIVEN]}
    assert not plan.guessed
    # By dim name: H given, W left to the guess (the model runs at any W).
    plan = sessions.plan(shapes=InputShapes.parse({"dims": {"H": 48}}))
    assert plan.shapes(1) == {"x": [1, 3, 48, 224]} and plan.sources()["x"][2:] == [GIVEN, GUESSED]
    assert any("axis 3 ('W')" in note and "a guess" in note for note in plan.notes)


def test_dataset_samples_fill_what_the_user_did_not_give():
    sessions = _Sessions(recognizer_onnx())
    shapes = InputShapes.parse({"dims": {"W": 100}}).with_dataset("lines", {"x": (5, 3, 48, 64),
                                                                             "labels": (5,)})
    plan = sessions.plan(shapes=shapes)
    assert plan.shapes(1) == {"x": [1, 3, 48, 100]}  # the user's W wins over the dataset's
    assert plan.sources()["x"][2:] == ["from dataset 'lines'", GIVEN]


def test_given_shapes_the_model_cannot_run_at_are_invalid_input_shape():
    with pytest.raises(JobFailed) as caught:
        _Sessions(recognizer_onnx()).plan(shapes=InputShapes.parse({"dims": {"H": 32, "W": 320}}))
    assert caught.value.code == "invalid_input_shape"
    assert "'x' [1, 3, 32, 320]" in caught.value.message and "given by the user" in caught.value.message


def test_a_model_that_fixes_every_size_but_the_batch_needs_no_shapes(mlp_onnx):
    plan = _Sessions(mlp_onnx).plan(shapes=InputShapes())
    assert not plan.chosen and not plan.guessed
    assert plan.sources() == {"features": ["batch size", "declared by the model"]}
    assert plan.shapes(4) == {"features": [4, 64]}


def test_measurement_names_the_dims_in_process_and_isolated(tmp_path):
    from workers.measure import measure_pair
    from workers.measure.isolated import measure_isolated

    path = tmp_path / "recognizer.onnx"
    path.write_bytes(recognizer_onnx())
    options = {"batch_sizes": [1], "warmup": 0, "iterations": 2}
    with pytest.raises(InputShapeRequired, match=r"axis 2 \('H'\) = 224"):
        measure_pair(path, path, **options)
    with pytest.raises(JobFailed, match=r"axis 2 \('H'\) = 224") as isolated:
        measure_isolated(path, path, pin=False, **options)
    assert isolated.value.code == "input_shape_required"
    report = measure_isolated(path, path, pin=False, input_shapes=InputShapes.parse({"dims": {"H": 48, "W": 8}}),
                              **options)
    assert report["input_shapes"] == {"x": [1, 3, 48, 8]}
    assert report["input_shapes_source"] == {"x": ["batch size", "declared by the model", GIVEN, GIVEN]}


@pytest.mark.parametrize("given,needle,where", [
    ({"y": [1, 3, 48, 320]}, "no input 'y'", {"input": "y"}),
    ({"x": [1, 3, 48]}, "rank 4", {"input": "x"}),
    ({"x": [1, 4, 48, 320]}, "axis 1 is fixed at 3", {"input": "x", "axis": 1}),
    ({"dims": {"Height": 48}}, "no dim named 'Height'", {"dim": "Height"}),
    ({"x": [1, 3, 0, 320]}, "between 1 and", {"input": "x", "axis": 2}),
    ({"dims": {"H": -4}}, "between 1 and", {"dim": "H"}),
    ({"x": [1, 3, 48, 320], "dims": {"H": 32}}, "dim 'H' is given as 32", {"input": "x", "axis": 2, "dim": "H"}),
    ({"dims": [48]}, '"dims" must be an object', {}),
])
def test_shape_rules(given, needle, where):
    inputs = [{"name": "x", "shape": ["N", 3, "H", "W"]}]
    with pytest.raises(ShapeError) as caught:
        check_against_model(given, inputs)
    assert needle in caught.value.message and caught.value.where == where


def test_resolve_shares_a_dim_name_across_inputs():
    declared = {"ids": ["batch", "seq"], "mask": ["batch", "seq"]}
    resolved = resolve(declared, InputShapes.parse({"ids": [8, 77]}))
    assert [a.size for a in resolved["mask"]] == [None, 77] and resolved["mask"][1].source == GIVEN
    assert resolved["ids"][0].source == "batch size"  # the batch axis follows batch_sizes, whatever was given


# --- through the API, on the worker ---------------------------------------------------------------------

@pytest.fixture
def recognizer(client, alice):
    resp = client.post("/v1/models", files={"file": ("recognizer.onnx", recognizer_onnx())}, headers=alice)
    assert resp.status_code == 201, resp.text
    return resp.json()


def _run(client, alice, spec) -> dict:
    resp = client.post("/v1/jobs", json=spec, headers=alice)
    assert resp.status_code == 202, resp.text
    run_job(resp.json()["id"])
    return client.get(f"/v1/jobs/{resp.json()['id']}", headers=alice).json()


def test_without_shapes_the_job_fails_input_shape_required_naming_the_dims(client, alice, recognizer):
    job = _run(client, alice, {"model_id": recognizer["id"], "steps": [{"method": "quantize.int8_dynamic"}],
                               "evaluate": FAST})
    assert job["status"] == "failed", job
    assert job["error"]["code"] == "input_shape_required"
    message = job["error"]["message"]
    assert "'H'" in message and "'W'" in message and "evaluate.input_shapes" in message
    # It failed before the step ran: no model artifact was kept.
    # Nothing but the replay recipe, stored before the first step.
    assert [a["kind"] for a in client.get(f"/v1/jobs/{job['id']}/artifacts", headers=alice).json()] == ["recipe"]


def test_with_input_shapes_the_job_succeeds_and_the_report_names_the_shape(client, alice, recognizer):
    job = _run(client, alice, {"model_id": recognizer["id"], "steps": [{"method": "quantize.int8_dynamic"}],
                               "evaluate": FAST | {"input_shapes": {"x": [1, 3, 48, 320]}}})
    assert job["status"] == "succeeded", job
    assert job["summary"]["input_shapes"] == {"x": [1, 3, 48, 320]}
    assert job["summary"]["input_shapes_source"] == {"x": ["batch size", "declared by the model", GIVEN, GIVEN]}
    report = client.get(f"/v1/jobs/{job['id']}/report", headers=alice).json()
    measured = report["measurement"]
    assert [b["input_shapes"] for b in measured["latency"]["batch_sizes"]] == [{"x": [1, 3, 48, 320]},
                                                                              {"x": [2, 3, 48, 320]}]
    assert measured["inputs"][0]["shape"] == [None, 3, 48, 320]
    # The result really runs at that shape, and the job kept the shapes it was given.
    result = client.get(f"/v1/jobs/{job['id']}/artifacts/model.onnx", headers=alice).content
    out = ort.InferenceSession(result, providers=["CPUExecutionProvider"]).run(
        None, {"x": np.zeros((2, 3, 48, 320), np.float32)})[0]
    assert out.shape == (2, 9)
    assert job["evaluate"]["input_shapes"] == {"x": [1, 3, 48, 320]}


def test_an_eval_dataset_of_the_right_shape_is_enough(client, alice, recognizer):
    x = np.random.default_rng(1).standard_normal((6, 3, 48, 40)).astype(np.float32)
    data = client.post("/v1/datasets", files={"file": ("lines.npz", npz_bytes(x=x))}, data={"name": "lines"},
                       headers=alice).json()
    job = _run(client, alice, {"model_id": recognizer["id"], "steps": [{"method": "quantize.int8_dynamic"}],
                               "evaluate": FAST | {"eval_dataset_id": data["id"]}})
    assert job["status"] == "succeeded", job
    assert job["summary"]["input_shapes"] == {"x": [1, 3, 48, 40]}
    assert job["summary"]["input_shapes_source"]["x"][2:] == ["from dataset 'lines'"] * 2


def test_random_calibration_uses_the_given_shapes(client, alice, recognizer):
    steps = [{"method": "quantize.int8_static", "params": {"allow_random_calibration": True,
                                                           "calibration_samples": 4}}]
    failed = _run(client, alice, {"model_id": recognizer["id"], "steps": steps, "evaluate": FAST})
    assert failed["error"]["code"] == "input_shape_required", failed
    job = _run(client, alice, {"model_id": recognizer["id"], "steps": steps,
                               "evaluate": FAST | {"input_shapes": {"dims": {"H": 48, "W": 32}}}})
    assert job["status"] == "succeeded", job
    assert job["summary"]["input_shapes"] == {"x": [1, 3, 48, 32]}


@pytest.mark.parametrize("shapes,code,needle", [
    ({"x": [1, 4, 48, 320]}, "invalid_input_shape", "axis 1 is fixed at 3"),
    ({"image": [1, 3, 48, 320]}, "invalid_input_shape", "no input 'image'"),
    ({"x": [1, 3, 48]}, "invalid_input_shape", "rank 4"),
    ({"dims": {"Z": 4}}, "invalid_input_shape", "no dim named 'Z'"),
    ({"x": [1, 3, -48, 320]}, "invalid_input_shape", "between 1 and"),
    ({"x": [1, 3, "tall", 320]}, "invalid_request", "input_shapes"),
])
def test_shapes_that_contradict_the_model_are_422_and_nothing_is_left(client, alice, recognizer, data_dir, shapes,
                                                                      code, needle):
    spec = {"model_id": recognizer["id"], "steps": [{"method": "quantize.int8_dynamic"}],
            "evaluate": FAST | {"input_shapes": shapes}}
    resp = client.post("/v1/jobs", json=spec, headers=alice)
    assert resp.status_code == 422, resp.text
    body = resp.json()
    assert body["code"] == code and needle in body["detail"]
    if code == "invalid_input_shape":
        assert body["field"] == "evaluate.input_shapes"
    assert row_count(Job) == 0 and row_count(JobDataset) == 0 and queued_messages(data_dir) == []


def test_shapes_given_at_a_size_the_model_cannot_run_fail_invalid_input_shape(client, alice, recognizer):
    job = _run(client, alice, {"model_id": recognizer["id"], "steps": [{"method": "quantize.int8_dynamic"}],
                               "evaluate": FAST | {"input_shapes": {"dims": {"H": 32, "W": 32}}}})
    assert job["error"]["code"] == "invalid_input_shape", job
    assert "[1, 3, 32, 32]" in job["error"]["message"] and "given by the user" in job["error"]["message"]


# --- the CLI, against a real embedded service (API + Celery worker processes) -------------------------

from tests.stack import cli  # noqa: E402  (`service`: the session's `modelpress run`, tests/conftest.py)


@pytest.mark.integration
def test_cli_takes_input_shapes_and_dims(service, tmp_path):
    model = tmp_path / "recognizer.onnx"
    model.write_bytes(recognizer_onnx())
    common = ["compress", str(model), "--method", "quantize.int8_dynamic", "--batch-sizes", "1",
              "--warmup", "1", "--iterations", "4", "--wait"]
    failed = cli(service, *common)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "input_shape_required" in failed.stderr and "--dim H=<size> --dim W=<size>" in failed.stderr

    done = cli(service, *common, "--input-shape", "x=?,3,48,64")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "input x" in done.stdout and "[1, 3, 48, 64] (given by the user)" in done.stdout

    by_dim = cli(service, *common, "--dim", "H=48", "--dim", "W=32", "--json")
    assert by_dim.returncode == 0, by_dim.stdout + by_dim.stderr
    job = json.loads(by_dim.stdout)
    assert job["evaluate"]["input_shapes"] == {"dims": {"H": 48, "W": 32}}
    assert job["summary"]["input_shapes"] == {"x": [1, 3, 48, 32]}

    refused = cli(service, *common, "--input-shape", "x=1,4,48,64")
    assert refused.returncode == 1 and "invalid_input_shape" in refused.stderr and "axis 1" in refused.stderr
    usage = cli(service, *common, "--input-shape", "x=1,3,tall")
    assert usage.returncode == 2 and "whole number" in usage.stderr


# --- the dashboard's job form (Chromium, as tests/api/test_ui.py; skips where there is none) ---------------



@pytest.mark.integration
def test_dashboard_job_form_takes_input_shapes(browser, service):
    import time

    import httpx

    base, key = service["url"], service["key"]
    api = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=60)
    model = api.post("/v1/models", files={"file": ("recognizer.onnx", recognizer_onnx())}).json()
    page = browser.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda exc: problems.append(str(exc)))
    page.goto(f"{base}/ui#/jobs/new?model={model['id']}")
    page.wait_for_selector("#api-key")
    page.fill("#api-key", key)
    page.click("#signin-form button[type=submit]")
    page.wait_for_selector("#job-form")
    assert page.input_value("#job-model") == model["id"]
    assert "x[N,3,H,W]" in page.inner_text("#job-model")  # the dims a user may give are shown
    field = page.locator("textarea[name='evaluate.input_shapes']")
    assert field.count() == 1
    assert field.get_attribute("placeholder") == 'JSON, e.g. {"x":[1,3,48,320]}'  # the schema's first example
    page.check("#mode-steps")  # a goal is the form's default; this job names its step
    page.select_option("#steps select.method-select", "quantize.int8_dynamic")
    page.fill("input[name='evaluate.batch_sizes']", "1")
    page.fill("input[name='evaluate.warmup']", "1")
    page.fill("input[name='evaluate.iterations']", "4")
    field.fill('{"dims": {"H": 48, "W": 24}}')
    page.click("#start-job")
    page.wait_for_url(lambda url: "new=" in url)
    job_id = page.url.split("new=")[1]
    deadline = time.monotonic() + 150
    while (job := api.get(f"/v1/jobs/{job_id}").json())["status"] not in ("succeeded", "failed") and \
            time.monotonic() < deadline:
        time.sleep(0.5)
    assert job["status"] == "succeeded", job
    assert job["evaluate"]["input_shapes"] == {"dims": {"H": 48, "W": 24}}
    # The job page says what was measured and where the sizes came from.
    page.goto(f"{base}/ui#/jobs/{job_id}")
    page.wait_for_selector("#report[data-ready=true]", timeout=30_000)
    assert "x [1, 3, 48, 24] (given by the user)" in page.inner_text("body")
    assert not problems, problems


# --- real pretrained models (../shared/models; skipped where absent) -----------------------------------

def _free_spatial_dims(path) -> bytes:
    """The model with its input's batch, height and width made symbolic (N, H, W), as an export with dynamic
    axes would declare them; its outputs' shapes left to inference."""
    import onnx

    model = onnx.load(str(path))
    initializers = {t.name for t in model.graph.initializer}
    value = next(v for v in model.graph.input if v.name not in initializers)
    for dim, name in zip(value.type.tensor_type.shape.dim, ["N", None, "H", "W"]):
        if name:
            dim.Clear()
            dim.dim_param = name
    for output in model.graph.output:
        for dim in output.type.tensor_type.shape.dim:
            dim.Clear()
    del model.graph.value_info[:]
    return model.SerializeToString()


@pytest.mark.parametrize("relative,name,shape", [
    ("ultraface-rfb320/version-RFB-320.onnx", "input", [1, 3, 240, 320]),
    ("yolox-nano/yolox_nano.onnx", "images", [1, 3, 416, 416]),
])
def test_real_models_with_fixed_shapes_are_measured_as_declared(client, alice, relative, name, shape):
    from tests.helpers import shared_model

    path = shared_model(relative)
    model = client.post("/v1/models", files={"file": (path.name, path.read_bytes())}, headers=alice).json()
    job = _run(client, alice, {"model_id": model["id"], "steps": [{"method": "quantize.int8_dynamic"}],
                               "evaluate": {"batch_sizes": [1], "warmup": 1, "iterations": 4}})
    assert job["status"] == "succeeded", job
    assert job["summary"]["input_shapes"] == {name: shape}
    assert set(job["summary"]["input_shapes_source"][name]) == {"declared by the model"}


def test_ultraface_with_free_dims_needs_its_size_given(client, alice):
    from tests.helpers import shared_model

    onnx_model = _free_spatial_dims(shared_model("ultraface-rfb320/version-RFB-320.onnx"))
    model = client.post("/v1/models", files={"file": ("ultraface-dynamic.onnx", onnx_model)}, headers=alice).json()
    spec = {"model_id": model["id"], "steps": [{"method": "quantize.int8_dynamic"}],
            "evaluate": {"batch_sizes": [1], "warmup": 1, "iterations": 4}}
    failed = _run(client, alice, spec)
    assert failed["error"]["code"] == "input_shape_required", failed
    assert "('H') = 224" in failed["error"]["message"] and "('W') = 224" in failed["error"]["message"]
    spec["evaluate"]["input_shapes"] = {"dims": {"H": 240, "W": 320}}
    job = _run(client, alice, spec)
    assert job["status"] == "succeeded", job
    assert job["summary"]["input_shapes"] == {"input": [1, 3, 240, 320]}


def rate_gated_onnx() -> bytes:
    """y = x @ W, through an If on `sr == 16000` whose else branch reshapes to an impossible shape: like Silero
    VAD, the model runs only when its scalar `sr` input holds the one value it was made for."""
    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32), "w")
    then = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y_then"])], "then", [],
                             [helper.make_tensor_value_info("y_then", TensorProto.FLOAT, None)])
    bad_shape = numpy_helper.from_array(np.array([7, 7, 7], np.int64), "bad_shape")
    other = helper.make_graph([helper.make_node("Reshape", ["x", "bad_shape"], ["y_else"])], "else", [],
                              [helper.make_tensor_value_info("y_else", TensorProto.FLOAT, None)],
                              initializer=[bad_shape])
    nodes = [helper.make_node("Constant", [], ["rate"], value=numpy_helper.from_array(np.array(16000, np.int64))),
             helper.make_node("Equal", ["sr", "rate"], ["ok"]),
             helper.make_node("If", ["ok"], ["y"], then_branch=then, else_branch=other)]
    return onnx_bytes(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8]),
                              helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], [weight])


@pytest.fixture
def rate_gated(client, alice):
    resp = client.post("/v1/models", files={"file": ("gated.onnx", rate_gated_onnx())}, headers=alice)
    assert resp.status_code == 201, resp.text
    return resp.json()


def test_input_values_feed_an_input_that_must_hold_one_value(client, alice, rate_gated):
    failed = _run(client, alice, {"model_id": rate_gated["id"], "steps": [{"method": "quantize.int8_dynamic"}],
                                  "evaluate": FAST})
    assert failed["status"] == "failed" and failed["error"]["code"] == "input_value_required", failed
    assert "evaluate.input_values" in failed["error"]["message"] and "'sr'" in failed["error"]["message"]
    job = _run(client, alice, {"model_id": rate_gated["id"], "steps": [{"method": "quantize.int8_dynamic"}],
                               "evaluate": FAST | {"input_values": {"sr": 16000}}})
    assert job["status"] == "succeeded", job
    assert job["summary"]["fidelity"]["cosine_similarity"] > 0.99
    inputs = client.get(f"/v1/jobs/{job['id']}/report", headers=alice).json()["measurement"]["inputs"]
    assert [i["values"] for i in inputs if i["name"] == "sr"] == ["16000 (evaluate.input_values)"]


@pytest.mark.parametrize("values,needle", [
    ({"rate": 16000}, "no input 'rate'"),
    ({"sr": [16000, 8000]}, "rank 0"),
    ({"sr": "16000"}, "a number, a boolean"),
    ({"sr": [[1], [2, 3]]}, "same length"),
    ({"sr": 2**70}, "64 bits"),
])
def test_input_values_that_do_not_fit_are_422_and_nothing_is_left(client, alice, rate_gated, data_dir, values,
                                                                 needle):
    resp = client.post("/v1/jobs", json={"model_id": rate_gated["id"], "steps": [{"method": "quantize.int8_dynamic"}],
                                         "evaluate": FAST | {"input_values": values}}, headers=alice)
    assert resp.status_code == 422, resp.text
    assert resp.json()["code"] == "invalid_input_shape" and resp.json()["field"] == "evaluate.input_values"
    assert needle in resp.json()["detail"]
    assert row_count(Job) == 0 and queued_messages(data_dir) == []


def test_placeholder_dims_are_unnamed_and_negative_sizes_free():
    """PaddleOCR exports declare [-1, 3, "?", "?"]: -1 is a free batch, and the two "?" are separate dims, so a
    dataset of 48x192 samples fills H with 48 and W with 192 (not both with 48), and a batch of 1 is no
    contradiction."""
    declared = {"x": [-1, 3, "?", "?"]}
    from_data = resolve(declared, InputShapes().with_dataset("lines", {"x": (5, 3, 48, 192)}))
    assert [axis.size for axis in from_data["x"]] == [None, 3, 48, 192]
    given = check_against_model({"x": [1, 3, 48, 192]}, [{"name": "x", "shape": [-1, 3, "?", "?"]}])
    assert [axis.size for axis in resolve(declared, given)["x"]] == [None, 3, 48, 192]
