"""Benchmark: ModelPress's quantization methods against a plain call of ONNX Runtime's API, side by side.

For each model and scheme, in one process: the ModelPress method (the worker's own code)
and the call a user would otherwise write (ONNX Runtime's quantization API with default
arguments) each produce a model, and each is measured against the same original with the
worker's measurement code (latency interleaved with the original; accuracy or fidelity on
real data). Prints a table and appends it, with the machine, to bench/RESULTS.md.

Models: (a) a 6-layer BERT encoder (hidden 384, 12 heads, vocab 30522) built by `transformers`
from a config (random weights: there is no hub here), token ids of length 128;
(b) a CNN trained here on scikit-learn's load_digits (real digits, real labels);
(c) the pretrained models in ../shared/models, on real images where there are some.

    .venv/bin/python bench/quantize.py [--only digits-cnn,bert] [--no-write]
"""
from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MODELS = ROOT.parent / "shared" / "models"

from bench.common import digits_classifier  # noqa: E402
from bench.results import publish  # noqa: E402
from workers import methods  # noqa: E402
from workers.datasets import Dataset  # noqa: E402
from workers.measure import measure_pair  # noqa: E402

SCHEMES = ("int8_dynamic", "int8_static", "int4_weight_only", "fp16")


@dataclass
class Case:
    name: str
    path: Path
    eval: Dataset
    calibration: Dataset
    batch_sizes: list[int]
    iterations: dict[int, int]
    schemes: tuple[str, ...] = SCHEMES
    notes: list[str] = field(default_factory=list)


# --- models ---------------------------------------------------------------------------------------

