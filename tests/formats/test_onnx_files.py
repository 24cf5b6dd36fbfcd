"""Upload validation in isolation: ONNX files, zip archives, and every hostile archive we know of."""
from __future__ import annotations

import io
import stat
import zipfile
from pathlib import Path

import numpy as np
import pytest

from app.errors import InvalidModel, UnsafeArchive
from app.formats.limits import Limits
from app.formats.onnx_files import materialize, validate_upload
from tests.helpers import mlp_onnx_bytes, shared_model


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def make_zip(tmp_path: Path, members: dict[str, bytes], *, name: str = "up.zip", symlinks=(), compression=zipfile.ZIP_DEFLATED) -> Path:
    path = tmp_path / name
    with zipfile.ZipFile(path, "w", compression=compression) as zf:
        for member, data in members.items():
            zf.writestr(member, data)
        for member, target in symlinks:
            info = zipfile.ZipInfo(member)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
    return path


def external_pair(tmp_path: Path) -> tuple[bytes, bytes]:
    import onnx

    model = onnx.load_from_string(mlp_onnx_bytes())
    folder = tmp_path / "ext"
    folder.mkdir()
    onnx.save_model(model, folder / "net.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
                    location="net.onnx.data", size_threshold=0)
    return (folder / "net.onnx").read_bytes(), (folder / "net.onnx.data").read_bytes()


def check(path: Path, tmp_path: Path, filename: str | None = None, limits: Limits = Limits()):
    return validate_upload(path, filename=filename or path.name, workdir=tmp_path / "work", limits=limits)


def test_single_onnx_inspection(tmp_path):
    fmt, inspection = check(write(tmp_path, "mlp.onnx", mlp_onnx_bytes()), tmp_path)
    assert fmt == "onnx"
    assert inspection["inputs"] == [{"name": "features", "dtype": "float32", "shape": ["batch", 64]}]
    assert inspection["outputs"][0]["shape"] == ["batch", 10]
    assert inspection["opsets"] == [{"domain": "ai.onnx", "version": 17}]
    assert inspection["external_data"] is False
    assert inspection["initializer_bytes"] == inspection["parameters"] * 4


def test_zip_with_external_data_materializes_and_loads(tmp_path):
    import onnx

    graph, data = external_pair(tmp_path)
    archive = make_zip(tmp_path, {"model/net.onnx": graph, "model/net.onnx.data": data, "__MACOSX/._net.onnx": b"x"})
    fmt, inspection = check(archive, tmp_path)
    assert fmt == "onnx-zip" and inspection["external_data"] is True
    model_path = materialize(archive, fmt, tmp_path / "out", Limits())
    assert model_path.name == "net.onnx"
    onnx.checker.check_model(onnx.load(str(model_path)))  # weights resolve next to it


def test_single_file_naming_external_data_is_refused(tmp_path):
    graph, _ = external_pair(tmp_path)
    with pytest.raises(InvalidModel, match="external data"):
        check(write(tmp_path, "net.onnx", graph), tmp_path)


def test_zip_missing_its_external_data_is_refused(tmp_path):
    graph, _ = external_pair(tmp_path)
    with pytest.raises(InvalidModel, match="net.onnx.data"):
        check(make_zip(tmp_path, {"net.onnx": graph}), tmp_path)


def test_zip_with_short_external_data_is_refused(tmp_path):
    graph, data = external_pair(tmp_path)
    with pytest.raises(InvalidModel, match="shorter"):
        check(make_zip(tmp_path, {"net.onnx": graph, "net.onnx.data": data[:100]}), tmp_path)


def test_external_data_location_escaping_the_archive_is_refused(tmp_path):
    import onnx

    graph, data = external_pair(tmp_path)
    model = onnx.load_from_string(graph)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../../etc/passwd"
    with pytest.raises(UnsafeArchive, match="outside"):
        check(make_zip(tmp_path, {"net.onnx": model.SerializeToString(), "net.onnx.data": data}), tmp_path)


@pytest.mark.parametrize("member", ["../evil.onnx", "/abs/evil.onnx", "a/../../evil.onnx", "C:/evil.onnx", "a\\..\\evil.onnx"])
def test_zip_path_traversal_is_refused(tmp_path, member):
    with pytest.raises(UnsafeArchive):
        check(make_zip(tmp_path, {member: mlp_onnx_bytes()}), tmp_path)
    assert not (tmp_path / "evil.onnx").exists() and not (tmp_path.parent / "evil.onnx").exists()


