"""Converters: a stored model in another framework's format -> a stored ONNX model, by model format.

A model uploaded in a format other than ONNX ("hf-zip": a Hugging Face transformers folder, the Keras formats)
is converted by a job of its own kind (jobs.kind = "convert"), queued when the upload is committed and run in a
fenced job process like every job (workers.supervise, workers.job_child). The job process looks the upload's
format up here and calls its converter.

The contract of a converter, registered with `@register("<format>")`:

    def convert(source_path: Path, out_dir: Path, options: dict) -> Converted

- `source_path`: the stored upload as the user sent it (a .zip, a .keras file, ...), read-only; the converter
  unpacks it itself (under `out_dir`, e.g. `out_dir / "source"`) with the same zip safety as the API's check.
- `out_dir`: an empty folder of the job's own; everything the converter writes goes under it.
- `options`: {"task": str | None (the user's override, else None), "inspection": the upload's inspection
  (dict), "progress": callable(fraction: float, message: str), "max_abs_tolerance": float (optional)}.
- Returns `Converted`: the exported `.onnx` (its external data, if any, beside it in the same folder), extra
  files to keep with it (e.g. `tokenizer.json`), and `details` for the conversion report (exporter and its
  version, opset, task, the check of the ONNX output against the framework's own output with its tolerance).
- Fails with `app.errors.JobFailed(message, code="conversion_failed")` naming the op / node / layer where it
  can (or another specific code such as "remote_code_refused", "pickle_refused"); never with a raw library
  exception as the whole message. Never executes code from the upload (no remote code, no pickles, no Lambda
  layers).

The job process then checks the export like an upload (app.formats.onnx_files) and the worker stores it as a new
model row linked to its source (models.source_model_id).

Registering must stay light: a converter module imports its framework (torch, transformers, tensorflow) inside
the function, never at module level, so that importing this registry costs nothing.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.errors import JobFailed


@dataclass
class Converted:
    model_path: Path
    files: list[Path] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)


Converter = Callable[[Path, Path, dict], Converted]

_CONVERTERS: dict[str, Converter] = {}
# Modules whose import registers converters (each imports its framework lazily).
CONVERTER_MODULES = ("workers.convert.huggingface", "workers.convert.keras")


def register(fmt: str) -> Callable[[Converter], Converter]:
    def add(fn: Converter) -> Converter:
        if fmt in _CONVERTERS and _CONVERTERS[fmt] is not fn:
            raise ValueError(f"a converter for format {fmt!r} is already registered")
        _CONVERTERS[fmt] = fn
        return fn
    return add


def _load() -> None:
    for name in CONVERTER_MODULES:
        importlib.import_module(name)


def formats() -> list[str]:
    _load()
    return sorted(_CONVERTERS)


def get(fmt: str) -> Converter:
    """The converter for a stored model format; JobFailed(conversion_failed) when there is none."""
    _load()
    try:
        return _CONVERTERS[fmt]
    except KeyError:
        raise JobFailed(f"no converter for models of format {fmt!r} on this worker (it converts: "
                        f"{', '.join(sorted(_CONVERTERS)) or 'none'})", code="conversion_failed") from None
