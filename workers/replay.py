"""The worker's half of a job's recipe (app.jobs.replay has the API's), the seeding that makes a step repeatable,
and a replay's comparison with its original.

The recipe is content-addressed: `digest` is the sha256 of what decides the result (the inputs' sha256, the
methods with their versions and params, the goal, target and evaluation, the seeds), so two jobs with one digest
were asked for the same thing; `libraries` and `environment` say what it ran on. On the same machine and stack,
a replay's CPU model artifacts come out byte-identical to its original's; where they do not, the comparison
says which artifact and the likely reason.
"""
from __future__ import annotations

import hashlib
import json
import platform
import random
from typing import Any

from app.jobs.replay import RECORD_KINDS

RECIPE_VERSION = 1
# What a model artifact depends on besides the recipe's inputs: the libraries that build or train it.
LIBRARIES = ("numpy", "onnx", "onnxruntime", "onnxruntime-gpu", "torch", "openvino", "nncf", "scikit-learn",
             "onnxscript", "torch-pruning")
# The figures a replay compares with its original's, as JobSummary names them.
FIGURES = ("original_size_bytes", "compressed_size_bytes", "size_ratio")


def libraries() -> dict[str, str | None]:
    """The versions of the libraries the methods use (None: not installed), read from their metadata without
    importing them."""
    from workers.measure.environment import package_version

    versions: dict[str, str | None] = {"python": platform.python_version()}
    versions.update({name: package_version(name) for name in LIBRARIES})
    return versions


def environment(spec: dict, threads: int | None) -> dict[str, Any]:
    """This machine's fingerprint (app.measurements.fingerprint: CPU, cores, memory, GPU, OS, versions, provider,
    threads) and its id, as the measurements' environments table keys it."""
    from app.measurements.fingerprint import fingerprint, fingerprint_id
    from workers.measure.environment import default_threads, describe

    provider = ((spec.get("evaluate") or {}).get("providers") or ["CPUExecutionProvider"])[0]
    stack = fingerprint(describe(provider=provider, threads=threads or default_threads()))
    return {"id": fingerprint_id(stack), "fingerprint": stack}


def seeds(spec: dict) -> dict[str, Any]:
    """The seeds a job's random choices come from: step i (counted from 1) runs with seed i, which also seeds
    Python's, NumPy's and torch's global generators (seed_everything); the measurement's inputs use seed 0."""
    count = len(spec.get("steps") or [])
    return {"steps": list(range(1, count + 1)), "measurement": 0, "global": "each step's seed (random, numpy, torch)"}


