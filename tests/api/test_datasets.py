"""Datasets: upload (.npz, .safetensors), inspection, dedupe, list/get/download/delete, every bad input,
and the check of a dataset against a model's inputs."""
from __future__ import annotations

import hashlib
import io
import json
import pickle
import struct
import zipfile

import numpy as np
import pytest

from app.dbmodels import Blob, Dataset, JobDataset
from tests.helpers import row_count, store_files, tmp_leftovers

RNG = np.random.default_rng(0)


def npz_bytes(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # np.savez pickles object arrays: the bad-input tests rely on that
    return buf.getvalue()


def safetensors_bytes(tensors: dict[str, tuple[str, list[int], bytes]], *, header: dict | None = None,
                      metadata: dict | None = None) -> bytes:
    """A safetensors file built by hand: {name: (dtype code, shape, raw little-endian bytes)}.

    `header` replaces the computed header (to write broken ones) while keeping the data bytes.
    """
    computed: dict = {"__metadata__": metadata} if metadata else {}
    data = b""
    for name, (dtype, shape, raw) in tensors.items():
        computed[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    text = json.dumps(header if header is not None else computed).encode()
    return struct.pack("<Q", len(text)) + text + data


def mlp_data(samples: int = 10) -> dict[str, np.ndarray]:
    return {
        "features": RNG.standard_normal((samples, 64)).astype(np.float32),
        "labels": RNG.integers(0, 10, samples).astype(np.int64),
    }


def upload(client, headers, data: bytes, filename="calib.npz", name=None, raw=False):
    if raw:
        return client.post("/v1/datasets", content=data,
                           headers={**headers, "Content-Type": "application/octet-stream", "X-Filename": filename})
    form = {"name": name} if name else None
    return client.post("/v1/datasets", files={"file": (filename, data)}, data=form, headers=headers)


def test_upload_npz_answers_201_with_inspection(client, alice):
    data = npz_bytes(**mlp_data(10))
    resp = upload(client, alice, data, name="calib-10")
    assert resp.status_code == 201, resp.text
    body = resp.json()
    assert body["name"] == "calib-10"
    assert body["format"] == "npz"
    assert body["size_bytes"] == len(data)
    assert body["sha256"] == hashlib.sha256(data).hexdigest()
    assert body["inspection"] == {
        "arrays": [{"name": "features", "dtype": "float32", "shape": [10, 64]},
                   {"name": "labels", "dtype": "int64", "shape": [10]}],
        "samples": 10,
        "has_labels": True,
    }
    assert {"id", "created_at"} <= body.keys()


def test_upload_safetensors_raw_and_the_workers_load_the_same_arrays(client, alice, data_dir):
    from workers.datasets import load

    images = RNG.integers(0, 256, (4, 3, 2, 2)).astype(np.uint8)
    mask = np.array([True, False, True, True])
    # bfloat16 of 1.5, -2.0, 0.25, 3.0: the top 16 bits of their float32 patterns.
    scale = np.array([1.5, -2.0, 0.25, 3.0], dtype=np.float32)
    bf16 = (scale.view(np.uint32) >> 16).astype("<u2").tobytes()
    labels = np.array([3, 1, 0, 2], dtype="<i8")
    data = safetensors_bytes(
        {"images": ("U8", [4, 3, 2, 2], images.tobytes()), "mask": ("BOOL", [4], mask.tobytes()),
         "scale": ("BF16", [4], bf16), "labels": ("I64", [4], labels.tobytes())},
        metadata={"source": "test"},
    )
    resp = upload(client, alice, data, filename="calib.safetensors", raw=True)
    assert resp.status_code == 201, resp.text
    body = resp.json()
    assert body["format"] == "safetensors" and body["name"] == "calib.safetensors"
    assert body["inspection"] == {
        "arrays": [{"name": "images", "dtype": "uint8", "shape": [4, 3, 2, 2]},
                   {"name": "mask", "dtype": "bool", "shape": [4]},
                   {"name": "scale", "dtype": "float32", "shape": [4]},  # BF16 is widened to float32
                   {"name": "labels", "dtype": "int64", "shape": [4]}],
        "samples": 4,
        "has_labels": True,
    }
    [blob] = store_files(data_dir)
    loaded = load(blob, "safetensors")
    np.testing.assert_array_equal(loaded.inputs["images"], images)
    np.testing.assert_array_equal(loaded.inputs["mask"], mask)
    np.testing.assert_array_equal(loaded.inputs["scale"], scale)
    np.testing.assert_array_equal(loaded.labels, labels)


def test_same_bytes_are_stored_once(client, alice, bob, data_dir):
    data = npz_bytes(**mlp_data(5))
    first = upload(client, alice, data).json()
    second = upload(client, alice, data, name="again").json()
    third = upload(client, bob, data).json()
    assert len({first["id"], second["id"], third["id"]}) == 3
    assert first["sha256"] == second["sha256"] == third["sha256"]
    assert len(store_files(data_dir)) == 1 and row_count(Blob) == 1
    for headers, dataset in ((alice, first), (alice, second)):
        assert client.delete(f"/v1/datasets/{dataset['id']}", headers=headers).status_code == 204
    assert len(store_files(data_dir)) == 1
    assert client.delete(f"/v1/datasets/{third['id']}", headers=bob).status_code == 204
    assert store_files(data_dir) == [] and row_count(Blob) == 0


def test_release_blob_keeps_a_blob_a_dataset_uses(client, alice, data_dir):
    """The workers release blobs through app.blobs.release_blob: it must count datasets too."""
    from app.blobs import release_blob
    from app.db import session_scope
    from app.store import get_store

    sha = upload(client, alice, npz_bytes(**mlp_data(3))).json()["sha256"]
    with session_scope() as db:
        release_blob(db=db, store=get_store(), sha256=sha)
    assert len(store_files(data_dir)) == 1 and row_count(Blob) == 1


def test_list_get_download_delete(client, alice, bob, data_dir):
    payloads = [npz_bytes(features=np.full((2, 3), i, dtype=np.float32)) for i in range(3)]
    ids = [upload(client, alice, p, name=f"d{i}").json()["id"] for i, p in enumerate(payloads)]
    page = client.get("/v1/datasets?limit=2", headers=alice).json()
    assert [d["id"] for d in page["items"]] == ids[::-1][:2]
    rest = client.get(f"/v1/datasets?limit=2&cursor={page['next_cursor']}", headers=alice).json()
    assert [d["id"] for d in rest["items"]] == [ids[0]]
    assert rest["next_cursor"] is None
    assert client.get("/v1/datasets", headers=bob).json() == {"items": [], "next_cursor": None}

    got = client.get(f"/v1/datasets/{ids[1]}", headers=alice)
    assert got.status_code == 200 and got.json()["name"] == "d1"
    download = client.get(f"/v1/datasets/{ids[1]}/download", headers=alice)
    assert download.status_code == 200
    assert download.content == payloads[1]
    assert download.headers["x-content-sha256"] == hashlib.sha256(payloads[1]).hexdigest()
    assert 'filename="d1.npz"' in download.headers["content-disposition"]

    for dataset_id in ids:
        assert client.delete(f"/v1/datasets/{dataset_id}", headers=alice).status_code == 204
    assert client.get(f"/v1/datasets/{ids[1]}", headers=alice).json()["code"] == "dataset_not_found"
    assert store_files(data_dir) == [] and row_count(Dataset) == 0 and row_count(Blob) == 0


def test_unknown_dataset_is_404(client, alice):
    for method, path in (("GET", "/v1/datasets/nope"), ("GET", "/v1/datasets/nope/download"),
                         ("DELETE", "/v1/datasets/nope")):
        resp = client.request(method, path, headers=alice)
        assert resp.status_code == 404
        assert resp.json()["code"] == "dataset_not_found"


def test_upload_over_the_cap_is_413(client, alice, data_dir, monkeypatch):
    from app.settings import get_settings

    monkeypatch.setenv("MODELPRESS_MAX_UPLOAD_BYTES", "1000")
    get_settings.cache_clear()
    data = npz_bytes(**mlp_data(10))
    assert len(data) > 1000
    for raw in (False, True):
        resp = upload(client, alice, data, raw=raw)
        assert resp.status_code == 413, resp.text
        assert resp.json()["code"] == "payload_too_large"
    assert store_files(data_dir) == [] and tmp_leftovers(data_dir) == []
    assert row_count(Dataset) == 0 and row_count(Blob) == 0


# --- bad inputs: status, stable code, a message, and nothing left behind ---------------------------

def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _npy_with_shape(shape: tuple[int, ...], data: bytes) -> bytes:
    """An .npy member whose header claims `shape` whatever data follows."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return buf.getvalue() + data


def _compressed_zeros() -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, features=np.zeros((1 << 21, 1), np.float32))  # 8 MiB of zeros deflate ~1000x
    return buf.getvalue()


F32x4 = np.arange(4, dtype="<f4").tobytes()
OVERSIZED_HEADER = b'{"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}'.ljust((1 << 20) + 1)

BAD_DATASETS = [
    pytest.param(npz_bytes(features=np.array([{"a": 1}, None], dtype=object)), "calib.npz",
                 "Python objects", id="object-array-npz"),
    pytest.param(pickle.dumps({"features": [[1.0, 2.0]]}), "calib.npz", "not a readable .npz", id="pickle-named-npz"),
    pytest.param(b"features,label\n1.0,2\n", "calib.npz", "not a readable .npz", id="not-a-zip-npz"),
    pytest.param(npz_bytes(features=np.zeros((10, 4), np.float32), labels=np.zeros(8, np.int64)), "calib.npz",
                 "'labels' has 8 entries but the input arrays have 10 samples", id="labels-length-mismatch"),
    pytest.param(npz_bytes(features=np.zeros((4, 2), np.float32), labels=np.zeros(4, np.float32)), "calib.npz",
                 "integer class indices", id="labels-float"),
    pytest.param(npz_bytes(a=np.zeros((10, 4), np.float32), b=np.zeros((8, 4), np.float32)), "calib.npz",
                 "'a' has 10 samples, 'b' has 8", id="ragged-first-axis"),
    pytest.param(npz_bytes(features=np.float32(1.0)), "calib.npz", "scalar", id="scalar-array"),
    pytest.param(npz_bytes(labels=np.zeros(3, np.int64)), "calib.npz", "at least one input array", id="only-labels"),
    pytest.param(npz_bytes(names=np.array(["a", "b"])), "calib.npz", "only bool, integer and float", id="strings"),
    pytest.param(_zip({"../evil.npy": b"x"}), "calib.npz", "parent-escaping", id="npz-path-escape"),
    pytest.param(_zip({"notes.txt": b"x"}), "calib.npz", "not an .npy array", id="npz-non-npy-member"),
    pytest.param(_zip({"x.npy": _npy_with_shape((10**12,), F32x4)}), "calib.npz", "does not match its stored size",
                 id="npy-header-claims-huge-shape"),
    pytest.param(safetensors_bytes({"x": ("F32", [4], F32x4)},
                                   header={"x": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}),
                 "calib.safetensors", "outside the 16 data bytes", id="safetensors-offsets-out-of-bounds"),
    pytest.param(safetensors_bytes({"x": ("F32", [4], F32x4)},
                                   header={"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                                           "y": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}),
                 "calib.safetensors", "overlap", id="safetensors-overlapping"),
    pytest.param(safetensors_bytes({"x": ("F32", [4], F32x4)},
                                   header={"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}}),
                 "calib.safetensors", "needs 12", id="safetensors-size-not-shape"),
    pytest.param(struct.pack("<Q", len(OVERSIZED_HEADER)) + OVERSIZED_HEADER + F32x4, "calib.safetensors",
                 "exceeds the 1048576 byte cap", id="safetensors-header-too-large"),
    pytest.param(struct.pack("<Q", 4096) + b"{}", "calib.safetensors", "runs past the end", id="safetensors-truncated"),
    pytest.param(safetensors_bytes({"x": ("C64", [2], F32x4)}), "calib.safetensors", "unsupported dtype 'C64'",
                 id="safetensors-unknown-dtype"),
    pytest.param(npz_bytes(**mlp_data(3)), "calib.csv", "neither a .npz nor a .safetensors", id="wrong-extension"),
    pytest.param(_compressed_zeros(), "calib.npz", "inflates", id="npz-compression-ratio"),
]


@pytest.mark.parametrize("data,filename,message", BAD_DATASETS)
def test_bad_dataset_is_refused_and_leaves_nothing(client, alice, data_dir, data, filename, message):
    resp = upload(client, alice, data, filename=filename)
    assert resp.status_code == 422, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    assert resp.json()["code"] == "invalid_dataset"
    assert message in resp.json()["message"]
    assert store_files(data_dir) == [] and tmp_leftovers(data_dir) == []
    assert row_count(Dataset) == 0 and row_count(Blob) == 0


def test_npz_over_the_unpacked_cap_is_refused(client, alice, data_dir, monkeypatch):
    from app.settings import get_settings

    monkeypatch.setenv("MODELPRESS_MAX_UNPACKED_BYTES", "1000")
    get_settings.cache_clear()
    resp = upload(client, alice, npz_bytes(**mlp_data(10)))
    assert resp.status_code == 422
    assert resp.json()["code"] == "invalid_dataset" and "unpacks to more than 1000 bytes" in resp.json()["message"]
    assert store_files(data_dir) == [] and tmp_leftovers(data_dir) == [] and row_count(Dataset) == 0


def test_refused_upload_keeps_an_existing_blob(client, alice, data_dir):
    """A refusal removes only what it created: a stored blob other datasets use stays."""
    good = npz_bytes(**mlp_data(3))
    assert upload(client, alice, good).status_code == 201
    resp = upload(client, alice, good, filename="calib.csv")
    assert resp.status_code == 422
    assert len(store_files(data_dir)) == 1 and row_count(Dataset) == 1 and tmp_leftovers(data_dir) == []


def test_delete_refused_while_a_queued_job_links_the_dataset(client, alice, data_dir):
    from app.db import session_scope
    from app.dbmodels import Job

    dataset = upload(client, alice, npz_bytes(**mlp_data(4))).json()
    with session_scope() as db:
        tenant_id = db.get(Dataset, dataset["id"]).tenant_id
        job = Job(tenant_id=tenant_id, spec={"steps": []}, queue="cpu", status="queued")
        db.add(job)
        db.flush()
        db.add(JobDataset(job_id=job.id, dataset_id=dataset["id"], role="calibration"))
        job_id = job.id
    resp = client.delete(f"/v1/datasets/{dataset['id']}", headers=alice)
    assert resp.status_code == 409
    assert resp.json()["code"] == "dataset_in_use"
    assert client.get(f"/v1/datasets/{dataset['id']}", headers=alice).status_code == 200
    assert len(store_files(data_dir)) == 1
    # Once the job has finished the dataset can go; the job stays, its link goes with the dataset.
    with session_scope() as db:
        db.get(Job, job_id).status = "succeeded"
    assert client.delete(f"/v1/datasets/{dataset['id']}", headers=alice).status_code == 204
    assert row_count(Job) == 1 and row_count(JobDataset) == 0
    assert store_files(data_dir) == []


def test_get_for_job_is_tenant_scoped(client, alice, bob):
    from app.datasets.service import get_for_job
    from app.db import session_scope
    from app.dbmodels import Tenant
    from app.errors import DatasetNotFound

    dataset_id = upload(client, alice, npz_bytes(**mlp_data(2))).json()["id"]
    client.get("/v1/datasets", headers=bob)  # bob's tenant exists once his key does
    with session_scope() as db:
        tenants = {t.name: t.id for t in db.query(Tenant)}
        assert get_for_job(db=db, tenant_id=tenants["alice"], dataset_id=dataset_id).id == dataset_id
        with pytest.raises(DatasetNotFound):
            get_for_job(db=db, tenant_id=tenants["bob"], dataset_id=dataset_id)


# --- check_against_model ----------------------------------------------------------------------------

MLP = {"inputs": [{"name": "features", "dtype": "float32", "shape": ["batch", 64]}]}


def dataset_inspection(**arrays: tuple[str, list[int]]) -> dict:
    return {"arrays": [{"name": n, "dtype": d, "shape": s} for n, (d, s) in arrays.items()],
            "samples": 8, "has_labels": "labels" in arrays}


@pytest.mark.parametrize("arrays,fragments", [
    pytest.param({"x": ("float32", [8, 64])}, ["has no array 'features'", "float32 [batch, 64]", "'x'"],
                 id="wrong-name"),
    pytest.param({"features": ("float64", [8, 64])}, ["'features' is float64", "float32 [batch, 64]"],
                 id="wrong-dtype"),
    pytest.param({"features": ("float32", [8, 32])}, ["'features' has shape [8, 32]", "float32 [batch, 64]"],
                 id="wrong-dim"),
    pytest.param({"features": ("float32", [8, 8, 8])}, ["'features' has shape [8, 8, 8]", "float32 [batch, 64]"],
                 id="wrong-rank"),
])
def test_check_against_model_names_the_array_and_the_expected_spec(arrays, fragments):
    from app.errors import DatasetMismatch
    from app.formats.dataset_files import check_against_model

    with pytest.raises(DatasetMismatch) as caught:
        check_against_model(dataset_inspection(**arrays), MLP, "calibration")
    error = caught.value
    assert error.status == 422 and error.code == "dataset_mismatch"
    assert "calibration" in error.message
    for fragment in fragments:
        assert fragment in error.message
    assert error.problem()["array"] == "features"
    assert error.problem()["expected"] == {"dtype": "float32", "shape": ["batch", 64]}


def test_check_against_model_accepts_symbolic_dims_batch_axis_and_extras():
    from app.formats.dataset_files import check_against_model

    model = {"inputs": [
        {"name": "images", "dtype": "float32", "shape": [1, 3, "height", None]},
        {"name": "ids", "dtype": "int64", "shape": None},
    ]}
    dataset = dataset_inspection(images=("float32", [5, 3, 224, 200]), ids=("int64", [5, 7, 2]),
                                 extra=("uint8", [5]), labels=("int64", [5]))
    check_against_model(dataset, model, "eval")  # fixed batch dim 1 vs 5 samples: axis 0 is the sample axis


def test_check_against_model_on_real_inspections(client, alice, mlp_onnx):
    from app.formats.dataset_files import check_against_model

    model = client.post("/v1/models", files={"file": ("m.onnx", mlp_onnx)}, headers=alice).json()
    dataset = upload(client, alice, npz_bytes(**mlp_data(6))).json()
    check_against_model(dataset["inspection"], model["inspection"], "calibration")


def test_the_apis_bounded_memory_check_sees_what_the_workers_loader_sees(tmp_path):
    """read_specs (the API: headers and checksums, no arrays kept) and load_arrays (the workers) agree on what
    a file holds, and both refuse a member whose bytes were changed after zipping."""
    from app.formats.dataset_files import inspect_dataset, load_arrays, read_specs

    arrays = {"features": np.arange(40, dtype=">f4").reshape(10, 4), "mask": np.ones((10, 2), np.bool_),
              "labels": np.arange(10, dtype=np.int64)}
    bf16 = safetensors_bytes({"x": ("BF16", [2, 2], b"\x80\x3f" * 4), "labels": ("I64", [2], b"\0" * 16)})
    for name, data, fmt in [("d.npz", npz_bytes(**arrays), "npz"), ("d.safetensors", bf16, "safetensors")]:
        path = tmp_path / name
        path.write_bytes(data)
        assert inspect_dataset(read_specs(path, fmt, max_unpacked_bytes=1 << 30)) == inspect_dataset(
            load_arrays(path, fmt, max_unpacked_bytes=1 << 30))
    # One byte of the array data flipped inside a stored (uncompressed) member: the CRC no longer holds.
    data = bytearray(npz_bytes(features=np.zeros((256, 4), np.float32)))
    data[data.index(b"\0" * 64) + 32] ^= 0xFF
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(bytes(data))
    from app.errors import InvalidDataset

    for check in (lambda: read_specs(corrupt, "npz", max_unpacked_bytes=1 << 30),
                  lambda: load_arrays(corrupt, "npz", max_unpacked_bytes=1 << 30)):
        with pytest.raises(InvalidDataset, match="not a readable .npz"):
            check()
