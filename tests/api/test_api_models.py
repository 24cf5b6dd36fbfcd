"""POST/GET/DELETE /v1/models: streaming upload, dedupe, inspection, and every bad input."""
from __future__ import annotations

import hashlib
import io
import zipfile

import pytest

from app.dbmodels import Blob, Job, Model
from tests.helpers import row_count, shared_model, store_files, tmp_leftovers


def upload(client, headers, data: bytes, filename="model.onnx", name=None, raw=False):
    if raw:
        return client.post("/v1/models", content=data,
                           headers={**headers, "Content-Type": "application/octet-stream", "X-Filename": filename})
    form = {"name": name} if name else None
    return client.post("/v1/models", files={"file": (filename, data)}, data=form, headers=headers)


def test_upload_multipart_answers_201_with_inspection(client, alice, mlp_onnx):
    resp = upload(client, alice, mlp_onnx, name="my-mlp")
    assert resp.status_code == 201, resp.text
    body = resp.json()
    assert body["name"] == "my-mlp"
    assert body["format"] == "onnx"
    assert body["size_bytes"] == len(mlp_onnx)
    assert body["sha256"] == hashlib.sha256(mlp_onnx).hexdigest()
    inspection = body["inspection"]
    assert inspection["inputs"][0]["name"] == "features"
    assert inspection["inputs"][0]["shape"] == ["batch", 64]
    assert inspection["outputs"][0]["name"] == "logits"
    assert inspection["parameters"] == 64 * 256 + 256 + 256 * 256 + 256 + 256 * 10 + 10
    assert inspection["op_histogram"]["Gemm"] == 3
    assert {"id", "created_at"} <= body.keys()


def test_raw_upload_and_download_roundtrip(client, alice, mlp_onnx):
    resp = upload(client, alice, mlp_onnx, filename="raw.onnx", raw=True)
    assert resp.status_code == 201, resp.text
    model_id = resp.json()["id"]
    assert resp.json()["name"] == "raw.onnx"
    got = client.get(f"/v1/models/{model_id}/download", headers=alice)
    assert got.status_code == 200
    assert got.content == mlp_onnx
    assert got.headers["x-content-sha256"] == hashlib.sha256(mlp_onnx).hexdigest()
    assert client.get(f"/v1/models/{model_id}", headers=alice).json()["id"] == model_id


def test_same_bytes_are_stored_once(client, alice, bob, data_dir, mlp_onnx):
    first = upload(client, alice, mlp_onnx).json()
    second = upload(client, alice, mlp_onnx, name="again").json()
    third = upload(client, bob, mlp_onnx).json()
    assert len({first["id"], second["id"], third["id"]}) == 3
    assert first["sha256"] == second["sha256"] == third["sha256"]
    assert len(store_files(data_dir)) == 1
    assert row_count(Blob) == 1
    # Deleting one model keeps the blob the others still use; deleting the last frees it.
    for headers, model in ((alice, first), (alice, second)):
        assert client.delete(f"/v1/models/{model['id']}", headers=headers).status_code == 204
    assert len(store_files(data_dir)) == 1
    assert client.delete(f"/v1/models/{third['id']}", headers=bob).status_code == 204
    assert store_files(data_dir) == []
    assert row_count(Blob) == 0


def test_list_is_newest_first_with_cursor(client, alice, mlp_onnx):
    ids = [upload(client, alice, mlp_onnx, name=f"m{i}").json()["id"] for i in range(3)]
    page = client.get("/v1/models?limit=2", headers=alice).json()
    assert [m["id"] for m in page["items"]] == ids[::-1][:2]
    rest = client.get(f"/v1/models?limit=2&cursor={page['next_cursor']}", headers=alice).json()
    assert [m["id"] for m in rest["items"]] == [ids[0]]
    assert rest["next_cursor"] is None


def test_zip_with_external_data_is_accepted(client, alice, tmp_path):
    import onnx

    from tests.helpers import mlp_onnx_bytes

    model = onnx.load_from_string(mlp_onnx_bytes())
    onnx.save_model(model, tmp_path / "net.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
                    location="net.onnx.data", size_threshold=0)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.write(tmp_path / "net.onnx", "net.onnx")
        zf.write(tmp_path / "net.onnx.data", "net.onnx.data")
    resp = upload(client, alice, buf.getvalue(), filename="net.zip")
    assert resp.status_code == 201, resp.text
    assert resp.json()["format"] == "onnx-zip"
    assert resp.json()["inspection"]["external_data"] is True


def test_real_model_yolox_inspection(client, alice):
    path = shared_model("yolox-nano/yolox_nano.onnx")
    resp = upload(client, alice, path.read_bytes(), filename="yolox_nano.onnx")
    assert resp.status_code == 201, resp.text
    inputs = resp.json()["inspection"]["inputs"]
    assert inputs == [{"name": "images", "dtype": "float32", "shape": [1, 3, 416, 416]}]