def digest(recipe: dict[str, Any]) -> str:
    """sha256 of what decides a job's result, in canonical JSON: the same digest asks for the same result."""
    provenance = recipe.get("provenance") or {}
    decisive = {
        "model": (provenance.get("model") or {}).get("sha256"),
        "datasets": sorted((d["role"], d["sha256"]) for d in provenance.get("datasets") or []),
        "models": sorted((m["role"], m["sha256"]) for m in provenance.get("models") or []),
        "methods": provenance.get("methods"),
        **{key: recipe.get(key) for key in ("goal", "target", "evaluate", "seeds")},
    }
    return hashlib.sha256(json.dumps(decisive, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def build(spec: dict, *, threads: int | None) -> dict[str, Any]:
    """A job's recipe: the API's provenance (job.spec) plus seeds, libraries and the environment, with its
    digest. A job submitted before provenance was recorded has none; its recipe says so."""
    recipe: dict[str, Any] = {
        "recipe_version": RECIPE_VERSION,
        "provenance": spec.get("provenance"),
        "steps": [{"method": s["method"], "version": s.get("version"), "params": s.get("params")}
                  for s in spec.get("steps") or []],
        "goal": spec.get("goal"),
        "target": spec.get("target"),
        "evaluate": spec.get("evaluate"),
        "seeds": seeds(spec),
        "libraries": libraries(),
        "environment": environment(spec, threads),
        "torch_threads": _torch_threads(),
    }
    if spec.get("replay_of"):
        recipe["replay_of"] = spec["replay_of"].get("job_id")
    recipe["digest"] = digest(recipe)
    return recipe


def _torch_threads() -> int | None:
    """The intra-op threads torch trains with (set by seed_everything), which float sums depend on; None where
    torch is not installed."""
    from importlib.util import find_spec

    return training_threads() if find_spec("torch") is not None else None


def training_threads() -> int:
    """The intra-op thread count a step trains with: one per usable physical core, as the measurement uses, so
    the same machine always splits (and sums) the same way."""
    from workers.measure.environment import default_threads

    return default_threads()


def seed_everything(seed: int, *, trains: bool) -> None:
    """Seed Python's, NumPy's and (for a method that trains) torch's global generators with a step's seed, and
    make torch pick deterministic kernels with a fixed thread count: a method that draws from a global generator
    (dropout, a shuffle, an initialisation) repeats itself."""
    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    if not trains:
        return
    import torch

    torch.manual_seed(seed)
    torch.set_num_threads(training_threads())
    torch.use_deterministic_algorithms(True, warn_only=True)


def compare(original: dict[str, Any], recipe: dict[str, Any], summary: dict[str, Any] | None,
            artifacts: list[dict[str, Any]]) -> dict[str, Any]:
    """A replay against its original (spec["replay_of"], app.jobs.replay.original_record): what differed in the
    recipe, how far the figures moved, and whether each result artifact is byte-identical."""
    before = original.get("recipe") or {}
    differed = _recipe_differences(before, recipe) if before else {}
    mine = {a["name"]: a["sha256"] for a in artifacts if a.get("kind") not in RECORD_KINDS}
    theirs = {a["name"]: a["sha256"] for a in original.get("artifacts") or []}
    compared = {name: {"original": theirs.get(name), "replay": mine.get(name),
                       "identical": theirs.get(name) == mine.get(name)}
                for name in sorted(set(mine) | set(theirs))}
    identical = bool(compared) and all(entry["identical"] for entry in compared.values())
    result: dict[str, Any] = {
        "original_job_id": original.get("job_id"),
        "same_digest": bool(before) and before.get("digest") == recipe.get("digest"),
        "differed": differed,
        "figures": _figures(original.get("summary") or {}, summary or {}),
        "artifacts": compared,
        "byte_identical": identical,
    }
    if not before:
        result["note"] = "the original recorded no recipe (it ran before recipes were recorded): only the figures " \
                         "and artifacts are compared"
    if not identical:
        result["why_not_identical"] = _why(differed, compared, before)
    return result


def _recipe_differences(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Library versions, environment fingerprint keys, method versions and inputs that are not the same."""
    differed: dict[str, Any] = {}
    libs_before, libs_after = before.get("libraries") or {}, after.get("libraries") or {}
    libs = {name: {"original": libs_before.get(name), "replay": libs_after.get(name)}
            for name in sorted(set(libs_before) | set(libs_after)) if libs_before.get(name) != libs_after.get(name)}
    if libs:
        differed["libraries"] = libs
    env_before = (before.get("environment") or {}).get("fingerprint") or {}
    env_after = (after.get("environment") or {}).get("fingerprint") or {}
    env = {key: {"original": env_before.get(key), "replay": env_after.get(key)}
           for key in sorted(set(env_before) | set(env_after)) if env_before.get(key) != env_after.get(key)}
    if env:
        differed["environment"] = env
    methods_before = [(s["method"], s.get("version")) for s in before.get("steps") or []]
    methods_after = [(s["method"], s.get("version")) for s in after.get("steps") or []]
    if methods_before != methods_after:
        differed["methods"] = {"original": [f"{m} v{v}" for m, v in methods_before],
                               "replay": [f"{m} v{v}" for m, v in methods_after]}
    for key in ("provenance", "seeds", "torch_threads"):
        first: Any
        second: Any
        if key == "provenance":
            strip = ("model", "datasets", "models", "methods")
            first = {k: _without_ids((before.get(key) or {}).get(k)) for k in strip}
            second = {k: _without_ids((after.get(key) or {}).get(k)) for k in strip}
        else:
            first, second = before.get(key), after.get(key)
        if first != second:
            differed[key] = {"original": first, "replay": second}
    return differed


def _without_ids(value: Any) -> Any:
    """Inputs by content: the same bytes under another id are the same input."""
    if isinstance(value, list):
        return [_without_ids(v) for v in value]
    if isinstance(value, dict):
        return {k: v for k, v in value.items() if k not in ("id", "name")}
    return value


def _figures(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Each figure of the two summaries: original, replay, and the change (absolute and relative)."""
    pairs: dict[str, tuple[Any, Any]] = {key: (before.get(key), after.get(key)) for key in FIGURES}
    for batch in sorted(set(before.get("speedup") or {}) | set(after.get("speedup") or {})):
        pairs[f"speedup[{batch}]"] = ((before.get("speedup") or {}).get(batch), (after.get("speedup") or {}).get(batch))
    for key in ("cosine_similarity", "worst_cosine", "top1_agreement"):
        pairs[f"fidelity.{key}"] = ((before.get("fidelity") or {}).get(key), (after.get("fidelity") or {}).get(key))
    for key in ("original_top1", "compressed_top1", "top1_drop_points"):
        pairs[f"accuracy.{key}"] = ((before.get("accuracy") or {}).get(key), (after.get("accuracy") or {}).get(key))
    figures = {}
    for name, (first, second) in pairs.items():
        if first is None and second is None:
            continue
        entry: dict[str, Any] = {"original": first, "replay": second}
        if isinstance(first, int | float) and isinstance(second, int | float):
            entry["change"] = second - first
            entry["change_pct"] = round(100.0 * (second - first) / first, 3) if first else None
        figures[name] = entry
    return figures


def _why(differed: dict[str, Any], compared: dict[str, Any], before: dict[str, Any]) -> str:
    """In words: which artifacts differ, and what in the recipe most likely made them differ."""
    names = [name for name, entry in compared.items() if not entry["identical"]]
    what = (f"{', '.join(names)} differ from the original's" if names else "the original kept no result artifacts")
    if not before:
        return f"{what}; the original recorded no recipe to tell why"
    causes = [f"{kind} ({', '.join(differed[kind])})" if isinstance(differed[kind], dict) and kind != "methods"
              else kind for kind in ("libraries", "environment", "methods", "provenance", "seeds", "torch_threads")
              if kind in differed]
    if causes:
        return f"{what}; the recipe differed in {'; '.join(causes)}, which changes how a model is built or trained"
    return (f"{what}, although the recipe, the libraries and the environment are the same: a method is not "
            "deterministic here (please report it)")
