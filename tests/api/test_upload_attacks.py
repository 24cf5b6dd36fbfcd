"""Hostile uploads, each tried end to end through POST /v1/models or /v1/datasets.

Every attack must come back as a problem+json with its status, a stable code and a message a
user can act on, leave no row, blob or tmp file behind, and never run or read what it aims at.
The zip-slip, zip-bomb and corrupt-file cases live in test_onnx_files.py, test_api_models.py and
test_datasets.py; this file covers what an attacker tries next.
"""
from __future__ import annotations

import builtins
import contextlib
import ctypes
import dataclasses
import io
import os
import pickle
import stat
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from app.dbmodels import Blob, Dataset, Model
from tests.helpers import mlp_onnx_bytes, npz_bytes, row_count, store_files, tmp_leftovers


class WritesMarker:
    """Unpickling this object creates the file at `path`: the stand-in for arbitrary code."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def upload_model(client, headers, data: bytes, filename: str):
    return client.post("/v1/models", files={"file": (filename, data)}, headers=headers)


def upload_dataset(client, headers, data: bytes, filename: str):
    return client.post("/v1/datasets", files={"file": (filename, data)}, headers=headers)


def assert_refused(resp, data_dir: Path, status: int, code: str) -> dict:
    """The refusal a user sees, and the proof that nothing of the upload was kept."""
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    body = resp.json()
    assert body["code"] == code, body
    assert body["message"]
    assert store_files(data_dir) == [] and tmp_leftovers(data_dir) == []
    assert row_count(Model) == 0 and row_count(Dataset) == 0 and row_count(Blob) == 0
    return body


def zip_bytes(members: dict[str, bytes], *, symlinks: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
    return buf.getvalue()


def one_node_model(op_type: str, *, domain: str = "", opsets: dict[str, int] | None = None) -> bytes:
    node = helper.make_node(op_type, ["x"], ["y"], domain=domain)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    imports = [helper.make_opsetid(d, v) for d, v in (opsets or {"": 17}).items()]
    return helper.make_model(graph, opset_imports=imports).SerializeToString()


# --- 1. external data that points at files outside the model ----------------------------------

def with_external_location(tmp_path: Path, location: str) -> tuple[bytes, bytes]:
    """The MLP with its weights in `net.onnx.data`, then every reference rewritten to `location`."""
    model = onnx.load_from_string(mlp_onnx_bytes())
    onnx.save_model(model, tmp_path / "net.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
                    location="net.onnx.data", size_threshold=0)
    model = onnx.load(str(tmp_path / "net.onnx"), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    return model.SerializeToString(), (tmp_path / "net.onnx.data").read_bytes()


IN_OPEN, IN_ACCESS = 0x20, 0x1


@contextlib.contextmanager
def opens_of(target: Path):
    """Every open of `target` while the block runs, as a list that fills: `open`, `io.open` and `os.open` in
    this process (the API runs here, behind the TestClient; paths resolved, symbolic links followed), and,
    where the kernel offers inotify, any open or read of the file by anything (ONNX's and ONNX Runtime's C++
    readers, other processes) once the block ends."""
    target_path = os.path.realpath(target)
    opened: list[str] = []

    def note(how: str, file, dir_fd=None) -> None:
        if isinstance(file, int):
            return
        try:
            path = os.fsdecode(os.fspath(file))
            if dir_fd is not None and not os.path.isabs(path):
                path = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), path)
            resolved = os.path.realpath(path)
        except (TypeError, ValueError, OSError):  # not a path, or one no open could take (a NUL byte)
            return
        if resolved == target_path:
            opened.append(f"{how}({file!r})")

    real_open, real_io_open, real_os_open = builtins.open, io.open, os.open

    def recording_open(file, *args, **kwargs):
        note("open", file)
        return real_open(file, *args, **kwargs)

    def recording_io_open(file, *args, **kwargs):
        note("io.open", file)
        return real_io_open(file, *args, **kwargs)

    def recording_os_open(path, flags, mode=0o777, *, dir_fd=None):
        note("os.open", path, dir_fd)
        return real_os_open(path, flags, mode, dir_fd=dir_fd)

    libc = ctypes.CDLL(None, use_errno=True)
    watch = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
    if watch >= 0 and libc.inotify_add_watch(watch, os.fsencode(target_path), IN_OPEN | IN_ACCESS) < 0:
        os.close(watch)
        watch = -1
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(builtins, "open", recording_open)
            mp.setattr(io, "open", recording_io_open)
            mp.setattr(os, "open", recording_os_open)
            yield opened
    finally:
        if watch >= 0:
            try:
                if os.read(watch, 4096):
                    opened.append("opened or read, as the kernel saw it (inotify)")
            except BlockingIOError:
                pass
            finally:
                os.close(watch)


def kernel_watch_available(path: Path) -> bool:
    libc = ctypes.CDLL(None, use_errno=True)
    watch = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
    if watch < 0:
        return False
    try:
        return libc.inotify_add_watch(watch, os.fsencode(path), IN_OPEN | IN_ACCESS) >= 0
    finally:
        os.close(watch)


@pytest.fixture
def sentinel(tmp_path: Path) -> Path:
    """A file outside any upload that the attacks below aim at: the MLP's real weights, so that a server that
    did follow the reference would load the model, not fail on it."""
    folder = tmp_path / "outside"
    folder.mkdir()
    _graph, data = with_external_location(tmp_path, "net.onnx.data")
    path = folder / "weights.bin"
    path.write_bytes(data)
    return path


def test_the_open_recorder_sees_every_way_in(sentinel, tmp_path):
    """Guard for the tests below: each way of opening the sentinel is recorded; opening another file is not."""
    (tmp_path / "link").symlink_to(sentinel)
    folder_fd = os.open(sentinel.parent, os.O_RDONLY)
    ways = {
        "open": lambda: open(sentinel, "rb").close(),
        "io.open": lambda: io.open(str(sentinel), "rb").close(),
        "Path.read_bytes": sentinel.read_bytes,
        "os.open": lambda: os.close(os.open(sentinel, os.O_RDONLY)),
        "os.open with dir_fd": lambda: os.close(os.open(sentinel.name, os.O_RDONLY, dir_fd=folder_fd)),
        "a symbolic link to it": (tmp_path / "link").read_bytes,
        "numpy": lambda: np.fromfile(sentinel, dtype=np.uint8),
    }
    if kernel_watch_available(sentinel):
        ways["another process"] = lambda: subprocess.run(["cat", str(sentinel)], check=True, capture_output=True)
    try:
        for name, way in ways.items():
            with opens_of(sentinel) as opened:
                way()
            assert opened, name
        with opens_of(sentinel) as opened:
            (tmp_path / "other").write_bytes(b"x")
            (tmp_path / "other").read_bytes()
        assert opened == []
    finally:
        os.close(folder_fd)


def outside_location(kind: str, target: Path) -> str:
    climb = "../" * 40 + str(target).lstrip("/")  # from any folder the upload may be unpacked in
    return {"absolute": str(target), "dot-dot": climb, "nul-then-dot-dot": f"net.onnx.data\x00/{climb}"}[kind]


@pytest.mark.parametrize("location", ["absolute", "dot-dot", "nul-then-dot-dot"])
@pytest.mark.parametrize("packaging", ["single-onnx", "zip-with-data"])
def test_external_data_outside_the_model_is_refused_unread(client, alice, data_dir, tmp_path, sentinel, location,
                                                           packaging):
    graph, data = with_external_location(tmp_path, outside_location(location, sentinel))
    upload = (graph, "net.onnx") if packaging == "single-onnx" else (
        zip_bytes({"net.onnx": graph, "net.onnx.data": data}), "net.zip")
    with opens_of(sentinel) as opened:
        resp = upload_model(client, alice, *upload)
    body = assert_refused(resp, data_dir, 422, "unsafe_archive")
    assert "outside" in body["message"]
    assert opened == []  # refused on the name alone: the file it names was never opened


def test_external_data_member_that_is_a_symlink_is_refused_unread(client, alice, data_dir, tmp_path, sentinel):
    graph, _ = with_external_location(tmp_path, "net.onnx.data")
    archive = zip_bytes({"net.onnx": graph}, symlinks={"net.onnx.data": str(sentinel)})
    with opens_of(sentinel) as opened:
        resp = upload_model(client, alice, archive, "net.zip")
    body = assert_refused(resp, data_dir, 422, "unsafe_archive")
    assert "symbolic link" in body["message"]
    assert opened == []


def test_external_data_in_a_model_local_function_is_checked_too(client, alice, data_dir, sentinel):
    """A Constant inside a function body is a tensor the loader reads like any initializer."""
    value = helper.make_tensor("k", TensorProto.FLOAT, [1], [1.0])
    value.ClearField("float_data")
    value.data_location = TensorProto.EXTERNAL
    for key, text in (("location", str(sentinel)), ("offset", "0"), ("length", "4")):
        entry = value.external_data.add()
        entry.key, entry.value = key, text
    body = [helper.make_node("Constant", [], ["k"], value=value), helper.make_node("Add", ["a", "k"], ["b"])]
    function = helper.make_function("local.fns", "AddOne", ["a"], ["b"], body, [helper.make_opsetid("", 17)])
    graph = helper.make_graph([helper.make_node("AddOne", ["x"], ["y"], domain="local.fns")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, functions=[function],
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local.fns", 1)])
    with opens_of(sentinel) as opened:
        resp = upload_model(client, alice, model.SerializeToString(), "fn.onnx")
    assert_refused(resp, data_dir, 422, "unsafe_archive")
    assert opened == []


# --- 2. a protobuf over the size one ONNX file can hold -----------------------------------------

@pytest.fixture
def proto_cap_1000(monkeypatch):
    """The API's limits with a 1000-byte protobuf cap, so a small model stands in for a >2 GiB one."""
    from app.settings import Settings

    real = Settings.file_limits
    monkeypatch.setattr(Settings, "file_limits", lambda settings: dataclasses.replace(
        real(settings), max_model_proto_bytes=1000))


