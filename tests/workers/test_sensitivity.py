"""Per-node sensitivity (workers.search.sensitivity): a node that int8 breaks is ranked first, time shares come
from the profiler in the float and the quantized model, and a deadline stops the measuring."""
from __future__ import annotations

import json
import time

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from app.reports import SensitivityReport, load_report
from tests.helpers import ROOT
from workers.search.sensitivity import UNMAPPED, node_sensitivity

CONVS = ("conv_in", "conv_fragile", "conv_wide", "conv_out")


def sensitive_cnn() -> onnx.ModelProto:
    """Four Convs and a Gemm; outputs: the logits and the last feature map. conv_in gives one channel a bias of 400
    that conv_fragile reads with zero weights: the float outputs ignore that channel, but it sets the range of
    conv_fragile's input, so uint8 has about 1.6 per step for activations of about 1 and conv_fragile alone breaks
    the model. conv_wide does six times the work of any other node."""
    rng = np.random.default_rng(7)
    shapes = {"conv_in": (16, 3), "conv_fragile": (16, 16), "conv_wide": (96, 16), "conv_out": (8, 96)}
    nodes, inits = [], []
    source = "x"
    for name, (cout, cin) in shapes.items():
        kernel = 1 if name == "conv_out" else 3
        weight = (rng.standard_normal((cout, cin, kernel, kernel)) / np.sqrt(cin * kernel * kernel)).astype(np.float32)
        bias = np.zeros(cout, np.float32)
        if name == "conv_in":
            bias[5] = 400.0
        if name == "conv_fragile":
            weight[:, 5] = 0.0
        inits += [numpy_helper.from_array(weight, f"{name}_w"), numpy_helper.from_array(bias, f"{name}_b")]
        nodes += [helper.make_node("Conv", [source, f"{name}_w", f"{name}_b"], [f"{name}_y"], name=name,
                                   pads=[kernel // 2] * 4),
                  helper.make_node("Relu", [f"{name}_y"], [f"{name}_r"], name=f"{name}_relu")]
        source = f"{name}_r"
    inits += [numpy_helper.from_array(rng.standard_normal((8, 10)).astype(np.float32), "head_w"),
              numpy_helper.from_array(np.zeros(10, np.float32), "head_b")]
    nodes += [helper.make_node("GlobalAveragePool", [source], ["pooled"], name="pool"),
              helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten"),
              helper.make_node("Gemm", ["flat", "head_w", "head_b"], ["logits"], name="head")]
    graph = helper.make_graph(nodes, "sensitive", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 16, 16])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 10]),
                               helper.make_tensor_value_info(source, TensorProto.FLOAT, ["n", 8, 16, 16])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("sensitivity") / "cnn.onnx"
    onnx.save(sensitive_cnn(), str(path))
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((4, 3, 16, 16)).astype(np.float32)} for _ in range(4)]
    return path, feeds


def quantized(path, feeds, scheme: str):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_dynamic, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter(feeds)

        def get_next(self):
            return next(self.feeds, None)

    out = path.with_name(f"cnn-{scheme}.onnx")
    if scheme == "static":
        quantize_static(str(path), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True)
    else:
        quantize_dynamic(str(path), str(out))
    return out


@pytest.mark.parametrize("scheme", ["static", "dynamic"])
def test_the_node_int8_breaks_is_ranked_first_and_time_shares_come_from_both_models(model, scheme):
    path, feeds = model
    table = node_sensitivity(path, feeds=feeds, calibration=None, quantized_path=quantized(path, feeds, scheme),
                             source="random test feeds")
    rows = {row.node: row for row in table.rows}
    assert set(rows) == {*CONVS, "head", "pool"} and not table.skipped
    assert table.samples == 16 and table.source == "random test feeds"

    # int8: conv_fragile first, far below every other node.
    first, second = table.rows[0], table.rows[1]
    assert first.node == "conv_fragile"
    assert 1 - first.int8.worst_cosine > 20 * (1 - second.int8.worst_cosine)
    assert first.int8.worst_cosine < 0.99 < second.int8.worst_cosine
    assert first.int8.worst_cosine <= first.int8.mean_cosine
    # fp16 rounding of the same input loses nothing that matters: the outlier does not cost it resolution.
    assert first.fp16.worst_cosine > 0.9999
    fp16_worst = min(table.rows, key=lambda row: row.fp16.worst_cosine)
    assert 1 - fp16_worst.fp16.worst_cosine < (1 - first.int8.worst_cosine) / 100

    # Run time: every node traced in both models, shares of one total, the widest Conv the largest in each.
    for key in ("float_time_share", "quantized_time_share"):
        shares = {row.node: getattr(row, key) for row in table.rows}
        assert all(isinstance(shares[name], float) for name in CONVS), shares
        assert 0 < sum(shares.values()) <= 1 + 1e-9
        assert max(shares, key=shares.get) == "conv_wide", shares
    assert table.unmapped_time_share["quantized"] < 0.2, table.unmapped_nodes

    report = SensitivityReport.model_validate(table.to_json())
    assert report.rows[0].node == "conv_fragile" and report.model_dump(mode="json") == table.to_json()


def test_a_past_deadline_measures_nothing_and_max_nodes_keeps_the_costliest(model):
    path, feeds = model
    table = node_sensitivity(path, feeds=feeds, calibration=None, deadline=time.monotonic() - 1)
    assert table.rows == []
    assert {s.node for s in table.skipped} == {*CONVS, "head", "pool"}
    assert all(s.reason == "the deadline passed before it was measured" for s in table.skipped)

    table = node_sensitivity(path, feeds=feeds[:1], calibration=feeds, max_nodes=1, fp16=False)
    assert [row.node for row in table.rows] == ["conv_wide"] and table.rows[0].fp16 is None
    assert table.rows[0].quantized_time_share is None and table.calibration == "4 calibration feed(s)"
    assert len(table.skipped) == 5 and all("max_nodes=1" in s.reason for s in table.skipped)


def test_reports_load_with_and_without_sensitivity(model):
    stored = json.loads((ROOT / "tests" / "api" / "data" / "report_v1.json").read_text())["report"]
    old = load_report(stored)
    assert old.sensitivity is None and "sensitivity" not in old.model_dump(mode="json")

    path, feeds = model
    table = node_sensitivity(path, feeds=feeds[:1], calibration=None, max_nodes=2, fp16=False).to_json()
    table["rows"][1]["float_time_share"] = UNMAPPED  # as a node no profiled kernel is traced to reads
    new = load_report(stored | {"report_version": 2, "sensitivity": table})
    assert new.sensitivity.rows[1].float_time_share == UNMAPPED
    assert new.model_dump(mode="json")["sensitivity"] == table
