"""Control flow and recurrent ops (issue 16 item 3), end to end through the API on a real worker.

Small models built here with onnx.helper: an If whose branches hold MatMuls (one weight a Constant node inside
the branch, one read from the main graph), a Loop and a Scan with MatMuls in their bodies, an LSTM and a GRU.
quantize.int8_dynamic must reach inside the bodies (asserted on the downloaded graph) and keep the outputs;
methods that cannot reach a body (static QDQ) name it in the job's notes; GRU, which ONNX Runtime has no int8
kernel for, is named as float.
"""
from __future__ import annotations

import uuid
from collections import Counter

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from tests.stack import wait_for_job

pytestmark = pytest.mark.integration

OPSET = [h.make_opsetid("", 17)]
FAST = {"batch_sizes": [1], "warmup": 2, "iterations": 10}


# --- models -------------------------------------------------------------------------------------------

def _weight(rng, name, *shape):
    return nh.from_array((rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32), name)


def if_model(seed: int = 0) -> onnx.ModelProto:
    """y = If(cond) then relu(x @ W1) @ W1b (W1 a Constant node in the branch) else x @ W2 (W2 a main-graph
    initializer read from the branch); z = x @ W0 in the main graph."""
    rng = np.random.default_rng(seed)
    then_branch = h.make_graph(
        [h.make_node("Constant", [], ["W1"], value=_weight(rng, "W1", 32, 24), name="then_w1"),
         h.make_node("MatMul", ["x", "W1"], ["t1"], name="then_matmul1"),
         h.make_node("Relu", ["t1"], ["t2"], name="then_relu"),
         h.make_node("MatMul", ["t2", "W1b"], ["then_y"], name="then_matmul2")],
        "then", [], [h.make_tensor_value_info("then_y", T.FLOAT, ["N", 16])], initializer=[_weight(rng, "W1b", 24, 16)])
    else_branch = h.make_graph(
        [h.make_node("MatMul", ["x", "W2"], ["else_y"], name="else_matmul")],
        "else", [], [h.make_tensor_value_info("else_y", T.FLOAT, ["N", 16])])
    graph = h.make_graph(
        [h.make_node("MatMul", ["x", "W0"], ["z"], name="top_matmul"),
         h.make_node("If", ["cond"], ["y"], name="branch", then_branch=then_branch, else_branch=else_branch)],
        "if_model",
        [h.make_tensor_value_info("x", T.FLOAT, ["N", 32]), h.make_tensor_value_info("cond", T.BOOL, [])],
        [h.make_tensor_value_info("y", T.FLOAT, ["N", 16]), h.make_tensor_value_info("z", T.FLOAT, ["N", 16])],
        initializer=[_weight(rng, "W0", 32, 16), _weight(rng, "W2", 32, 16)])
    return h.make_model(graph, opset_imports=OPSET)


def loop_model(seed: int = 0) -> onnx.ModelProto:
    """h <- tanh(h @ W + b), four times, in a Loop body that holds the MatMul and its weight."""
    rng = np.random.default_rng(seed)
    body = h.make_graph(
        [h.make_node("MatMul", ["h_in", "Wl"], ["m"], name="loop_matmul"),
         h.make_node("Add", ["m", "bl"], ["a"], name="loop_add"),
         h.make_node("Tanh", ["a"], ["h_out"], name="loop_tanh"),
         h.make_node("Identity", ["cond_in"], ["cond_out"], name="loop_cond")],
        "body",
        [h.make_tensor_value_info("i", T.INT64, []), h.make_tensor_value_info("cond_in", T.BOOL, []),
         h.make_tensor_value_info("h_in", T.FLOAT, ["N", 32])],
        [h.make_tensor_value_info("cond_out", T.BOOL, []), h.make_tensor_value_info("h_out", T.FLOAT, ["N", 32])],
        initializer=[_weight(rng, "Wl", 32, 32), nh.from_array(np.full(32, 0.1, np.float32), "bl")])
    graph = h.make_graph(
        [h.make_node("Loop", ["trip", "", "h0"], ["h"], name="steps", body=body)], "loop_model",
        [h.make_tensor_value_info("h0", T.FLOAT, ["N", 32])], [h.make_tensor_value_info("h", T.FLOAT, ["N", 32])],
        initializer=[nh.from_array(np.array(4, np.int64), "trip")])
    return h.make_model(graph, opset_imports=OPSET)


