"""Hostile input never becomes a 500 (issue 20): characters PostgreSQL cannot store, values out of range, clients
that hang up, and ids echoed back. Run on SQLite and on PostgreSQL (where NUL bytes used to surface as
psycopg's DataError: a 500 that also dropped the keep-alive connection)."""
from __future__ import annotations

import base64
import datetime as dt
import json

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from app.dbmodels import ApiKey, Job, Model
from tests.helpers import make_key, npz_bytes, queued_messages, row_count, store_files, tmp_leftovers

NUL_CASES = [
    ("GET", "/v1/models/%00"),
    ("GET", "/v1/models/abc%00def/download"),
    ("GET", "/v1/jobs/%00/report"),
    ("GET", "/v1/datasets/%00"),
    ("DELETE", "/v1/models/%00"),
    ("GET", "/v1/models?cursor=%00"),
    ("GET", "/v1/audit?action=%00"),
    ("GET", "/v1/jobs?status=%00"),
    ("GET", "/v1/models/x/measurements?metric=%00"),
    ("GET", "/v1/jobs/x/events?after=%00"),
    ("GET", "/v1/models?%00=1"),
]


@pytest.fixture
def pg_client(database, client):
    """The client on SQLite and on a fresh PostgreSQL database (the `database` fixture runs first)."""
    return client


def key_headers(tenant: str = "alice") -> dict[str, str]:
    return {"Authorization": f"Bearer {make_key(tenant)}"}


@pytest.mark.parametrize("method, url", NUL_CASES)
def test_nul_in_a_path_or_query_is_422_invalid_character(pg_client, method, url):
    resp = pg_client.request(method, url, headers=key_headers())
    assert resp.status_code == 422, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    assert resp.json()["code"] == "invalid_character" and "NUL" in resp.json()["detail"]


@pytest.mark.parametrize("spec", [
    {"model_id": "\u0000", "steps": [{"method": "quantize.int8_dynamic"}]},
    {"model_id": "m", "name": "job\u0000", "steps": [{"method": "quantize.int8_dynamic"}]},
    {"model_id": "m", "steps": [{"method": "quantize.int8_dynamic", "params": {"nodes_to_exclude": ["a\u0000"]}}]},
    {"model_id": "m", "recipe": "distill-int8", "params": {"student_model_id": "\u0000"}},
    {"model_id": "m", "steps": [{"method": "quantize.int8_static", "params": {"calibration_dataset_id": "\ud800"}}]},
    {"model_id": "m", "steps": [{"method": "quantize.int8_dynamic"}], "evaluate": {"eval_dataset_id": "x\udfff"}},
])
def test_unstorable_characters_in_a_job_spec_are_422_and_nothing_is_queued(pg_client, data_dir, spec):
    resp = pg_client.post("/v1/jobs", content=json.dumps(spec), headers={**key_headers(),
                                                                        "Content-Type": "application/json"})
    assert resp.status_code == 422, resp.text
    body = resp.json()
    assert body["code"] == "invalid_character"
    assert body["field"] and body["field"] in body["detail"]
    assert row_count(Job) == 0 and queued_messages(data_dir) == []


def multipart(filename: bytes, content: bytes, **fields: bytes) -> tuple[bytes, dict[str, str]]:
    """A multipart body written by hand: httpx would percent-encode a NUL in the filename, a hostile client
    does not."""
    boundary = b"hostile-boundary"
    parts = [b"--" + boundary + b'\r\nContent-Disposition: form-data; name="' + name.encode() + b'"\r\n\r\n' + value
             + b"\r\n" for name, value in fields.items()]
    parts.append(b"--" + boundary + b'\r\nContent-Disposition: form-data; name="file"; filename="' + filename
                 + b'"\r\nContent-Type: application/octet-stream\r\n\r\n' + content + b"\r\n")
    body = b"".join(parts) + b"--" + boundary + b"--\r\n"
    return body, {"Content-Type": "multipart/form-data; boundary=hostile-boundary"}