def test_the_api_caps_one_protobuf_at_what_protobuf_can_hold(data_dir):
    from app.settings import get_settings

    assert get_settings().file_limits().max_model_proto_bytes == 2**31 - 1


@pytest.mark.parametrize("upload", [
    pytest.param((mlp_onnx_bytes(), "mlp.onnx"), id="single-onnx"),
    pytest.param((zip_bytes({"mlp.onnx": mlp_onnx_bytes()}), "mlp.zip"), id="onnx-in-zip"),
    # Garbage gets the size answer, not a parse error: the cap is checked before parsing.
    pytest.param((b"\x08\x07" + b"\xff" * 4000, "junk.onnx"), id="unparsable-over-cap"),
])
def test_model_over_the_protobuf_cap_is_refused_before_parsing(client, alice, data_dir, proto_cap_1000, upload):
    resp = upload_model(client, alice, *upload)
    body = assert_refused(resp, data_dir, 413, "model_too_large")
    assert body["limit_bytes"] == 1000
    assert "external data" in body["message"] and ".zip" in body["message"]


def test_model_under_the_protobuf_cap_is_accepted(client, alice, data_dir, monkeypatch):
    from app.settings import Settings

    real = Settings.file_limits
    monkeypatch.setattr(Settings, "file_limits", lambda settings: dataclasses.replace(
        real(settings), max_model_proto_bytes=len(mlp_onnx_bytes())))
    assert upload_model(client, alice, mlp_onnx_bytes(), "mlp.onnx").status_code == 201