def scan_model(seed: int = 0) -> onnx.ModelProto:
    """A recurrence written as Scan over xs [N, 6, 16] (scan axis 1): s <- tanh(x_t @ Wx + s @ Ws)."""
    rng = np.random.default_rng(seed)
    body = h.make_graph(
        [h.make_node("MatMul", ["x_t", "Wx"], ["u"], name="scan_matmul_x"),
         h.make_node("MatMul", ["s_in", "Ws"], ["v"], name="scan_matmul_s"),
         h.make_node("Add", ["u", "v"], ["uv"], name="scan_add"),
         h.make_node("Tanh", ["uv"], ["s_out"], name="scan_tanh"),
         h.make_node("Identity", ["s_out"], ["y_t"], name="scan_emit")],
        "scan_body",
        [h.make_tensor_value_info("s_in", T.FLOAT, ["N", 24]), h.make_tensor_value_info("x_t", T.FLOAT, ["N", 16])],
        [h.make_tensor_value_info("s_out", T.FLOAT, ["N", 24]), h.make_tensor_value_info("y_t", T.FLOAT, ["N", 24])],
        initializer=[_weight(rng, "Wx", 16, 24), _weight(rng, "Ws", 24, 24)])
    graph = h.make_graph(
        [h.make_node("Scan", ["s0", "xs"], ["s_last", "ys"], name="scan", body=body, num_scan_inputs=1,
                     scan_input_axes=[1], scan_output_axes=[1])],
        "scan_model",
        [h.make_tensor_value_info("s0", T.FLOAT, ["N", 24]), h.make_tensor_value_info("xs", T.FLOAT, ["N", 6, 16])],
        [h.make_tensor_value_info("s_last", T.FLOAT, ["N", 24]), h.make_tensor_value_info("ys", T.FLOAT, ["N", 6, 24])])
    return h.make_model(graph, opset_imports=OPSET)


def rnn_model(op_type: str, *, head: bool = False, seed: int = 0, hidden: int = 64, features: int = 32,
              steps: int = 8) -> onnx.ModelProto:
    """One LSTM or GRU layer over X [steps, N, features] with constant W, R, B; with `head`, a MatMul on its
    last hidden state."""
    rng = np.random.default_rng(seed)
    gates = 4 if op_type == "LSTM" else 3
    inits = [nh.from_array((rng.standard_normal((1, gates * hidden, features)) * 0.2).astype(np.float32), "W"),
             nh.from_array((rng.standard_normal((1, gates * hidden, hidden)) * 0.2).astype(np.float32), "R"),
             nh.from_array((rng.standard_normal((1, 2 * gates * hidden)) * 0.1).astype(np.float32), "B")]
    nodes = [h.make_node(op_type, ["X", "W", "R", "B"], ["Y", "Y_h"], name=op_type.lower(), hidden_size=hidden)]
    outputs = [h.make_tensor_value_info("Y", T.FLOAT, [steps, 1, "N", hidden])]
    if head:
        inits.append(_weight(rng, "W_head", hidden, 8))
        nodes.append(h.make_node("MatMul", ["Y_h", "W_head"], ["logits"], name="head"))
        outputs.append(h.make_tensor_value_info("logits", T.FLOAT, [1, "N", 8]))
    else:
        outputs.append(h.make_tensor_value_info("Y_h", T.FLOAT, [1, "N", hidden]))
    graph = h.make_graph(nodes, f"{op_type.lower()}_model",
                         [h.make_tensor_value_info("X", T.FLOAT, [steps, "N", features])], outputs, initializer=inits)
    return h.make_model(graph, opset_imports=OPSET)