def test_nul_in_multipart_filename_or_name_is_422_and_nothing_is_kept(pg_client, data_dir, mlp_onnx):
    headers = key_headers()
    dataset = npz_bytes(x=np.zeros((2, 3), np.float32))
    for route, args in [("/v1/models", (b"m\x00.onnx", mlp_onnx)), ("/v1/datasets", (b"d\x00.npz", dataset))]:
        body, content_type = multipart(*args)
        resp = pg_client.post(route, content=body, headers={**headers, **content_type})
        assert resp.status_code == 422, resp.text
        assert resp.json()["code"] == "invalid_character" and "filename" in resp.json()["detail"]
    body, content_type = multipart(b"m.onnx", mlp_onnx, name=b"a\x00b")
    resp = pg_client.post("/v1/models", content=body, headers={**headers, **content_type})
    assert resp.status_code == 422 and resp.json()["code"] == "invalid_character", resp.text
    assert "'name'" in resp.json()["detail"]
    assert row_count(Model) == 0 and store_files(data_dir) == [] and tmp_leftovers(data_dir) == []


def test_an_onnx_whose_names_hold_nul_is_described_and_stored(pg_client):
    """Names inside an uploaded model (producer, graph, inputs) are the model's own: the upload is accepted and its
    inspection shows U+FFFD where PostgreSQL could not store the character."""
    weight = numpy_helper.from_array(np.ones((4, 2), np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["in\x00put", "w"], ["y"], name="mm\x00")], "g\x00raph",
                              [helper.make_tensor_value_info("in\x00put", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], initializer=[weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="evil\x00tool")
    resp = pg_client.post("/v1/models", files={"file": ("m.onnx", model.SerializeToString())}, headers=key_headers())
    assert resp.status_code == 201, resp.text
    text = json.dumps(resp.json())
    assert "\\u0000" not in text and "in\ufffdput" in resp.json()["inspection"]["inputs"][0]["name"]


@pytest.mark.parametrize("expires_at", ["9999-12-31T23:59:59-12:00", "2020-01-01T00:00:00Z",
                                        "0001-01-01T00:00:00+14:00", "3000-01-01T00:00:00"])
def test_key_expiry_out_of_range_or_in_the_past_is_422(pg_client, expires_at):
    headers = key_headers()
    resp = pg_client.post("/v1/keys", json={"expires_at": expires_at}, headers=headers)
    assert resp.status_code == 422, resp.text
    assert resp.json()["code"] == "invalid_request" and "expires_at" in resp.json()["detail"]
    assert row_count(ApiKey) == 1  # the caller's own key only


def cursor(*parts) -> str:
    return base64.urlsafe_b64encode(json.dumps(list(parts)).encode()).decode().rstrip("=")


@pytest.mark.parametrize("url", [
    "/v1/models?cursor=" + cursor("9999-12-31T23:59:59-12:00", "x"),
    "/v1/models?cursor=" + cursor("0001-01-01T00:00:00+14:00", "x"),
    "/v1/models?cursor=" + cursor("2026-01-01T00:00:00", "x" * 10_000),
    "/v1/models/m/measurements?cursor=" + cursor("2026-01-01T00:00:00+00:00", 2**70),
    "/v1/models/m/measurements?cursor=" + cursor("2026-01-01T00:00:00+00:00", -1),
    "/v1/audit?cursor=" + cursor("2026-01-01T00:00:00", True),
    "/v1/keys?cursor=" + "A" * 5000,
])
def test_cursors_out_of_range_are_422_invalid_cursor(pg_client, url, mlp_onnx):
    headers = key_headers()
    if "/models/m/" in url:
        model_id = pg_client.post("/v1/models", files={"file": ("m.onnx", mlp_onnx)}, headers=headers).json()["id"]
        url = url.replace("/models/m/", f"/models/{model_id}/")
    resp = pg_client.get(url, headers=headers)
    assert resp.status_code == 422, resp.text
    assert resp.json()["code"] == "invalid_cursor"


def test_a_long_id_is_cut_in_the_404_message(client, alice):
    long_id = "x" * 60_000  # the test client caps URLs at 64 KiB
    resp = client.get(f"/v1/models/{long_id}", headers=alice)
    assert resp.status_code == 404 and resp.json()["code"] == "model_not_found"
    assert len(resp.text) < 1000 and "60000 characters" in resp.json()["detail"]


def test_a_database_data_error_is_a_422_not_a_500(client, alice, monkeypatch):
    """Whatever slips past validation and is refused by the database is the request's fault: 422 invalid_value."""
    from sqlalchemy.exc import DataError

    import app.models.service as models_service

    def refuse(**_):
        raise DataError("SELECT 1", {}, Exception("value out of range"))

    monkeypatch.setattr(models_service, "list_page", refuse)
    resp = client.get("/v1/models", headers=alice)
    assert resp.status_code == 422 and resp.json()["code"] == "invalid_value", resp.text


def test_a_client_hanging_up_mid_upload_is_not_a_server_error(client, alice, caplog):
    """The body ends early (the client went away): logged as a disconnect, counted as 499, never 'unhandled'."""
    from starlette.requests import ClientDisconnect

    import app.uploads as uploads

    class HangUp:
        def __init__(self, request):
            self.request = request

    async def gone(self):
        raise ClientDisconnect()
        yield b""  # an async generator, like Request.stream

    original = uploads.Request.stream
    uploads.Request.stream = gone
    try:
        for headers in ({"Content-Type": "application/octet-stream", "X-Filename": "m.onnx"},
                        {"Content-Type": "multipart/form-data; boundary=xyz"}):
            with caplog.at_level("INFO", logger="modelpress.api"):
                resp = client.post("/v1/models", content=b"partial", headers={**alice, **headers})
            assert resp.status_code == 499, resp.text
            assert resp.json()["code"] == "client_disconnected"
    finally:
        uploads.Request.stream = original
    assert "client disconnected" in caplog.text and "unhandled error" not in caplog.text
    metrics = client.get("/metrics").text
    assert 'route="/v1/models",status="499"' in metrics and 'route="/v1/models",status="500"' not in metrics


def test_a_key_expiring_in_the_future_is_still_created(client, alice):
    later = (dt.datetime.now(dt.UTC) + dt.timedelta(days=30)).isoformat()
    resp = client.post("/v1/keys", json={"expires_at": later}, headers=alice)
    assert resp.status_code == 201, resp.text


def many_zero_members(tmp_path, count: int, first: tuple[str, bytes]) -> bytes:
    """A zip of `count` members of 1 MiB zeros each, each under the per-member ratio floor, plus `first`."""
    import zipfile

    path = tmp_path / "bomb.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        archive.writestr(*first)
        for index in range(count):
            archive.writestr(f"pad/{index}.bin" if first[0].endswith(".onnx") else f"pad{index}.npy", b"\0" * (1 << 20))
    return path.read_bytes()


def test_a_zip_of_many_small_zero_members_is_refused_as_a_whole(client, alice, data_dir, tmp_path, mlp_onnx):
    """Each member passes the per-member ratio check; 100 of them (a 100 KB zip of 100 MiB) do not."""
    bomb = many_zero_members(tmp_path, 100, ("net.onnx", mlp_onnx))
    assert len(bomb) < 1 << 20
    resp = client.post("/v1/models", files={"file": ("bomb.zip", bomb)}, headers=alice)
    assert resp.status_code == 422, resp.text
    assert resp.json()["code"] == "zip_bomb" and "as a whole" in resp.json()["detail"]
    assert row_count(Model) == 0 and store_files(data_dir) == [] and tmp_leftovers(data_dir) == []


def test_an_npz_of_many_small_zero_members_is_refused_as_a_whole(client, alice, data_dir, tmp_path):
    import io

    header = io.BytesIO()
    np.save(header, np.zeros(4, np.float32))
    bomb = many_zero_members(tmp_path, 100, ("x.npy", header.getvalue()))
    resp = client.post("/v1/datasets", files={"file": ("bomb.npz", bomb)}, headers=alice)
    assert resp.status_code == 422, resp.text
    assert resp.json()["code"] == "zip_bomb"
    assert store_files(data_dir) == [] and tmp_leftovers(data_dir) == []


def test_failure_messages_name_files_relative_to_the_job_folder(data_dir):
    """What a tenant reads in a failed job never shows the server's folders (issue 20)."""
    import sys

    from workers.supervise import without_server_paths

    scratch = data_dir.resolve() / "store" / "tmp" / "work-k3y_9"
    message = (f"step 1 (quantize.int8_static) failed: Load model from {scratch}/work/step-1/model.onnx failed; "
               f"see {data_dir.resolve()}/store/blobs and {sys.prefix}/lib/python3.11/site-packages/onnxruntime")
    cleaned = without_server_paths(message)
    assert "step-1/model.onnx" in cleaned and "work-k3y_9" not in cleaned
    assert str(data_dir.resolve()) not in cleaned and sys.prefix not in cleaned, cleaned
