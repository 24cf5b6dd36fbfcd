"""Hugging Face folders (issue 16 item 5): a zip of a transformers folder uploaded, checked without running
anything, converted to ONNX by a conversion job in a fenced job process, stored as a model linked to its source,
compressed end to end; texts tokenized with the model's own tokenizer; every bad folder refused with its code and
nothing left behind.

The models are tiny random-weight ones built from configs here (no download); so are their tokenizers.
"""
from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from app.dbmodels import Blob, Dataset, Job, Model
from tests.helpers import row_count, store_files, tmp_leftovers
from workers.supervise import run_job

FAST = {"batch_sizes": [1], "warmup": 1, "iterations": 4}
WORDS = ["the", "a", "model", "is", "small", "good", "bad", "text", "compress", "fast", "slow", "cat", "dog"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
TEXT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, vocab_size=128,
            max_position_embeddings=64)
# model_type -> (architecture, config kwargs)
ARCHITECTURES = {
    "bert": ("BertForSequenceClassification", TEXT),
    "distilbert": ("DistilBertForSequenceClassification",
                   dict(dim=32, n_layers=2, n_heads=2, hidden_dim=37, vocab_size=128, max_position_embeddings=64)),
    "roberta": ("RobertaForSequenceClassification", TEXT | {"max_position_embeddings": 70, "pad_token_id": 1}),
    "gpt2": ("GPT2LMHeadModel", dict(n_embd=32, n_layer=2, n_head=2, vocab_size=128, n_positions=64,
                                     bos_token_id=0, eos_token_id=0)),
    "vit": ("ViTForImageClassification", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                              intermediate_size=37, image_size=32, patch_size=8, num_labels=3)),
}


def hf_folder(folder: Path, model_type: str, *, tokenizer: str | None = "fast") -> Path:
    """A tiny random-weight transformers folder saved with safetensors; tokenizer "fast" (tokenizer.json),
    "slow" (vocab.txt only) or None."""
    import torch
    import transformers

    architecture, kwargs = ARCHITECTURES[model_type]
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(model_type, **kwargs)
    config.architectures = [architecture]
    model = getattr(transformers, architecture)(config)
    model.save_pretrained(folder, safe_serialization=True)
    if tokenizer:
        (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
        fast = transformers.BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True)
        fast.save_pretrained(folder)
        if tokenizer == "slow":
            (folder / "tokenizer.json").unlink()
    return folder


def zip_folder(folder: Path, extra: dict[str, bytes] | None = None, drop: tuple[str, ...] = ()) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and path.name not in drop:
                archive.write(path, f"my-model/{path.relative_to(folder)}")
        for name, data in (extra or {}).items():
            archive.writestr(f"my-model/{name}", data)
    return buf.getvalue()


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory) -> Path:
    return hf_folder(tmp_path_factory.mktemp("bert"), "bert", tokenizer="slow")


def upload(client, headers, data: bytes, **fields):
    return client.post("/v1/models", files={"file": ("my-model.zip", data)}, data=fields, headers=headers)


def convert(client, headers, model: dict) -> dict:
    """Run the model's conversion job on the worker's pipeline; return the upload as GET shows it then."""
    job_id = model["conversion"]["job_id"]
    run_job(job_id)
    return client.get(f"/v1/models/{model['id']}", headers=headers).json()


def assert_nothing_left(data_dir: Path) -> None:
    assert row_count(Model) == 0 and row_count(Job) == 0 and row_count(Blob) == 0
    assert store_files(data_dir) == [] and tmp_leftovers(data_dir) == []


# --- refusals -------------------------------------------------------------------------------------------------


def test_pickled_weights_are_refused_without_unpickling(client, alice, data_dir, bert_folder):
    import pickle

    for name in ("pytorch_model.bin", "training_args.bin", "extra.pt"):
        resp = upload(client, alice, zip_folder(bert_folder, {name: pickle.dumps({"w": 1})}))
        assert resp.status_code == 422, resp.text
        assert resp.json()["code"] == "pickle_refused" and name in resp.json()["message"]
        assert "safetensors" in resp.json()["message"]
    # A pickle under an innocent name is caught by its bytes.
    resp = upload(client, alice, zip_folder(bert_folder, {"weights.dat": pickle.dumps([1, 2])}))
    assert resp.json()["code"] == "pickle_refused"
    assert_nothing_left(data_dir)


