"""A conversion job (jobs.kind = "convert") as its fenced process runs it: convert the upload, check the export
like an upload, hand it to the worker as an artifact, and say what the worker stores as the new model.

The worker (workers.supervise._succeed) turns `report["converted"]` into a Model row linked to its source.
"""
from __future__ import annotations

import contextlib
import json
import time
import zipfile
from pathlib import Path

from app.errors import JobFailed, ModelPressError
from app.formats.onnx_files import _short, validate_upload
from app.reports import REPORT_VERSION, ConversionReport, ConversionSummary, ReportArtifact
from app.settings import get_settings
from workers import convert

# Fixed member dates: the same export packs to the same bytes, so a retried conversion stores one blob.
ZIP_DATE = (1980, 1, 1, 0, 0, 0)


def execute_conversion(run, workdir: Path, source_path: Path, source_format: str, spec: dict):
    """Returns (report, summary, rows) like workers.steps.execute; rows stay empty (nothing is measured)."""
    run.progress(0.02, "converting", f"converting the {source_format} upload to ONNX", force=True)
    converter = convert.get(source_format)
    out_dir = workdir / "convert"
    out_dir.mkdir()
    options = {"task": (spec.get("convert") or {}).get("task"),
               "progress": lambda fraction, message: run.progress(0.05 + 0.8 * fraction, "converting", message)}
    started = time.perf_counter()
    try:
        with contextlib.chdir(out_dir):
            converted = converter(source_path, out_dir, options)
    except ModelPressError:
        raise
    except Exception as exc:  # the exporter's own failure: named as a conversion's, with its words
        raise JobFailed(f"the conversion failed: {type(exc).__name__}: {_short(exc)}", code="conversion_failed") from exc
    duration = time.perf_counter() - started
    run.check_cancel()
    packed = pack(converted.model_path, converted.files, workdir / "packed")
    run.progress(0.9, "checking", "checking the exported model like an upload", force=True)
    try:
        fmt, inspection = validate_upload(packed, filename=packed.name, workdir=workdir / "check",
                                          limits=get_settings().file_limits())
    except ModelPressError as exc:
        raise JobFailed(f"the exported ONNX model fails the upload checks: {exc.message}",
                        code="conversion_failed") from None
    inspection["converted_from"] = {k: v for k, v in converted.details.items() if k != "tokenizer"}
    if converted.details.get("tokenizer"):
        inspection["tokenizer"] = converted.details["tokenizer"]
    artifact = run.store_artifact(packed, name=packed.name, kind="model",
                                  content_type="application/zip" if fmt == "onnx-zip" else "application/octet-stream")
    summary = ConversionSummary(
        converted_format=fmt, converted_size_bytes=artifact["size_bytes"], task=converted.details.get("task"),
        exporter=converted.details.get("exporter"), check=converted.details.get("check"),
        duration_s=round(duration, 3))
    report = ConversionReport(
        report_version=REPORT_VERSION, job_id=run.job_id, kind="convert", sandbox=run.sandbox,
        conversion=converted.details, converted={"artifact": artifact["name"], "format": fmt, "inspection": inspection},
        summary=summary, artifacts=[ReportArtifact.model_validate(a) for a in run.artifacts]
        + [ReportArtifact(name="report.json", kind="report")],
    ).model_dump(mode="json", fallback=str)
    report_path = workdir / "report.json"
    report_path.write_text(json.dumps(report, indent=2, default=str))
    run.store_artifact(report_path, name="report.json", kind="report", content_type="application/json")
    return report, report["summary"], []


def pack(model_path: Path, files: list[Path], dest: Path) -> Path:
    """The export as one stored file: the .onnx alone, or a zip of it with its external data and extra files
    (format onnx-zip, as a user would upload it)."""
    dest.mkdir(parents=True, exist_ok=True)
    beside = sorted(p for p in model_path.parent.iterdir() if p.is_file() and p != model_path and p not in files)
    if not files and not beside:
        target = dest / "model.onnx"
        target.write_bytes(model_path.read_bytes())
        return target
    target = dest / "model.zip"
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for path in [model_path, *beside, *files]:
            info = zipfile.ZipInfo(path.name, date_time=ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            with path.open("rb") as src, archive.open(info, "w", force_zip64=True) as out:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
    return target
