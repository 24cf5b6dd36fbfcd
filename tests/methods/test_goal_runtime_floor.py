"""The goal search skips OpenVINO's candidates where OpenVINO's call alone outlasts the whole original on ONNX
Runtime (workers.search.run._openvino_cannot_win): the rule on given timings, and the timing itself on a real tiny
model (a pass-through model on OpenVINO interleaved with the original on ONNX Runtime)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from tests.helpers import mlp_onnx_bytes


def search_state(tmp_path, model=None, **goal):
    from workers.search.run import Search

    return Search(run=None, workdir=tmp_path, original=model, intake=SimpleNamespace(path=model),  # type: ignore[arg-type]
                  input_shapes=None, spec={"goal": {"time_budget_s": 60, "objective": "latency", "batch_size": 1,
                                                    **goal}, "evaluate": {}})


def openvino(precision: str = "f32"):
    from workers.search.run import Plan

    return Plan(f"openvino-{precision}", "targets", target={"runtime": "openvino", "device": "cpu",
                                                            "precision": precision})


def test_openvino_candidates_are_skipped_where_its_call_alone_outlasts_the_original(tmp_path):
    from workers.search.run import Plan, _cannot_win

    state = search_state(tmp_path)
    state.openvino_floor = {"floor_us": 81.0, "original_us": 53.0, "rounds": 300}
    for precision in ("f32", "bf16", "int8", "int8_bf16"):
        why = _cannot_win(state, openvino(precision))
        assert why is not None and "81 us" in why and "53 us" in why, why
    chained = Plan("int8_static+openvino", "targets", base="int8_static",
                   target={"runtime": "openvino", "device": "cpu", "precision": "int8"})
    assert _cannot_win(state, chained) is not None  # a QDQ model on OpenVINO pays the same call
    assert _cannot_win(state, Plan("int8_static", "quantize")) is None  # ONNX Runtime's candidates are not bound
    state.openvino_floor = {"floor_us": 81.0, "original_us": 400.0, "rounds": 300}
    assert _cannot_win(state, openvino()) is None  # the model's own work dominates: OpenVINO may win
    state.openvino_floor = {"floor_us": 148.0, "original_us": 149.0, "rounds": 300}
    assert _cannot_win(state, openvino()) is None  # too close to call: silero-vad-fw's, where OpenVINO f32 won 1.09x
    state.openvino_floor = {"floor_us": 160.0, "original_us": 149.0, "rounds": 300}
    assert _cannot_win(state, openvino()) is None  # slower, but within the noise a median carries
    state.openvino_floor = {"error": "RuntimeError: cannot feed"}
    assert _cannot_win(state, openvino()) is None  # no timing, no bound: the candidates decide
    for goal in ({"batch_size": 8}, {"objective": "size"}):
        other = search_state(tmp_path, **goal)
        other.openvino_floor = {"floor_us": 81.0, "original_us": 53.0, "rounds": 300}
        assert _cannot_win(other, openvino()) is None, goal  # latency at batch 1 only


def test_the_floor_is_timed_interleaved_on_the_model_and_said_once_in_the_notes(tmp_path):
    pytest.importorskip("openvino")
    from workers.search.run import FLOOR_MARGIN, _cannot_win

    model = tmp_path / "mlp.onnx"
    model.write_bytes(mlp_onnx_bytes())
    state = search_state(tmp_path, model)
    first = _cannot_win(state, openvino())
    floor = state.openvino_floor
    assert floor is not None and "error" not in floor, floor
    assert floor["rounds"] >= 20 and floor["floor_us"] > 0 and floor["original_us"] > 0
    assert (first is not None) == (floor["floor_us"] > FLOOR_MARGIN * floor["original_us"])  # the rule, on what was timed
    assert _cannot_win(state, openvino("bf16")) == first  # timed once per search
    notes = [note for note in state.notes if "OpenVINO's call alone" in note]
    assert len(notes) == 1 and f"{floor['floor_us']:.0f} us" in notes[0]
    assert (tmp_path / "openvino-floor.onnx").is_file()