# --- bad inputs: status, stable code, and nothing left behind -------------------------------

BAD_UPLOADS = [
    pytest.param(b"<!doctype html><html><body>not a model</body></html>", "page.onnx", 422, "invalid_model", id="html"),
    pytest.param(b"\x08\x07\x12\xff\xff\xff\xff\xff\x01garbage", "corrupt.onnx", 422, "invalid_model", id="corrupt-protobuf"),
    pytest.param(b"", "empty.onnx", 422, "invalid_model", id="empty"),
    pytest.param(b"hello", "notes.txt", 422, "invalid_model", id="wrong-suffix"),
]


@pytest.mark.parametrize("data,filename,status,code", BAD_UPLOADS)
def test_bad_upload_is_refused_and_leaves_nothing(client, alice, data_dir, data, filename, status, code):
    resp = upload(client, alice, data, filename=filename)
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    assert resp.json()["code"] == code
    assert resp.json()["message"]
    assert store_files(data_dir) == []
    assert tmp_leftovers(data_dir) == []
    assert row_count(Model) == 0 and row_count(Blob) == 0


def test_truncated_model_is_invalid(client, alice, data_dir, mlp_onnx):
    resp = upload(client, alice, mlp_onnx[: len(mlp_onnx) // 2])
    assert resp.status_code == 422
    assert resp.json()["code"] == "invalid_model"
    assert store_files(data_dir) == [] and row_count(Model) == 0


def test_upload_over_the_cap_is_413(client, alice, data_dir, mlp_onnx, monkeypatch):
    from app.settings import get_settings

    monkeypatch.setenv("MODELPRESS_MAX_UPLOAD_BYTES", "1000")
    get_settings.cache_clear()
    for raw in (False, True):
        resp = upload(client, alice, mlp_onnx, raw=raw)
        assert resp.status_code == 413, resp.text
        assert resp.json()["code"] == "payload_too_large"
    assert store_files(data_dir) == [] and tmp_leftovers(data_dir) == []
    assert row_count(Model) == 0


def test_upload_over_the_cap_without_content_length(client, alice, data_dir, mlp_onnx, monkeypatch):
    """A chunked body declares no length: the cap is enforced while streaming."""
    from app.settings import get_settings

    monkeypatch.setenv("MODELPRESS_MAX_UPLOAD_BYTES", "1000")
    get_settings.cache_clear()

    def chunks():
        for start in range(0, len(mlp_onnx), 512):
            yield mlp_onnx[start:start + 512]

    resp = client.post("/v1/models", content=chunks(),
                       headers={**alice, "Content-Type": "application/octet-stream", "X-Filename": "m.onnx"})
    assert resp.status_code == 413
    assert store_files(data_dir) == [] and tmp_leftovers(data_dir) == []


def test_raw_upload_needs_a_filename(client, alice, mlp_onnx):
    resp = client.post("/v1/models", content=mlp_onnx, headers={**alice, "Content-Type": "application/octet-stream"})
    assert resp.status_code == 422
    assert resp.json()["code"] == "missing_filename"


def test_unknown_content_type_is_415(client, alice, mlp_onnx):
    resp = client.post("/v1/models", content=mlp_onnx, headers={**alice, "Content-Type": "text/plain"})
    assert resp.status_code == 415
    assert resp.json()["code"] == "unsupported_media_type"


def test_multipart_without_file_field(client, alice):
    resp = client.post("/v1/models", data={"name": "x"}, files={"other": ("a.onnx", b"x")}, headers=alice)
    assert resp.status_code == 422
    assert resp.json()["code"] == "missing_file"


def test_unknown_model_is_404(client, alice):
    for method, path in (("get", "/v1/models/nope"), ("get", "/v1/models/nope/download"),
                         ("delete", "/v1/models/nope")):
        resp = client.request(method.upper(), path, headers=alice)
        assert resp.status_code == 404
        assert resp.json()["code"] == "model_not_found"


def test_delete_refused_while_a_job_uses_the_model(client, alice, mlp_onnx, data_dir):
    model_id = upload(client, alice, mlp_onnx).json()["id"]
    job = client.post("/v1/jobs", json={"model_id": model_id, "steps": [{"method": "quantize.int8_dynamic"}]},
                      headers=alice)
    assert job.status_code == 202
    resp = client.delete(f"/v1/models/{model_id}", headers=alice)
    assert resp.status_code == 409
    assert resp.json()["code"] == "model_in_use"
    assert client.get(f"/v1/models/{model_id}", headers=alice).status_code == 200
    assert len(store_files(data_dir)) == 1
    # Once the job is no longer active the model can go.
    assert client.post(f"/v1/jobs/{job.json()['id']}/cancel", headers=alice).status_code == 202
    assert client.delete(f"/v1/models/{model_id}", headers=alice).status_code == 204
    assert row_count(Job) == 1  # the finished job outlives its model