def test_remote_code_is_refused(client, alice, data_dir, bert_folder):
    config = json.loads((bert_folder / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_evil.EvilModel"}
    resp = upload(client, alice, zip_folder(bert_folder, {"config.json": json.dumps(config).encode()},
                                           drop=("config.json",)))
    assert resp.status_code == 422 and resp.json()["code"] == "remote_code_refused", resp.text
    resp = upload(client, alice, zip_folder(bert_folder, {"modeling_evil.py": b"import os\n"}))
    assert resp.status_code == 422 and resp.json()["code"] == "remote_code_refused"
    assert "modeling_evil.py" in resp.json()["message"]
    assert_nothing_left(data_dir)


def test_corrupt_safetensors_header_is_refused(client, alice, data_dir, bert_folder):
    weights = (bert_folder / "model.safetensors").read_bytes()
    header_len = int.from_bytes(weights[:8], "little")
    header = json.loads(weights[8:8 + header_len])
    name = next(k for k in header if k != "__metadata__")
    header[name]["data_offsets"][1] += 10 ** 9  # past the end of the file
    text = json.dumps(header).encode()
    bad = len(text).to_bytes(8, "little") + text + weights[8 + header_len:]
    resp = upload(client, alice, zip_folder(bert_folder, {"model.safetensors": bad}, drop=("model.safetensors",)))
    assert resp.status_code == 422 and resp.json()["code"] == "invalid_safetensors", resp.text
    assert name in resp.json()["message"]
    huge = (1 << 40).to_bytes(8, "little") + b"{}"
    resp = upload(client, alice, zip_folder(bert_folder, {"model.safetensors": huge}, drop=("model.safetensors",)))
    assert resp.json()["code"] == "invalid_safetensors"
    assert_nothing_left(data_dir)


def test_unsupported_model_type_is_refused_listing_the_supported(client, alice, data_dir, bert_folder):
    config = json.loads((bert_folder / "config.json").read_text()) | {"model_type": "mamba"}
    resp = upload(client, alice, zip_folder(bert_folder, {"config.json": json.dumps(config).encode()},
                                           drop=("config.json",)))
    assert resp.status_code == 422 and resp.json()["code"] == "unsupported_architecture", resp.text
    assert {"bert", "gpt2", "vit"} <= set(resp.json()["supported"])
    resp = upload(client, alice, zip_folder(bert_folder), task="image-classification")
    assert resp.status_code == 422 and resp.json()["code"] == "unsupported_task"
    assert_nothing_left(data_dir)


def test_texts_dataset_for_a_model_without_tokenizer_is_refused(client, alice, data_dir, tmp_path):
    model = upload(client, alice, zip_folder(hf_folder(tmp_path / "vit", "vit", tokenizer=None))).json()
    model = convert(client, alice, model)
    assert model["conversion"]["status"] == "succeeded", model
    before = (row_count(Dataset), len(store_files(data_dir)))
    resp = client.post("/v1/datasets", files={"file": ("texts.json", json.dumps(["a cat"]).encode())},
                       data={"model_id": model["id"]}, headers=alice)
    assert resp.status_code == 422 and resp.json()["code"] == "tokenizer_missing", resp.text
    assert (row_count(Dataset), len(store_files(data_dir))) == before and tmp_leftovers(data_dir) == []


# --- the happy path -------------------------------------------------------------------------------------------


def test_bert_folder_converts_tokenizes_and_compresses_end_to_end(client, alice, bert_folder):
    import onnxruntime as ort

    resp = upload(client, alice, zip_folder(bert_folder))
    assert resp.status_code == 201, resp.text
    source = resp.json()
    assert source["format"] == "hf-zip"
    assert source["inspection"]["model_type"] == "bert" and source["inspection"]["task"] == "text-classification"
    assert source["inspection"]["tokenizer"] == "slow"
    assert source["conversion"]["status"] == "queued" and source["conversion"]["converted_model_id"] is None
    # While it converts, a job on it is a 409 naming the wait.
    spec = {"model_id": source["id"], "steps": [{"method": "quantize.int8_dynamic"}], "evaluate": FAST}
    pending = client.post("/v1/jobs", json=spec, headers=alice)
    assert pending.status_code == 409 and pending.json()["code"] == "conversion_pending", pending.text

    source = convert(client, alice, source)
    assert source["conversion"]["status"] == "succeeded", source
    converted = client.get(f"/v1/models/{source['conversion']['converted_model_id']}", headers=alice).json()
    assert converted["source_model_id"] == source["id"] and converted["format"] == "onnx-zip"
    assert [i["name"] for i in converted["inspection"]["inputs"]] == ["input_ids", "attention_mask", "token_type_ids"]
    check = converted["inspection"]["converted_from"]["check"]
    assert check["max_abs_diff"]["logits"] <= check["atol"]

    # The converted model runs at another batch and sequence length than the trace's.
    download = client.get(f"/v1/models/{converted['id']}/download", headers=alice)
    with zipfile.ZipFile(io.BytesIO(download.content)) as archive:
        assert {"model.onnx", "tokenizer.json"} <= set(archive.namelist())
        session = ort.InferenceSession(archive.read("model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": np.ones((5, 21), np.int64), "attention_mask": np.ones((5, 21), np.int64),
             "token_type_ids": np.zeros((5, 21), np.int64)}
    assert session.run(None, feeds)[0].shape == (5, 2)

    # Texts tokenized with the model's own tokenizer, named after its inputs.
    texts = ["the cat is good", "a dog is bad", "compress the model fast", "small text"]
    data = client.post("/v1/datasets", files={"file": ("texts.json", json.dumps(texts).encode())},
                       data={"model_id": source["id"], "max_length": "16"}, headers=alice)
    assert data.status_code == 201, data.text
    arrays = data.json()["inspection"]["arrays"]
    assert {a["name"]: a["shape"] for a in arrays} == {n: [4, 16] for n in feeds}
    npz = np.load(io.BytesIO(client.get(f"/v1/datasets/{data.json()['id']}/download", headers=alice).content))
    assert npz["input_ids"][0][0] == VOCAB.index("[CLS]") and npz["input_ids"][0][1] == VOCAB.index("the")
    assert npz["attention_mask"][3].tolist() == [1] * 4 + [0] * 12  # [CLS] small text [SEP], then padding

    # A job on the upload's id runs on the converted model, evaluated on the texts.
    spec["evaluate"] = FAST | {"eval_dataset_id": data.json()["id"]}
    job = client.post("/v1/jobs", json=spec, headers=alice)
    assert job.status_code == 202, job.text
    assert job.json()["model_id"] == converted["id"]
    run_job(job.json()["id"])
    job = client.get(f"/v1/jobs/{job.json()['id']}", headers=alice).json()
    assert job["status"] == "succeeded", job["error"]
    assert job["summary"]["fidelity"]["cosine_similarity"] > 0.9


@pytest.mark.parametrize("model_type", ["distilbert", "roberta", "gpt2", "vit"])
def test_architecture_converts_and_compresses(client, alice, tmp_path, model_type):
    folder = hf_folder(tmp_path / model_type, model_type, tokenizer="fast" if model_type != "vit" else None)
    source = upload(client, alice, zip_folder(folder)).json()
    source = convert(client, alice, source)
    assert source["conversion"]["status"] == "succeeded", source
    # Text models take a dynamic sequence: the job says which length to measure at.
    shapes = {} if model_type == "vit" else {"input_shapes": {"dims": {"sequence": 16}}}
    spec = {"model_id": source["id"], "steps": [{"method": "quantize.int8_dynamic"}], "evaluate": FAST | shapes}
    job = client.post("/v1/jobs", json=spec, headers=alice).json()
    run_job(job["id"])
    job = client.get(f"/v1/jobs/{job['id']}", headers=alice).json()
    assert job["status"] == "succeeded", job["error"]
    assert job["summary"]["size_ratio"] is not None


def test_a_failed_conversion_is_a_422_with_its_reason_for_jobs(client, alice, tmp_path, bert_folder):
    # Weights that do not fit the config: transformers refuses to load them in the worker.
    config = json.loads((bert_folder / "config.json").read_text()) | {"hidden_size": 48}
    source = upload(client, alice, zip_folder(bert_folder, {"config.json": json.dumps(config).encode()},
                                              drop=("config.json",))).json()
    source = convert(client, alice, source)
    assert source["conversion"]["status"] == "failed"
    assert source["conversion"]["error"]["code"] == "conversion_failed", source
    spec = {"model_id": source["id"], "steps": [{"method": "quantize.int8_dynamic"}], "evaluate": FAST}
    resp = client.post("/v1/jobs", json=spec, headers=alice)
    assert resp.status_code == 422 and resp.json()["code"] == "conversion_failed"
    assert source["conversion"]["job_id"] == resp.json()["job_id"]
