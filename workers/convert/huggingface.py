"""Hugging Face transformers folders (format "hf-zip") -> ONNX, with torch.onnx.export over transformers.

Not Optimum: optimum-onnx (0.1.0) requires transformers < 4.58 and cannot install beside the transformers this
project pins (5.x, constraints.txt). torch.onnx.export (dynamo=False, the TorchScript exporter the repo uses
elsewhere) over the transformers model, with dynamic batch and sequence axes, exports every architecture listed
in app.formats.huggingface.SUPPORTED.

Never remote code (trust_remote_code=False, and the folder is re-checked for auto_map / .py here), never
unpickling (use_safetensors=True, and pickled files are refused before anything loads). The export is checked:
ONNX Runtime's outputs against the PyTorch model's on fresh inputs of another batch and sequence length, with
padding (|ort - torch| <= ATOL + RTOL * |torch|).
"""
from __future__ import annotations

import inspect
import re
from pathlib import Path

from app.errors import JobFailed, ModelPressError
from app.formats.huggingface import SUPPORTED
from app.formats.onnx_files import _short, unpack_hf_folder
from workers.convert import Converted, register

OPSET = 17
ATOL, RTOL = 1e-4, 1e-3
TASK_CLASSES = {
    "feature-extraction": "AutoModel",
    "text-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
    "question-answering": "AutoModelForQuestionAnswering",
    "fill-mask": "AutoModelForMaskedLM",
    "text-generation": "AutoModelForCausalLM",
    "image-classification": "AutoModelForImageClassification",
}
TASK_OUTPUTS = {"question-answering": ["start_logits", "end_logits"], "feature-extraction": ["last_hidden_state"]}
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
# Sequence lengths of the traced sample and of the check (another length, with padding, proves the axes dynamic).
TRACE_SEQ, CHECK_SEQ = 8, 13
ATEN_OP = re.compile(r"aten::\w+|onnx::\w+")


@register("hf-zip")
def convert(source_path: Path, out_dir: Path, options: dict) -> Converted:
    import torch
    import transformers

    from app.settings import get_settings

    progress = options.get("progress") or (lambda fraction, message: None)
    folder, inspection = unpack_hf_folder(source_path, out_dir / "source", get_settings().file_limits(),
                                          task=options.get("task"))
    task, model_type = inspection["task"], inspection["model_type"]
    progress(0.1, f"loading the {model_type} model for {task}")
    try:
        config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=False, local_files_only=True)
        model_class = getattr(transformers, TASK_CLASSES[task])
        model = model_class.from_pretrained(folder, config=config, use_safetensors=True, trust_remote_code=False,
                                            local_files_only=True, attn_implementation="eager")
    except ModelPressError:
        raise
    except Exception as exc:
        raise JobFailed(f"transformers could not load the {model_type} folder as {TASK_CLASSES[task]} "
                        f"(task {task}): {_short(exc)}", code="conversion_failed") from None
    model.eval()
    names = input_names(model, model_type, inspection["modality"])
    outputs = TASK_OUTPUTS.get(task, ["logits"])
    wrapper = _outputs_module(model, names, outputs, causal=task == "text-generation").eval()
    dynamic = {n: ({0: "batch"} if n == "pixel_values" else {0: "batch", 1: "sequence"}) for n in names}
    per_token = inspection["modality"] == "text" and task != "text-classification"
    dynamic |= {o: {0: "batch", 1: "sequence"} if per_token else {0: "batch"} for o in outputs}
    onnx_path = out_dir / "model" / "model.onnx"
    onnx_path.parent.mkdir(parents=True)
    progress(0.3, f"exporting to ONNX (opset {OPSET}, torch.onnx)")
    sample = sample_inputs(config, names, batch=2, seq=TRACE_SEQ, padded=0, seed=0)
    try:
        with torch.no_grad():
            torch.onnx.export(wrapper, tuple(sample.values()), str(onnx_path), input_names=names,
                              output_names=outputs, dynamic_axes=dynamic, opset_version=OPSET, dynamo=False)
    except Exception as exc:
        op = ATEN_OP.search(str(exc))
        where = f" at op {op.group(0)}" if op else ""
        raise JobFailed(f"the ONNX export of {type(model).__name__} failed{where}: {_short(exc)}",
                        code="conversion_failed") from None
    wrapper.eval()  # the exporter restores the training flag it found; the check runs in eval mode
    progress(0.7, "checking ONNX Runtime's outputs against PyTorch's")
    check = check_export(wrapper, onnx_path, config, names, outputs)
    files = []
    tokenizer = None
    if inspection["modality"] == "text" and inspection.get("tokenizer"):
        progress(0.9, "saving the tokenizer")
        tokenizer = save_tokenizer(folder, out_dir / "model", config, names)
        files.append(out_dir / "model" / "tokenizer.json")
    return Converted(model_path=onnx_path, files=files, details={
        "exporter": f"torch.onnx.export (TorchScript, dynamo=False), torch {torch.__version__}, "
                    f"transformers {transformers.__version__}",
        "opset": OPSET, "task": task, "task_source": inspection["task_source"], "model_type": model_type,
        "architecture": type(model).__name__, "inputs": names, "outputs": outputs,
        "dynamic_axes": {k: list(v.values()) for k, v in dynamic.items()}, "check": check, "tokenizer": tokenizer,
    })