def bert_case(tmp: Path) -> Case:
    import torch
    from transformers import BertConfig, BertModel

    # Eager attention: the classic BERT graph (MatMul/Softmax) that most exported encoders have; transformers'
    # default SDPA path exports a different attention pattern.
    config = BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
                        attn_implementation="eager")
    torch.manual_seed(0)
    bert = BertModel(config).eval()

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    rng = np.random.default_rng(0)
    seq = 128
    ids = rng.integers(1000, config.vocab_size, (96, seq)).astype(np.int64)
    ids[:, 0] = 101  # [CLS]
    mask = np.ones_like(ids)
    lengths = rng.integers(seq // 2, seq + 1, len(ids))  # real batches are padded: vary the length
    for row, length in enumerate(lengths):
        ids[row, length - 1] = 102  # [SEP]
        ids[row, length:] = 0
        mask[row, length:] = 0
    path = tmp / "bert.onnx"
    with torch.no_grad():
        torch.onnx.export(Encoder().eval(), (torch.from_numpy(ids[:1]), torch.from_numpy(mask[:1])), str(path),
                          dynamo=False, opset_version=17, input_names=["input_ids", "attention_mask"],
                          output_names=["last_hidden_state"],
                          dynamic_axes={"input_ids": {0: "batch", 1: "sequence"},
                                        "attention_mask": {0: "batch", 1: "sequence"},
                                        "last_hidden_state": {0: "batch", 1: "sequence"}})
    data = {"input_ids": ids, "attention_mask": mask}
    return Case("bert-6x384 (random weights)", path,
                eval=Dataset({k: v[:64] for k, v in data.items()}, name="token ids, 128 long"),
                calibration=Dataset({k: v[64:] for k, v in data.items()}, name="token ids (other samples)"),
                batch_sizes=[1, 32], iterations={1: 60, 32: 6},
                notes=["random weights: fidelity (cosine to fp32), not accuracy"])


def digits_case(tmp: Path) -> Case:
    onnx_bytes, x, y = digits_classifier("cnn")
    path = tmp / "digits-cnn.onnx"
    path.write_bytes(onnx_bytes)
    return Case("digits-cnn (trained here)", path,
                eval=Dataset({"images": x[100:]}, labels=y[100:], name="load_digits held out"),
                calibration=Dataset({"images": x[:100]}, name="load_digits (other held-out samples)"),
                batch_sizes=[1, 32], iterations={1: 200, 32: 100})


def opt_mnist_case() -> Case | None:
    from PIL import Image
    from sklearn.datasets import load_digits

    path = MODELS / "mnist-cnn" / "opt-mnist.onnx"
    if not path.is_file():
        return None
    digits = load_digits()
    # 8x8 digits (0..16) drawn into MNIST's frame: 20x20 centred in 28x28, 0..255.
    images = []
    for image in digits.images[:600]:
        small = Image.fromarray((image * 255 / 16).astype(np.uint8)).resize((20, 20), Image.BILINEAR)
        canvas = np.zeros((28, 28), np.float32)
        canvas[4:24, 4:24] = np.asarray(small, np.float32)
        images.append(canvas)
    x = np.stack(images)[:, None]
    y = digits.target[:600].astype(np.int64)
    return Case("opt-mnist (pretrained)", path,
                eval=Dataset({"Input3": x[100:]}, labels=y[100:], name="load_digits upscaled to 28x28"),
                calibration=Dataset({"Input3": x[:100]}, name="load_digits upscaled (other samples)"),
                batch_sizes=[1], iterations={1: 300},
                notes=["batch fixed at 1 by the model"])


def image_case(name: str, rel: str, input_name: str, size: tuple[int, int], prep) -> Case | None:
    from PIL import Image

    path = MODELS / rel
    if not path.is_file():
        return None
    frames = []
    for file in sorted((MODELS / "images").glob("0*.jpg")):
        image = Image.open(file).convert("RGB").resize(size)
        for flipped in (image, image.transpose(Image.FLIP_LEFT_RIGHT)):
            frames.append(prep(np.asarray(flipped, np.float32)))
    x = np.stack(frames)
    return Case(name, path, eval=Dataset({input_name: x}, name="COCO val images (and mirror images)"),
                calibration=Dataset({input_name: x}, name="the same COCO images"),
                batch_sizes=[1], iterations={1: 60},
                notes=["batch fixed at 1 by the model; calibrated and judged on the same 6 images: fidelity only"])


def cases(tmp: Path, only: set[str] | None) -> list[Case]:
    makers = {
        "bert": lambda: bert_case(tmp),
        "digits-cnn": lambda: digits_case(tmp),
        "opt-mnist": opt_mnist_case,
        "ultraface": lambda: image_case("ultraface-rfb320 (pretrained)", "ultraface-rfb320/version-RFB-320.onnx",
                                        "input", (320, 240), lambda a: ((a - 127.0) / 128.0).transpose(2, 0, 1)),
        "yolox-nano": lambda: image_case("yolox-nano (pretrained)", "yolox-nano/yolox_nano.onnx", "images",
                                         (416, 416), lambda a: a[:, :, ::-1].transpose(2, 0, 1).copy()),
    }
    found = []
    for key, make in makers.items():
        if only and key not in only:
            continue
        case = make()
        if case is not None:
            found.append(case)
    return found


# --- the two ways to quantize ---------------------------------------------------------------------

def modelpress(scheme: str, case: Case, out_dir: Path) -> tuple[Path, str]:
    out_dir.mkdir(parents=True)  # the pipeline hands every step an existing folder
    method = methods.get(f"quantize.{scheme}")
    raw = {"calibration_dataset_id": "bench"} if scheme == "int8_static" else {}
    ctx = methods.StepContext(calibration=case.calibration, datasets={"calibration_dataset_id": case.calibration})
    output = method.run(case.path, method.params_model.model_validate(raw), out_dir, ctx)
    warnings = output.details.get("warnings", [])
    return output.model_path, "; ".join(w[:80] for w in warnings[:1])


class Reader:
    """The CalibrationDataReader a user writes: one sample per call."""

    def __init__(self, data: Dataset) -> None:
        self.rows = iter([feeds for feeds, _ in data.batches(1)])

    def get_next(self):
        return next(self.rows, None)


def plain_ort(scheme: str, case: Case, out_dir: Path) -> tuple[Path, str]:
    """ONNX Runtime's API with default arguments, as its documentation shows."""
    import onnx

    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "plain.onnx"
    if scheme == "int8_dynamic":
        from onnxruntime.quantization import quantize_dynamic

        quantize_dynamic(str(case.path), str(out))
    elif scheme == "int8_static":
        from onnxruntime.quantization import quantize_static

        quantize_static(str(case.path), str(out), Reader(case.calibration))
    elif scheme == "int4_weight_only":
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        quantizer = MatMulNBitsQuantizer(onnx.load(str(case.path)))
        quantizer.process()
        quantizer.model.save_model_to_file(str(out), use_external_data_format=False)
    elif scheme == "fp16":
        from onnxruntime.transformers import float16  # the converter ORT ships (onnxconverter-common's, maintained)

        onnx.save(float16.convert_float_to_float16(onnx.load(str(case.path))), str(out))
    return out, ""


# --- measuring ------------------------------------------------------------------------------------

def judge(case: Case, candidate: Path) -> dict[str, Any]:
    row: dict[str, Any] = {}
    for batch in case.batch_sizes:
        measured = measure_pair(case.path, candidate, batch_sizes=[batch], warmup=max(2, case.iterations[batch] // 10),
                                iterations=case.iterations[batch], dataset=case.eval if batch == 1 else None)
        latency = measured["latency"]["batch_sizes"]
        row["size_ratio"] = measured["size"]["ratio"]
        row[f"ratio_b{batch}"] = latency[0]["p50_ratio"] if latency else None
        row[f"p50_b{batch}"] = (latency[0]["baseline"]["p50_ms"], latency[0]["result"]["p50_ms"]) if latency else None
        if batch == 1:
            on = measured["dataset"]
            row["cosine"] = on["fidelity"]["mean_cosine"]
            acc = on["accuracy"]
            row["accuracy"] = None if acc is None else (acc["original"]["top1"], acc["compressed"]["top1"])
    return row


def quality(row: dict[str, Any]) -> str:
    if "error" in row:
        return "—"
    text = f"cos {row['cosine']:.4f}" if row.get("cosine") is not None else ""
    if row.get("accuracy"):
        before, after = row["accuracy"]
        text = f"top-1 {100 * before:.1f}% → {100 * after:.1f}%; " + text
    return text


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", default="", help="comma-separated: bert,digits-cnn,opt-mnist,ultraface,yolox-nano")
    parser.add_argument("--schemes", default=",".join(SCHEMES))
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    only = set(filter(None, args.only.split(","))) or None
    schemes = [s for s in args.schemes.split(",") if s]

    started = time.time()
    lines = ["| model | scheme | by | size ratio | p50 ratio b1 | p50 ratio b32 | accuracy / fidelity (real data) | "
             "note |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    with tempfile.TemporaryDirectory() as tmp_name, contextlib.chdir(tmp_name):  # ORT's tools drop temp files in cwd
        tmp = Path(tmp_name)
        for case in cases(tmp, only):
            print(f"== {case.name}", flush=True)
            for scheme in schemes:
                for by, make in (("ModelPress", modelpress), ("plain ORT", plain_ort)):
                    out_dir = tmp / f"{case.path.stem}-{scheme}-{by.replace(' ', '')}"
                    try:
                        path, note = make(scheme, case, out_dir)
                        row = judge(case, path) | {"note": note}
                    except Exception as exc:  # the plain call fails on some real models: that is a finding
                        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                        row = {"error": f"fails: {type(exc).__name__}: {message[:120]}"}
                        if by == "ModelPress":
                            traceback.print_exc()
                    shutil.rmtree(out_dir, ignore_errors=True)
                    cells = [case.name, scheme, by]
                    if "error" in row:
                        cells += ["—", "—", "—", "—", row["error"]]
                    else:
                        b32 = f"{row['ratio_b32']:.2f}" if row.get("ratio_b32") is not None else "n/a"
                        cells += [f"{row['size_ratio']:.3f}", f"{row['ratio_b1']:.2f}", b32, quality(row),
                                  row.get("note", "")]
                    line = "| " + " | ".join(cells) + " |"
                    print(line, flush=True)
                    lines.append(line)
    publish("Quantization schemes: ModelPress vs a plain ONNX Runtime call",
            "Each row is measured against the same original in one process (latency interleaved with it); p50 "
            "ratio = result p50 / original p50 (below 1 is faster); accuracy and cosine on real data (see the script).",
            "\n".join(lines), started=started, write=not args.no_write)


if __name__ == "__main__":
    main()
