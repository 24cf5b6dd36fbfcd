"""Hugging Face transformers folders, uploaded as a .zip (format "hf-zip"): checked and described without
running anything.

A folder holds `config.json`, the weights as `model.safetensors` (or shards named by
`model.safetensors.index.json`) and tokenizer files. Checked here, in the API, without torch or transformers:
the zip's safety (app.formats.onnx_files), `config.json` as bounded JSON, no remote code (`auto_map` in the config
or any Python file: refused), no pickles (`pytorch_model.bin`, `*.pt`, `training_args.bin`, ...: refused, the
user is asked for safetensors), every safetensors header (bounded JSON, offsets inside the file) and a
`model_type` the workers know how to export. The worker converts the folder to ONNX (workers/convert).

Pure module: it imports nothing of the service but its errors and the shared file checks.
"""
from __future__ import annotations

import json
import zipfile
from pathlib import PurePosixPath
from typing import Any

from app.errors import (
    InvalidDataset,
    InvalidModel,
    PickleRefused,
    RemoteCodeRefused,
    Unprocessable,
    UnsupportedArchitecture,
)
from app.formats.onnx_files import _short

FORMAT = "hf-zip"
CONFIG = "config.json"
MAX_CONFIG_BYTES = 1 << 20
MAX_INDEX_BYTES = 16 << 20
SAFETENSORS_INDEX = "model.safetensors.index.json"
# What a tokenizer leaves in a folder: the fast one's single file, or a slow one's vocabulary.
FAST_TOKENIZER = "tokenizer.json"
SLOW_TOKENIZER_FILES = ("vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model")
# Files that are pickles whatever their bytes say (torch.save writes a zip around a pickle).
PICKLE_NAMES = ("pytorch_model.bin", "training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib")

# model_type -> the tasks it converts for and what it takes (tested in tests/formats/test_huggingface.py).
SUPPORTED: dict[str, dict[str, Any]] = {
    "bert": {"modality": "text", "token_type_ids": True},
    "distilbert": {"modality": "text", "token_type_ids": False},
    "roberta": {"modality": "text", "token_type_ids": False},
    "xlm-roberta": {"modality": "text", "token_type_ids": False},
    "albert": {"modality": "text", "token_type_ids": True},
    "electra": {"modality": "text", "token_type_ids": True},
    "gpt2": {"modality": "text", "token_type_ids": False},
    "vit": {"modality": "vision"},
    "deit": {"modality": "vision"},
}
TEXT_TASKS = ("feature-extraction", "text-classification", "token-classification", "question-answering",
              "fill-mask", "text-generation")
VISION_TASKS = ("feature-extraction", "image-classification")
# Architecture name suffix -> task (the first that matches wins).
ARCHITECTURE_TASKS = (
    ("ForSequenceClassification", "text-classification"),
    ("ForTokenClassification", "token-classification"),
    ("ForQuestionAnswering", "question-answering"),
    ("ForMaskedLM", "fill-mask"),
    ("ForCausalLM", "text-generation"),
    ("LMHeadModel", "text-generation"),
    ("ForImageClassification", "image-classification"),
    ("ForImageClassificationWithTeacher", "image-classification"),
    ("Model", "feature-extraction"),
)


def looks_like_hf_folder(archive: zipfile.ZipFile) -> bool:
    """A zip holding a `config.json` and no .onnx file is a transformers folder."""
    names = [PurePosixPath(n) for n in archive.namelist() if not n.endswith("/")]
    return any(n.name == CONFIG for n in names) and not any(n.suffix.lower() == ".onnx" for n in names)


def inspect_folder(archive: zipfile.ZipFile, members: list[zipfile.ZipInfo], *, task: str | None) -> dict[str, Any]:
    """Check a transformers folder in a zip whose members were checked for safety; return its inspection."""
    configs = [m for m in members if PurePosixPath(m.filename).name == CONFIG]
    if len(configs) != 1:
        raise InvalidModel(f"the zip holds {len(configs)} config.json files; upload one model folder per archive")
    root = str(PurePosixPath(configs[0].filename).parent)
    prefix = "" if root == "." else root + "/"
    files = {m.filename[len(prefix):]: m for m in members if m.filename.startswith(prefix)}
    outside = [m.filename for m in members if not m.filename.startswith(prefix)]
    if outside:
        raise InvalidModel(f"files outside the model folder {root!r}: {', '.join(outside[:5])}")
    _refuse_code_and_pickles(archive, files)
    config = _read_json(archive, configs[0], MAX_CONFIG_BYTES, "config.json")
    if not isinstance(config, dict):
        raise InvalidModel("config.json is not a JSON object")
    if "auto_map" in config:
        raise RemoteCodeRefused(
            "config.json has an `auto_map`: the model needs its own Python code to load, and ModelPress never "
            "runs code from an upload (trust_remote_code stays off); send a model of a built-in transformers "
            f"architecture ({', '.join(SUPPORTED)})")
    model_type = config.get("model_type")
    if model_type not in SUPPORTED:
        raise UnsupportedArchitecture(
            f"model_type {str(model_type)[:80]!r} is not one ModelPress converts; supported: "
            f"{', '.join(SUPPORTED)}", supported=list(SUPPORTED))
    weights = _check_weights(archive, files)
    architectures = [a for a in config.get("architectures") or [] if isinstance(a, str)][:8]
    modality = SUPPORTED[model_type]["modality"]
    allowed = TEXT_TASKS if modality == "text" else VISION_TASKS
    inferred = infer_task(architectures)
    chosen = task or inferred
    if chosen not in allowed:
        given = "given" if task else "inferred from its architectures"
        raise Unprocessable(f"task {chosen!r} ({given}) is not one a {model_type} model converts for; "
                            f"choose one of: {', '.join(allowed)}", code="unsupported_task", supported=list(allowed))
    tokenizer = ("tokenizer.json" if FAST_TOKENIZER in files
                 else "slow" if any(name in files for name in SLOW_TOKENIZER_FILES) else None)
    return {
        "framework": "transformers",
        "model_type": model_type,
        "architectures": architectures,
        "task": chosen,
        "task_source": "user" if task else "config",
        "modality": modality,
        "tokenizer": tokenizer,
        "files": sorted(files)[:100],
        "weights": weights,
        "inputs": [], "outputs": [],
        "warnings": [],
    }