def _outputs_module(model, names: list[str], outputs: list[str], *, causal: bool):
    """A module taking the inputs positionally and returning the named outputs as a tuple (what tracing needs)."""
    import torch

    class Outputs(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *args):
            kwargs = dict(zip(names, args))
            if causal:
                kwargs["use_cache"] = False
            result = self.model(**kwargs, return_dict=True)
            return tuple(result[o] for o in outputs)

    return Outputs()


def input_names(model, model_type: str, modality: str) -> list[str]:
    if modality == "vision":
        return ["pixel_values"]
    takes = inspect.signature(model.forward).parameters
    names = [n for n in TEXT_INPUTS if n in takes]
    if not SUPPORTED[model_type].get("token_type_ids") and "token_type_ids" in names:
        names.remove("token_type_ids")
    return names


def sample_inputs(config, names: list[str], *, batch: int, seq: int, padded: int, seed: int) -> dict:
    import torch

    generator = torch.Generator().manual_seed(seed)
    feeds = {}
    for name in names:
        if name == "pixel_values":
            size = config.image_size
            feeds[name] = torch.randn(batch, getattr(config, "num_channels", 3), size, size, generator=generator)
        elif name == "input_ids":
            feeds[name] = torch.randint(0, config.vocab_size, (batch, seq), generator=generator)
        elif name == "attention_mask":
            mask = torch.ones(batch, seq, dtype=torch.long)
            if padded:
                mask[1:, seq - padded:] = 0  # the first row whole, the others padded at the end
            feeds[name] = mask
        elif name == "token_type_ids":
            types = torch.zeros(batch, seq, dtype=torch.long)
            types[:, seq // 2:] = 1
            feeds[name] = types
    return feeds


def check_export(wrapper, onnx_path: Path, config, names: list[str], outputs: list[str]) -> dict:
    """ONNX Runtime against PyTorch on inputs of another batch and sequence length than the trace's."""
    import numpy as np
    import onnxruntime as ort
    import torch

    feeds = sample_inputs(config, names, batch=3, seq=CHECK_SEQ, padded=4, seed=1)
    with torch.no_grad():
        expected = [t.numpy() for t in wrapper(*feeds.values())]
    try:
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        got = session.run(outputs, {k: v.numpy() for k, v in feeds.items()})
    except Exception as exc:
        raise JobFailed(f"ONNX Runtime cannot run the exported model: {_short(exc)}", code="conversion_failed") from None
    worst = {}
    for name, want, have in zip(outputs, expected, got):
        if want.shape != have.shape:
            raise JobFailed(f"the exported model's output {name!r} has shape {list(have.shape)} where PyTorch's has "
                            f"{list(want.shape)} (batch 3, sequence {CHECK_SEQ})", code="conversion_failed")
        diff = np.abs(want - have)
        worst[name] = float(diff.max())
        if not np.all(diff <= ATOL + RTOL * np.abs(want)):
            raise JobFailed(f"the exported model's output {name!r} differs from PyTorch's by up to {worst[name]:.3g} "
                            f"(tolerance {ATOL:g} + {RTOL:g}*|value|) on batch 3, sequence {CHECK_SEQ}",
                            code="conversion_failed")
    return {"max_abs_diff": worst, "atol": ATOL, "rtol": RTOL, "inputs": {k: list(v.shape) for k, v in feeds.items()}}


def save_tokenizer(folder: Path, out_dir: Path, config, names: list[str]) -> dict:
    """The folder's tokenizer as one `tokenizer.json` (transformers' fast tokenizer, built from a slow one's files
    where needed) for the API's texts datasets, with what they need to pad like the model expects."""
    import transformers

    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, use_fast=True, trust_remote_code=False,
                                                               local_files_only=True)
    except Exception as exc:
        raise JobFailed(f"the folder's tokenizer cannot be loaded: {_short(exc)}", code="conversion_failed") from None
    if not tokenizer.is_fast:
        raise JobFailed(f"the folder's tokenizer ({type(tokenizer).__name__}) has no fast (Rust) version to save as "
                        "tokenizer.json", code="conversion_failed")
    tokenizer.backend_tokenizer.save(str(out_dir / "tokenizer.json"))
    pad = tokenizer.pad_token_id
    pad_id = pad if pad is not None else (tokenizer.eos_token_id or 0)
    positions = getattr(config, "max_position_embeddings", 0) or getattr(config, "n_positions", 512)
    # RoBERTa-style positions start after the padding index.
    usable = positions - (getattr(config, "pad_token_id", 0) or 0) - 1 if config.model_type in (
        "roberta", "xlm-roberta") else positions
    return {"file": "tokenizer.json", "pad_id": int(pad_id),
            "pad_token": tokenizer.convert_ids_to_tokens(int(pad_id)), "max_length": int(min(usable, 4096)),
            "inputs": names}