# --- 3. subgraphs nested too deep ---------------------------------------------------------------

def _length_delimited(field_number: int, payload: bytes) -> bytes:
    from google.protobuf.internal.encoder import _VarintBytes

    return _VarintBytes(field_number << 3 | 2) + _VarintBytes(len(payload)) + payload


def nested_if_model(levels: int) -> bytes:
    """`levels` If nodes, each in the then_branch of the one above, around an Identity.

    Written as wire bytes: protobuf's own parser (which onnx.helper goes through) refuses to
    build past about 32 levels, and an attacker is not bound by it. Appending a length-delimited
    field to a serialized message sets that field, so each level wraps the bytes of the one below.
    """
    def value(name: str, elem=TensorProto.FLOAT):
        return helper.make_tensor_value_info(name, elem, [1] if elem == TensorProto.FLOAT else [])

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y0"])], "g0", [], [value("y0")])
    graph_bytes = graph.SerializeToString()
    for level in range(1, levels + 1):
        else_branch = helper.make_graph([helper.make_node("Identity", ["x"], [f"e{level}"])], f"e{level}", [],
                                        [value(f"e{level}")])
        node = helper.make_node("If", ["cond"], [f"y{level}"], else_branch=else_branch).SerializeToString()
        then_branch = onnx.AttributeProto(name="then_branch", type=onnx.AttributeProto.GRAPH).SerializeToString()
        node += _length_delimited(5, then_branch + _length_delimited(6, graph_bytes))  # attribute, g
        inputs = [value("x"), value("cond", TensorProto.BOOL)] if level == levels else []
        graph_bytes = (helper.make_graph([], f"g{level}", inputs, [value(f"y{level}")]).SerializeToString()
                       + _length_delimited(1, node))  # node
    model = helper.make_model(helper.make_graph([], "m", [], []), opset_imports=[helper.make_opsetid("", 17)])
    model.ClearField("graph")
    return model.SerializeToString() + _length_delimited(7, graph_bytes)  # graph