def ops_in(graph: onnx.GraphProto, owner: str | None = None, attribute: str | None = None) -> Counter:
    """Op types in the main graph (owner None) or in the named node's subgraph attribute."""
    if owner is None:
        return Counter(node.op_type for node in graph.node)
    for node in graph.node:
        for attr in node.attribute:
            if node.name == owner and attr.name == attribute:
                return Counter(n.op_type for n in attr.g.node)
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                found = ops_in(sub, owner, attribute)
                if found:
                    return found
    return Counter()


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))


def agreement(original: bytes, result: bytes, feeds: list[dict]) -> float:
    """Lowest cosine between the two models' outputs over the feeds."""
    first = ort.InferenceSession(original, providers=["CPUExecutionProvider"])
    second = ort.InferenceSession(result, providers=["CPUExecutionProvider"])
    return min(cosine(a, b) for feed in feeds for a, b in zip(first.run(None, feed), second.run(None, feed)))


# --- the stack: `modelpress run` (SQLite, filesystem broker, a worker process) ----------------------------


def run_job(http: httpx.Client, model: onnx.ModelProto, name: str, method: str, params: dict | None = None,
            evaluate: dict | None = None) -> tuple[dict, bytes]:
    """Upload the model, run one step on the worker; returns (job, uploaded bytes)."""
    data = model.SerializeToString()
    up = http.post("/v1/models", files={"file": (f"{name}.onnx", data)})
    assert up.status_code == 201, up.text
    spec = {"model_id": up.json()["id"], "steps": [{"method": method, "params": params or {}}],
            "evaluate": FAST | (evaluate or {})}
    created = http.post("/v1/jobs", json=spec, headers={"Idempotency-Key": str(uuid.uuid4())})
    assert created.status_code == 202, created.text
    return wait_for_job(http, created.json()["id"]), data


def download(http: httpx.Client, job: dict) -> bytes:
    resp = http.get(f"/v1/jobs/{job['id']}/artifacts/model.onnx")
    assert resp.status_code == 200, resp.text
    return resp.content


def step_details(http: httpx.Client, job: dict) -> dict:
    return http.get(f"/v1/jobs/{job['id']}/report").json()["steps"][0]["details"]


def assert_failed_and_nothing_kept(http: httpx.Client, job: dict, code: str) -> None:
    assert job["status"] == "failed", job
    assert job["error"]["code"] == code, job["error"]
    # Nothing but the replay recipe, stored before the first step.
    assert [a["kind"] for a in http.get(f"/v1/jobs/{job['id']}/artifacts").json()] == ["recipe"]


# --- tests --------------------------------------------------------------------------------------------

def test_int8_dynamic_quantizes_matmuls_inside_both_if_branches(http):
    job, original = run_job(http, if_model(), "if-branches", "quantize.int8_dynamic")
    assert job["status"] == "succeeded", job
    result = onnx.load_from_string(download(http, job))
    # Each branch's MatMuls became integer MatMuls, the Constant-node weight and the outer-scope one included.
    assert ops_in(result.graph, "branch", "then_branch")["MatMulInteger"] == 2
    assert ops_in(result.graph, "branch", "else_branch")["MatMulInteger"] == 1
    assert sum(ops_in(result.graph, "branch", b)["MatMul"] for b in ("then_branch", "else_branch")) == 0
    assert ops_in(result.graph)["MatMulInteger"] == 1
    rng = np.random.default_rng(1)
    feeds = [{"x": rng.standard_normal((4, 32)).astype(np.float32), "cond": np.array(flag)}
             for flag in (True, False) for _ in range(8)]
    assert agreement(original, result.SerializeToString(), feeds) > 0.99
    assert job["summary"]["fidelity"]["cosine_similarity"] > 0.99
    sites = {(s["node"], s["attribute"]): s for s in step_details(http, job)["subgraphs"]}
    assert sites[("branch", "then_branch")]["quantized"] == {"MatMulInteger": 2}
    assert sites[("branch", "else_branch")]["left_float"] == []