def infer_task(architectures: list[str]) -> str:
    for architecture in architectures:
        for suffix, task in ARCHITECTURE_TASKS:
            if architecture.endswith(suffix):
                return task
    return "feature-extraction"


def _refuse_code_and_pickles(archive: zipfile.ZipFile, files: dict[str, zipfile.ZipInfo]) -> None:
    from app.formats.pickles import PICKLE_PREFIXES

    code = [name for name in files if PurePosixPath(name).suffix.lower() in (".py", ".pyc", ".so")]
    if code:
        raise RemoteCodeRefused(f"the folder holds code ({', '.join(code[:5])}); ModelPress never runs code from "
                                "an upload: send config.json, safetensors weights and tokenizer files only")
    for name, info in files.items():
        path = PurePosixPath(name)
        pickled = path.name in PICKLE_NAMES or path.suffix.lower() in PICKLE_SUFFIXES
        if not pickled:
            with archive.open(info) as fh:
                pickled = fh.read(2) in PICKLE_PREFIXES
        if pickled:
            raise PickleRefused(
                f"{name!r} is a PyTorch pickle; ModelPress never unpickles uploads, because unpickling runs code. "
                "Send the weights as safetensors (model.save_pretrained(folder, safe_serialization=True)) and "
                "leave pickled files (pytorch_model.bin, training_args.bin, *.pt) out of the zip")


def _read_json(archive: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int, what: str) -> Any:
    if info.file_size > limit:
        raise InvalidModel(f"{what} is {info.file_size} bytes; at most {limit} are accepted")
    try:
        with archive.open(info) as fh:
            return json.loads(fh.read(limit + 1).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise InvalidModel(f"{what} is not valid JSON ({_short(exc)})") from None


def _check_weights(archive: zipfile.ZipFile, files: dict[str, zipfile.ZipInfo]) -> dict[str, Any]:
    """Every safetensors file's header checked (app.formats.dataset_files: bounded JSON, offsets inside the file,
    sizes matching shapes); a sharded index's files all present."""
    from app.formats.dataset_files import _safetensors_entries

    shards = sorted(name for name in files if name.endswith(".safetensors"))
    if SAFETENSORS_INDEX in files:
        index = _read_json(archive, files[SAFETENSORS_INDEX], MAX_INDEX_BYTES, SAFETENSORS_INDEX)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise InvalidModel(f"{SAFETENSORS_INDEX} has no weight_map of tensor names to files",
                               code="invalid_safetensors")
        missing = sorted(set(weight_map.values()) - set(shards))
        if missing:
            raise InvalidModel(f"{SAFETENSORS_INDEX} names shards the zip lacks: {', '.join(missing[:5])}",
                               code="invalid_safetensors")
    if not shards:
        raise InvalidModel("the folder holds no safetensors weights (model.safetensors); save the model with "
                           "save_pretrained(folder, safe_serialization=True)", code="invalid_safetensors")
    tensors = parameters = 0
    for name in shards:
        info = files[name]
        try:
            with archive.open(info) as fh:
                entries = _safetensors_entries(fh, info.file_size)
        except InvalidDataset as exc:
            raise InvalidModel(f"{name}: {exc.message}", code="invalid_safetensors") from None
        except (zipfile.BadZipFile, EOFError, OSError) as exc:
            raise InvalidModel(f"{name} cannot be read ({_short(exc)})", code="invalid_safetensors") from None
        tensors += len(entries)
        for _, shape, _, _ in entries.values():
            count = 1
            for dim in shape:
                count *= dim
            parameters += count
    return {"files": shards, "tensors": tensors, "parameters": parameters,
            "bytes": sum(files[name].file_size for name in shards)}


def check_task_field(task: str | None) -> str | None:
    """The optional `task` form field of an upload: one of the known task names, or None."""
    if task is None or not task.strip():
        return None
    task = task.strip()
    known = sorted(set(TEXT_TASKS) | set(VISION_TASKS))
    if task not in known:
        raise Unprocessable(f"task {task[:80]!r} is not a known task; choose one of: {', '.join(known)}",
                            code="unsupported_task", supported=known)
    return task