def test_zip_symlink_is_refused(tmp_path):
    archive = make_zip(tmp_path, {"net.onnx": mlp_onnx_bytes()}, symlinks=[("net.onnx.data", "/etc/passwd")])
    with pytest.raises(UnsafeArchive, match="symbolic link"):
        check(archive, tmp_path)


def test_zip_bomb_ratio_is_refused(tmp_path):
    archive = make_zip(tmp_path, {"net.onnx": mlp_onnx_bytes(), "pad.bin": b"\0" * (16 << 20)})
    with pytest.raises(UnsafeArchive, match="inflates"):
        check(archive, tmp_path)
    assert not (tmp_path / "work" / "pad.bin").exists()


def test_zip_over_unpacked_cap_is_refused(tmp_path):
    archive = make_zip(tmp_path, {"net.onnx": mlp_onnx_bytes(), "pad.bin": b"\1" * 4096}, compression=zipfile.ZIP_STORED)
    with pytest.raises(UnsafeArchive, match="unpacks to more than"):
        check(archive, tmp_path, limits=Limits(max_unpacked_bytes=len(mlp_onnx_bytes()) + 100))


def test_zip_with_too_many_members_is_refused(tmp_path):
    members = {f"f{i}.txt": b"x" for i in range(20)}
    with pytest.raises(UnsafeArchive, match="members"):
        check(make_zip(tmp_path, {"net.onnx": mlp_onnx_bytes(), **members}), tmp_path, limits=Limits(max_zip_members=10))