def test_excluded_node_inside_a_branch_stays_float_and_is_named(http):
    job, _ = run_job(http, if_model(), "if-excluded", "quantize.int8_dynamic",
                     {"nodes_to_exclude": ["then_matmul2"]})
    assert job["status"] == "succeeded", job
    result = onnx.load_from_string(download(http, job))
    assert ops_in(result.graph, "branch", "then_branch")["MatMul"] == 1
    sites = {(s["node"], s["attribute"]): s for s in step_details(http, job)["subgraphs"]}
    assert sites[("branch", "then_branch")]["left_float"] == [
        {"node": "then_matmul2", "op_type": "MatMul", "reason": "named in nodes_to_exclude"}]
    assert any("'then_matmul2' inside the then_branch of If node 'branch'" in n for n in job["summary"]["notes"])


@pytest.mark.parametrize("build,owner,feeds", [
    (loop_model, "steps", lambda rng: {"h0": rng.standard_normal((3, 32)).astype(np.float32)}),
    (scan_model, "scan", lambda rng: {"s0": rng.standard_normal((3, 24)).astype(np.float32),
                                      "xs": rng.standard_normal((3, 6, 16)).astype(np.float32)}),
])
def test_int8_dynamic_quantizes_loop_and_scan_bodies(http, build, owner, feeds):
    job, original = run_job(http, build(), owner, "quantize.int8_dynamic")
    assert job["status"] == "succeeded", job
    result = onnx.load_from_string(download(http, job))
    body = ops_in(result.graph, owner, "body")
    assert body["MatMulInteger"] == (1 if owner == "steps" else 2) and body["MatMul"] == 0, body
    rng = np.random.default_rng(2)
    assert agreement(original, result.SerializeToString(), [feeds(rng) for _ in range(8)]) > 0.99
    assert job["summary"]["fidelity"]["cosine_similarity"] > 0.99


def test_lstm_becomes_dynamic_quantize_lstm(http):
    job, original = run_job(http, rnn_model("LSTM"), "lstm", "quantize.int8_dynamic")
    assert job["status"] == "succeeded", job
    result = onnx.load_from_string(download(http, job))
    assert ops_in(result.graph)["DynamicQuantizeLSTM"] == 1 and ops_in(result.graph)["LSTM"] == 0
    rng = np.random.default_rng(3)
    feeds = [{"X": rng.standard_normal((8, 2, 32)).astype(np.float32)} for _ in range(8)]
    assert agreement(original, result.SerializeToString(), feeds) > 0.99
    assert job["summary"]["fidelity"]["cosine_similarity"] > 0.99
    assert step_details(http, job)["recurrent"]["LSTM"] == {"count": 1, "quantized": 1, "left_float": []}


def test_gru_stays_float_and_the_notes_say_why(http):
    job, _ = run_job(http, rnn_model("GRU", head=True), "gru-head", "quantize.int8_dynamic")
    assert job["status"] == "succeeded", job
    result = onnx.load_from_string(download(http, job))
    assert ops_in(result.graph)["GRU"] == 1 and ops_in(result.graph)["MatMulInteger"] == 1
    assert any("GRU node(s) ('gru') stay float: ONNX Runtime has no int8 GRU kernel" in note
               for note in job["summary"]["notes"]), job["summary"]["notes"]
    gru = step_details(http, job)["recurrent"]["GRU"]
    assert gru["quantized"] == 0 and gru["left_float"] == ["gru"] and "no int8 GRU kernel" in gru["reason"]


def test_gru_alone_is_nothing_to_quantize_with_the_reason(http):
    job, _ = run_job(http, rnn_model("GRU"), "gru", "quantize.int8_dynamic")
    assert_failed_and_nothing_kept(http, job, "nothing_to_quantize")
    assert "no int8 GRU kernel" in job["error"]["message"]


def test_int8_static_names_the_branches_it_cannot_reach(http):
    job, _ = run_job(http, if_model(), "if-static", "quantize.int8_static", {"allow_random_calibration": True})
    assert job["status"] == "succeeded", job
    notes = job["summary"]["notes"]
    for branch, count in (("then_branch", 2), ("else_branch", 1)):
        assert any(f"{count} MatMul inside the {branch} of If node 'branch' stay float" in n and "main graph only" in n
                   for n in notes), notes
    result = onnx.load_from_string(download(http, job))
    assert ops_in(result.graph)["QuantizeLinear"] > 0  # the main graph's MatMul was quantized
    assert ops_in(result.graph, "branch", "then_branch")["MatMul"] == 2