def test_nested_if_builder_nests_as_asked():
    model = onnx.load_from_string(nested_if_model(3))
    depth, graph = 0, model.graph
    while graph.node[0].op_type == "If":
        then_branch = next(a.g for a in graph.node[0].attribute if a.name == "then_branch")
        graph, depth = then_branch, depth + 1
    assert depth == 3 and graph.node[0].op_type == "Identity"


@pytest.mark.parametrize("levels", [3, 16])
def test_moderately_nested_model_is_accepted(client, alice, levels):
    resp = upload_model(client, alice, nested_if_model(levels), "nested.onnx")
    assert resp.status_code == 201, resp.text
    assert resp.json()["inspection"]["op_histogram"]["If"] == levels


@pytest.mark.parametrize("levels", [17, 200])  # 17 parses and meets the depth check; 200 stops protobuf first
def test_model_nested_too_deep_is_refused_and_the_api_keeps_serving(client, alice, data_dir, levels):
    resp = upload_model(client, alice, nested_if_model(levels), "deep.onnx")
    body = assert_refused(resp, data_dir, 422, "model_too_deep")
    assert body["max_graph_depth"] == 16 and "16 levels" in body["message"]
    assert upload_model(client, alice, nested_if_model(3), "fine.onnx").status_code == 201


# --- 4. pickles that would run code when loaded ---------------------------------------------------

@pytest.fixture
def marker(tmp_path: Path) -> Path:
    return tmp_path / "pickle-ran"


def torch_checkpoint(payload: WritesMarker, *, legacy: bool) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save({"state_dict": payload}, buf, _use_new_zipfile_serialization=not legacy)
    return buf.getvalue()


def test_the_pickle_payloads_are_live(tmp_path):
    """Guard for the tests below: loading these payloads the unsafe way does create the marker."""
    import torch

    pickle.loads(pickle.dumps(WritesMarker(tmp_path / "plain")))
    for legacy in (True, False):
        marker = tmp_path / f"torch-legacy-{legacy}"
        torch.load(io.BytesIO(torch_checkpoint(WritesMarker(marker), legacy=legacy)), weights_only=False)
        assert marker.exists()
    np.load(io.BytesIO(npz_bytes(features=np.array([WritesMarker(tmp_path / "npz")], dtype=object))),
            allow_pickle=True)["features"]
    assert (tmp_path / "plain").exists() and (tmp_path / "npz").exists()


@pytest.mark.parametrize("kind,filename", [
    ("legacy-torch", "model.pt"),
    ("zip-torch", "model.pth"),
    ("pickle", "model.onnx"),
    ("zip-torch", "model.onnx"),
    ("zip-torch", "model.zip"),
])
def test_pickled_model_is_refused_without_unpickling(client, alice, data_dir, marker, kind, filename):
    payload = WritesMarker(marker)
    data = pickle.dumps(payload) if kind == "pickle" else torch_checkpoint(payload, legacy=kind == "legacy-torch")
    resp = upload_model(client, alice, data, filename)
    body = assert_refused(resp, data_dir, 422, "invalid_model")
    assert "never unpickles" in body["message"] and "export the model to onnx" in body["message"].lower()
    assert not marker.exists()


@pytest.mark.parametrize("build", [
    pytest.param(lambda m: pickle.dumps({"features": WritesMarker(m)}), id="pickle-named-npz"),
    pytest.param(lambda m: npz_bytes(features=np.array([WritesMarker(m)], dtype=object)), id="object-array-npz"),
    pytest.param(lambda m: pickle.dumps(WritesMarker(m)) + npz_bytes(features=np.zeros((2, 4), np.float32)),
                 id="pickle-with-npz-appended"),
])
def test_pickled_dataset_is_refused_without_unpickling(client, alice, data_dir, marker, build):
    resp = upload_dataset(client, alice, build(marker), "data.npz")
    assert_refused(resp, data_dir, 422, "invalid_dataset")
    assert not marker.exists()