def test_zip_duplicate_members_are_refused(tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf, pytest.warns(UserWarning):
        zf.writestr("net.onnx", mlp_onnx_bytes())
        zf.writestr("net.onnx", b"other")
    with pytest.raises(UnsafeArchive, match="twice"):
        check(write(tmp_path, "dup.zip", buf.getvalue()), tmp_path)


@pytest.mark.parametrize("members,match", [
    ({"readme.txt": b"hi"}, "no .onnx"),
    ({"a.onnx": mlp_onnx_bytes(), "b.onnx": mlp_onnx_bytes()}, "2 .onnx files"),
])
def test_zip_must_hold_exactly_one_model(tmp_path, members, match):
    with pytest.raises(InvalidModel, match=match):
        check(make_zip(tmp_path, members), tmp_path)


def test_corrupt_zip_is_invalid(tmp_path):
    with pytest.raises(InvalidModel, match="zip"):
        check(write(tmp_path, "bad.zip", b"PK\x03\x04 truncated"), tmp_path)


def test_model_failing_the_checker_is_invalid(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node("Relu", ["x"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.graph.node[0].input.append("x")  # Relu takes one input (an unknown op is test_upload_attacks' case)
    with pytest.raises(InvalidModel, match="checker"):
        check(write(tmp_path, "bad.onnx", model.SerializeToString()), tmp_path)
    assert onnx  # imported for the helpers


@pytest.mark.parametrize("rel", ["mnist-cnn/opt-mnist.onnx", "ultraface-rfb320/version-RFB-320.onnx"])
def test_real_old_exports_validate(tmp_path, rel):
    path = shared_model(rel)
    fmt, inspection = check(path, tmp_path)
    assert fmt == "onnx"
    assert len(inspection["inputs"]) == 1, "weights listed as graph inputs are not model inputs"
    assert any("graph inputs" in w for w in inspection["warnings"])


STREAM_ALWAYS, STREAM_NEVER = Limits(stream_above_bytes=0), Limits(stream_above_bytes=1 << 62)


@pytest.mark.parametrize("source", ["mlp", "mnist-cnn/opt-mnist.onnx", "ultraface-rfb320/version-RFB-320.onnx",
                                    "yolox-nano/yolox_nano.onnx"])
def test_a_large_single_file_is_checked_through_a_streamed_copy_with_the_same_verdict(tmp_path, source):
    """Above stream_above_bytes a single .onnx is checked without parsing its weights (app.formats.onnx_wire);
    the inspection is the one the plain check gives, on exports from several tools."""
    path = write(tmp_path, "m.onnx", mlp_onnx_bytes() if source == "mlp" else shared_model(source).read_bytes())
    streamed = check(path, tmp_path / "a", filename="m.onnx", limits=STREAM_ALWAYS)
    plain = check(path, tmp_path / "b", filename="m.onnx", limits=STREAM_NEVER)
    assert streamed == plain
    # The copy beside the upload is small: its weights point into the upload itself, nothing was copied.
    copies = list(path.parent.glob(".modelpress-check-*.onnx"))
    assert len(copies) == 1 and copies[0].stat().st_size < path.stat().st_size


def test_the_streamed_check_refuses_a_tensor_whose_data_does_not_fit_its_shape(tmp_path):
    import onnx

    model = onnx.load_from_string(mlp_onnx_bytes())
    weight = model.graph.initializer[0]
    weight.raw_data = weight.raw_data[:-4]  # one float short
    path = write(tmp_path, "short.onnx", model.SerializeToString())
    with pytest.raises(InvalidModel, match="needs"):
        check(path, tmp_path, limits=STREAM_ALWAYS)


def test_what_the_streamed_check_cannot_walk_in_bounds_is_refused_not_parsed_whole(tmp_path, monkeypatch):
    import onnx

    def parse_whole(*args, **kwargs):
        raise AssertionError("a large model was parsed whole")

    monkeypatch.setattr(onnx, "load", parse_whole)  # the plain check's first step
    garbage = write(tmp_path, "garbage.onnx", b"\x0a\xff\xff\xff\xff\x0f" + b"\0" * 100)  # a length past the end
    with pytest.raises(InvalidModel, match="cannot be checked without reading all"):
        check(garbage, tmp_path, limits=STREAM_ALWAYS)
    # Weights kept outside raw_data (float_data) beyond what the copy may hold: refused, with what to do.
    model = onnx.load_from_string(mlp_onnx_bytes())  # (the real loader: the patch replaced onnx.load only)
    weight = model.graph.initializer[0]
    weight.float_data.extend(np.frombuffer(weight.raw_data, np.float32).tolist())
    weight.ClearField("raw_data")
    bulky = write(tmp_path, "floats.onnx", model.SerializeToString())
    with pytest.raises(InvalidModel, match="outside initializers' raw_data.*upload it as a .zip"):
        check(bulky, tmp_path / "b", limits=Limits(stream_above_bytes=0, stream_copy_max_bytes=16 << 10))


def test_a_large_single_file_naming_external_data_anywhere_is_refused(tmp_path):
    """The streamed copy moves only initializers; external data a Constant names is still the upload's own,
    which a single file may not have (before the fix it passed, checked as if it came in an archive)."""
    import onnx
    from onnx import helper

    model = onnx.load_from_string(mlp_onnx_bytes())
    tensor = helper.make_tensor("c", onnx.TensorProto.FLOAT, [1], [0.0])
    tensor.data_location = onnx.TensorProto.EXTERNAL
    del tensor.float_data[:]
    for key, value in (("location", ".modelpress-weights-x.bin"), ("offset", "0"), ("length", "4")):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    model.graph.node.append(helper.make_node("Constant", [], ["unused"], value=tensor))
    path = write(tmp_path, "sneaky.onnx", model.SerializeToString())
    with pytest.raises(InvalidModel, match="external data"):
        check(path, tmp_path, limits=STREAM_ALWAYS)


def test_a_large_model_in_a_zip_is_checked_streamed_with_its_own_external_data(tmp_path):
    """In an archive, some weights may be external data of the user's and some inline: the streamed copy keeps
    the former, points the latter into the .onnx, and reaches the plain check's verdict."""
    import onnx

    model = onnx.load_from_string(mlp_onnx_bytes())
    folder = tmp_path / "mixed"
    folder.mkdir()
    # The first weight goes to external data; the rest stay inline in the .onnx.
    onnx.external_data_helper.set_external_data(model.graph.initializer[0], location="net.onnx.data")
    onnx.save_model(model, folder / "net.onnx")  # writes the external tensor's bytes to net.onnx.data
    archive = make_zip(tmp_path, {"net.onnx": (folder / "net.onnx").read_bytes(),
                                  "net.onnx.data": (folder / "net.onnx.data").read_bytes()})
    streamed = check(archive, tmp_path / "a", limits=STREAM_ALWAYS)
    plain = check(archive, tmp_path / "b", limits=STREAM_NEVER)
    assert streamed == plain and streamed[1]["external_data"] is True
    assert list((tmp_path / "a" / "work").glob(".modelpress-check-*.onnx"))  # it did go the streamed way