def test_int8_static_on_a_model_whose_weights_all_sit_in_a_loop_fails_naming_the_body(http):
    job, _ = run_job(http, loop_model(), "loop-static", "quantize.int8_static", {"allow_random_calibration": True})
    assert_failed_and_nothing_kept(http, job, "nothing_to_quantize")
    assert "the body of Loop node 'steps'" in job["error"]["message"]
    assert "quantize.int8_dynamic" in job["error"]["message"]


def test_int4_weight_only_reaches_into_the_branches(http):
    job, original = run_job(http, if_model(), "if-int4", "quantize.int4_weight_only", {"bits": 8})
    assert job["status"] == "succeeded", job
    result = onnx.load_from_string(download(http, job))
    assert ops_in(result.graph, "branch", "then_branch")["MatMulNBits"] == 2
    assert ops_in(result.graph, "branch", "else_branch")["MatMulNBits"] == 1
    rng = np.random.default_rng(4)
    feeds = [{"x": rng.standard_normal((4, 32)).astype(np.float32), "cond": np.array(flag)}
             for flag in (True, False) for _ in range(4)]
    assert agreement(original, result.SerializeToString(), feeds) > 0.99
    details = step_details(http, job)
    assert details["weights_quantized"] == 4 and details["weights_left_float"] == 0
    assert {(s["node"], s["attribute"], s["quantized"]) for s in details["subgraphs"]} == {
        ("branch", "then_branch", 2), ("branch", "else_branch", 1)}


def test_conv_in_a_branch_with_its_weight_in_the_main_graph_is_quantized(tmp_path):
    """ORT's Conv quantizer looks the weight up only in the branch; the method moves it there first (Silero
    VAD's op18 export keeps every weight in the main graph)."""
    from workers.methods import get
    from workers.methods.base import StepContext

    rng = np.random.default_rng(5)
    conv = h.make_node("Conv", ["img", "Wc", "Bc"], ["c"], name="branch_conv", pads=[1, 1, 1, 1])
    then_branch = h.make_graph([conv, h.make_node("Relu", ["c"], ["then_y"], name="branch_relu")], "then", [],
                               [h.make_tensor_value_info("then_y", T.FLOAT, ["N", 8, 12, 12])])
    else_branch = h.make_graph([h.make_node("Identity", ["zeros"], ["else_y"], name="branch_zero")], "else", [],
                               [h.make_tensor_value_info("else_y", T.FLOAT, ["N", 8, 12, 12])])
    graph = h.make_graph(
        [h.make_node("Mul", ["img", "zero"], ["prod"], name="scale"),
         h.make_node("Concat", ["prod"] * 8, ["zeros"], name="fan", axis=1),
         h.make_node("If", ["cond"], ["y"], name="pick", then_branch=then_branch, else_branch=else_branch)],
        "conv_if",
        [h.make_tensor_value_info("img", T.FLOAT, ["N", 1, 12, 12]), h.make_tensor_value_info("cond", T.BOOL, [])],
        [h.make_tensor_value_info("y", T.FLOAT, ["N", 8, 12, 12])],
        initializer=[nh.from_array(rng.standard_normal((8, 1, 3, 3)).astype(np.float32), "Wc"),
                     nh.from_array(rng.standard_normal(8).astype(np.float32), "Bc"),
                     nh.from_array(np.zeros(1, np.float32), "zero")])
    source = tmp_path / "conv_if.onnx"
    onnx.save(h.make_model(graph, opset_imports=OPSET), source)
    method = get("quantize.int8_dynamic")
    output = method.run(source, method.params_model(), tmp_path / "out", StepContext())
    result = onnx.load(str(output.model_path))
    assert ops_in(result.graph, "pick", "then_branch")["ConvInteger"] == 1
    assert "Wc" not in {init.name for init in result.graph.initializer}  # moved, not copied
    feeds = [{"img": rng.standard_normal((2, 1, 12, 12)).astype(np.float32), "cond": np.array(True)}
             for _ in range(4)]
    assert agreement(source.read_bytes(), result.SerializeToString(), feeds) > 0.99
