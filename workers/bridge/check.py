"""Running a model both ways on the same inputs and judging the difference.

The tolerance is meant to pass float noise (different kernels, summation order) and fail a
wrong conversion: cosine >= 0.9999 and max |diff| <= 1e-3 x max(1, max |reference|) for every
output. An output whose every difference is below 1e-5 x max(1, max |reference|) passes whatever
its cosine, since the cosine of near-zero outputs is itself noise.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from workers.bridge.errors import ConversionMismatch

MIN_COSINE = 0.9999
MAX_RELATIVE_DIFF = 1e-3
NOISE_RELATIVE_DIFF = 1e-5


def session(model: Path | bytes):
    """A single-threaded CPU session that does not spin: the worker shares its cores."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    source = str(model) if isinstance(model, Path) else model
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


Feeds = list[dict[str, np.ndarray]]
Outputs = list[list[np.ndarray]]      # per feed, per output


def run_onnx(model: Path | bytes, feeds: Feeds, output_names: list[str]) -> Outputs:
    """Outputs per feed, in `output_names` order."""
    runner = session(model)
    wanted = [i.name for i in runner.get_inputs()]
    return [runner.run(output_names, {name: feed[name] for name in wanted}) for feed in feeds]


def run_module(module: torch.nn.Module, input_names: list[str], feeds: Feeds) -> Outputs:
    """Outputs per feed of `module` in eval mode (its own mode is restored afterwards)."""
    was_training = module.training
    module.eval()
    results = []
    try:
        with torch.no_grad():
            for feed in feeds:
                produced = module(*[torch.from_numpy(np.ascontiguousarray(feed[name])) for name in input_names])
                produced = produced if isinstance(produced, (tuple, list)) else (produced,)
                results.append([p.detach().cpu().numpy() if isinstance(p, torch.Tensor) else np.asarray(p)
                                for p in produced])
    finally:
        module.train(was_training)
    return results


def sample_count(feeds: Feeds) -> int:
    return sum(next((int(a.shape[0]) for a in feed.values() if a.ndim), 1) for feed in feeds)


def figures(reference: Outputs, candidate: Outputs, output_names: list[str],
            *, inputs: str, samples: int) -> dict[str, Any]:
    """Per-output max |diff|, cosine and max |reference| over all feeds, and the worst of each."""
    outputs: dict[str, dict[str, float]] = {}
    for index, name in enumerate(output_names):
        ref_parts, cand_parts = [], []
        for ref_run, cand_run in zip(reference, candidate):
            if index >= len(cand_run):
                raise ConversionMismatch(f"the converted model returns {len(cand_run)} outputs; the original "
                                         f"returns {len(output_names)} ({', '.join(output_names)})")
            ref, cand = np.asarray(ref_run[index]), np.asarray(cand_run[index])
            if ref.shape != cand.shape:
                raise ConversionMismatch(f"output '{name}' has shape {list(cand.shape)} in the converted model "
                                         f"but {list(ref.shape)} in the original")
            ref_parts.append(ref.astype(np.float64).ravel())
            cand_parts.append(cand.astype(np.float64).ravel())
        outputs[name] = _compare(np.concatenate(ref_parts), np.concatenate(cand_parts))
    return {
        "inputs": inputs,
        "samples": samples,
        "outputs": outputs,
        "max_abs_diff": max((o["max_abs_diff"] for o in outputs.values()), default=0.0),
        "cosine": min((o["cosine"] for o in outputs.values()), default=1.0),
    }


def _compare(ref: np.ndarray, cand: np.ndarray) -> dict[str, float]:
    same_special = (np.isnan(ref) & np.isnan(cand)) | (np.isinf(ref) & (ref == cand))
    ref, cand = np.where(same_special, 0.0, ref), np.where(same_special, 0.0, cand)
    if not ref.size:
        return {"max_abs_diff": 0.0, "cosine": 1.0, "reference_max_abs": 0.0}
    diff = np.abs(ref - cand)
    max_diff = float(np.nan_to_num(diff.max(), nan=np.inf))
    norms = float(np.linalg.norm(ref)) * float(np.linalg.norm(cand))
    if max_diff == 0.0:
        cosine = 1.0
    elif norms == 0.0 or not np.isfinite(norms):
        cosine = 0.0
    else:
        cosine = float(np.clip(np.dot(ref, cand) / norms, -1.0, 1.0))
    return {"max_abs_diff": max_diff, "cosine": cosine, "reference_max_abs": float(np.abs(ref).max())}


def failures(check: dict[str, Any]) -> list[str]:
    """A sentence per output outside the tolerance."""
    found = []
    for name, figure in check["outputs"].items():
        scale = max(1.0, figure["reference_max_abs"])
        if figure["max_abs_diff"] <= NOISE_RELATIVE_DIFF * scale:
            continue
        if figure["cosine"] < MIN_COSINE or figure["max_abs_diff"] > MAX_RELATIVE_DIFF * scale:
            found.append(f"output '{name}': max abs diff {figure['max_abs_diff']:.3g} (reference max abs "
                         f"{figure['reference_max_abs']:.3g}), cosine {figure['cosine']:.6f}")
    return found


def require_match(check: dict[str, Any], what: str) -> None:
    problems = failures(check)
    if problems:
        raise ConversionMismatch(
            f"{what} does not compute the same outputs on {check['samples']} {check['inputs']} samples: "
            + "; ".join(problems)
            + f" (tolerance: cosine >= {MIN_COSINE}, "
            f"max abs diff <= {MAX_RELATIVE_DIFF:g} x max(1, reference max abs))",
            check=check,
        )
