"""Texts datasets: a JSON list of texts tokenized with a converted Hugging Face model's own tokenizer.

`POST /v1/datasets` with a `.json` file and a `model_id` form field (the upload's id or its converted model's):
the texts are tokenized by the `tokenizers` library (Rust, no torch) from the `tokenizer.json` the conversion
stored beside the ONNX model, padded and truncated to `max_length`, and stored as an ordinary .npz dataset whose
arrays are named after the converted model's inputs (input_ids, attention_mask, token_type_ids as it takes them).
The JSON is a list of strings, or {"texts": [...], "labels": [...]} with one integer label per text.
"""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
from sqlalchemy.orm import Session

from app.audit.service import Actor
from app.datasets import service
from app.dbmodels import Dataset
from app.errors import InvalidDataset, TokenizerMissing, Unprocessable
from app.models import service as models_service
from app.settings import Settings
from app.store import ArtifactStore, file_sha256
from app.uploads import Received

MAX_TEXTS = 10_000
MAX_TEXT_CHARS = 20_000
DEFAULT_MAX_LENGTH = 128
MAX_TOKENIZER_BYTES = 64 << 20
# Tokenizer output -> the model input it feeds.
ENCODING_FIELDS = {"input_ids": "ids", "attention_mask": "attention_mask", "token_type_ids": "type_ids"}


def create_from_texts(*, db: Session, store: ArtifactStore, settings: Settings, actor: Actor, received: Received,
                      workdir: Path) -> Dataset:
    model_id = (received.fields.get("model_id") or "").strip()
    if not model_id:
        raise Unprocessable("a texts dataset (.json) needs a model_id form field naming the Hugging Face model whose "
                            "tokenizer tokenizes it", code="missing_model_id")
    source = models_service.get(db=db, tenant_id=actor.tenant, model_id=model_id)
    model = models_service.converted_for_use(db=db, model=source)
    tokenizer_info = model.inspection.get("tokenizer")
    if not isinstance(tokenizer_info, dict):
        raise TokenizerMissing(f"model {model_id} has no tokenizer (its folder held no tokenizer files); upload "
                               "the texts tokenized yourself as an .npz named after the model's inputs")
    texts, labels = _read_texts(received.path)
    max_length = _max_length(received.fields.get("max_length"), tokenizer_info["max_length"])
    tokenizer = _load_tokenizer(store.local_path(model.sha256), tokenizer_info)
    tokenizer.enable_truncation(max_length)
    tokenizer.enable_padding(pad_id=tokenizer_info["pad_id"], pad_token=tokenizer_info["pad_token"],
                             length=max_length)
    encodings = tokenizer.encode_batch(texts)
    arrays = {name: np.array([getattr(e, ENCODING_FIELDS[name]) for e in encodings], dtype=np.int64)
              for name in tokenizer_info["inputs"] if name in ENCODING_FIELDS}
    if labels is not None:
        arrays["labels"] = np.array(labels, dtype=np.int64)
    path = workdir / "texts.npz"
    np.savez(path, allow_pickle=False, **arrays)
    digest = file_sha256(path)
    name = (received.fields.get("name") or Path(received.filename).stem + ".npz")[:255]
    tokenized = Received(path, Path(name).stem + ".npz", digest, path.stat().st_size,
                         {"name": name})
    return service.create_from_upload(db=db, store=store, settings=settings, actor=actor, received=tokenized)


def _read_texts(path: Path) -> tuple[list[str], list[int] | None]:
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise InvalidDataset(f"the texts file is not valid JSON ({exc})") from None
    labels = None
    if isinstance(data, dict):
        texts, labels = data.get("texts"), data.get("labels")
    else:
        texts = data
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise InvalidDataset('the texts file must be a non-empty JSON list of strings, or {"texts": [...], '
                             '"labels": [...]}')
    if len(texts) > MAX_TEXTS:
        raise InvalidDataset(f"the file holds {len(texts)} texts; at most {MAX_TEXTS} are accepted")
    longest = max(len(t) for t in texts)
    if longest > MAX_TEXT_CHARS:
        raise InvalidDataset(f"a text of {longest} characters; at most {MAX_TEXT_CHARS} are accepted")
    if labels is not None and (not isinstance(labels, list) or len(labels) != len(texts)
                               or not all(isinstance(v, int) and not isinstance(v, bool) for v in labels)):
        raise InvalidDataset("labels must be a list of integers, one per text")
    return texts, labels


def _max_length(given: str | None, model_max: int) -> int:
    if given is None or not given.strip():
        return min(DEFAULT_MAX_LENGTH, model_max)
    try:
        value = int(given)
    except ValueError:
        value = 0
    if not 1 <= value <= model_max:
        raise Unprocessable(f"max_length must be an integer from 1 to {model_max} (the model's positions)",
                            code="invalid_max_length")
    return value


def _load_tokenizer(blob: Path, info: dict):
    from tokenizers import Tokenizer

    try:
        with zipfile.ZipFile(blob) as archive:
            member = archive.getinfo(info["file"])
            if member.file_size > MAX_TOKENIZER_BYTES:
                raise TokenizerMissing(f"the model's {info['file']} is larger than {MAX_TOKENIZER_BYTES} bytes")
            return Tokenizer.from_str(archive.read(member).decode("utf-8"))
    except (KeyError, zipfile.BadZipFile, UnicodeDecodeError, OSError) as exc:
        raise TokenizerMissing(f"the model's tokenizer cannot be read ({exc})") from None