def test_pickle_named_npz_says_why(client, alice, data_dir, marker):
    resp = upload_dataset(client, alice, pickle.dumps({"features": WritesMarker(marker)}), "data.npz")
    body = assert_refused(resp, data_dir, 422, "invalid_dataset")
    assert "pickle" in body["message"] and "never unpickles" in body["message"]


def test_safetensors_whose_header_length_looks_like_a_pickle_is_accepted(client, alice):
    """A 640-byte header's length starts with the bytes of a protocol-2 pickle; it is no pickle."""
    import json
    import struct

    header = json.dumps({"features": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}).encode()
    header = header.ljust(640)  # the format allows trailing spaces
    data = struct.pack("<Q", len(header)) + header + np.ones((2, 2), "<f4").tobytes()
    assert data[:2] == b"\x80\x02"
    resp = upload_dataset(client, alice, data, "data.safetensors")
    assert resp.status_code == 201, resp.text


# --- 5. ops ONNX Runtime cannot run without a custom-op library ----------------------------------

def custom_op_inside_if() -> bytes:
    inner = helper.make_graph([helper.make_node("Backdoor", ["x"], ["t"], domain="com.evil")], "then", [],
                              [helper.make_tensor_value_info("t", TensorProto.FLOAT, [1, 4])])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, [1, 4])])
    node = helper.make_node("If", ["cond"], ["y"], then_branch=inner, else_branch=other)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4]),
                                            helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.evil", 1)])
    return model.SerializeToString()


@pytest.mark.parametrize("data,names", [
    pytest.param(one_node_model("Backdoor", domain="com.evil", opsets={"": 17, "com.evil": 1}),
                 ["com.evil", "Backdoor"], id="custom-domain"),
    pytest.param(one_node_model("Backdoor", domain="com.evil"), ["com.evil", "Backdoor"],
                 id="custom-domain-not-imported"),
    pytest.param(custom_op_inside_if(), ["com.evil", "Backdoor"], id="custom-domain-in-subgraph"),
    pytest.param(one_node_model("NoSuchOp"), ["NoSuchOp", "opset 17"], id="unknown-standard-op"),
    pytest.param(one_node_model("Gelu"), ["Gelu", "opset 17"], id="op-newer-than-the-opset"),
])
def test_op_onnx_runtime_cannot_run_is_refused(client, alice, data_dir, data, names):
    resp = upload_model(client, alice, data, "ops.onnx")
    body = assert_refused(resp, data_dir, 422, "unsupported_op")
    assert all(name in body["message"] for name in names), body["message"]
    assert body["unsupported_ops"]


def test_custom_domain_refusal_says_no_custom_op_library_is_loaded(client, alice, data_dir):
    data = one_node_model("Backdoor", domain="com.evil", opsets={"": 17, "com.evil": 1})
    body = assert_refused(upload_model(client, alice, data, "ops.onnx"), data_dir, 422, "unsupported_op")
    assert "custom-op libraries" in body["message"]
    assert body["unsupported_ops"] == [{"domain": "com.evil", "op_type": "Backdoor"}]


def test_onnx_runtime_contrib_op_is_accepted(client, alice):
    """com.microsoft ops are built into ONNX Runtime; quantized models use them."""
    data = one_node_model("Gelu", domain="com.microsoft", opsets={"": 17, "com.microsoft": 1})
    resp = upload_model(client, alice, data, "contrib.onnx")
    assert resp.status_code == 201, resp.text
    assert resp.json()["inspection"]["op_histogram"] == {"com.microsoft.Gelu": 1}


def test_model_local_function_in_its_own_domain_is_accepted(client, alice):
    """A function defined in the model runs from its body: its domain needs no library."""
    body = [helper.make_node("Relu", ["a"], ["r"]), helper.make_node("Neg", ["r"], ["b"])]
    function = helper.make_function("local.fns", "NegRelu", ["a"], ["b"], body, [helper.make_opsetid("", 17)])
    graph = helper.make_graph([helper.make_node("NegRelu", ["x"], ["y"], domain="local.fns")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    model = helper.make_model(graph, functions=[function],
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local.fns", 1)])
    resp = upload_model(client, alice, model.SerializeToString(), "fn.onnx")
    assert resp.status_code == 201, resp.text
