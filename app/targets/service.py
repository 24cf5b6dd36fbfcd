"""Targets: what the deployment's live workers serve (GET /v1/targets), and the check a job's target passes at
submit. The workers register themselves (workers.registry); a worker is live while its row is younger than
`worker_stale_s`."""
from __future__ import annotations

import datetime as dt
import json
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.dbmodels import Worker, utcnow
from app.errors import NoWorkerForTarget
from app.settings import Settings
from app.targets.schemas import TargetDevice, TargetPublic, TargetSpec, TargetsPublic, WorkerPublic, queue_for, target_name

DEFAULT_TARGET = ("onnxruntime", "cpu", None)


def live_workers(*, db: Session, settings: Settings, now: dt.datetime | None = None) -> list[Worker]:
    cutoff = (now or utcnow()) - dt.timedelta(seconds=settings.worker_stale_s)
    return list(db.scalars(select(Worker).where(Worker.last_seen_at >= cutoff).order_by(Worker.id)))


def _devices(target: dict[str, Any], capabilities: dict[str, Any]) -> list[TargetDevice]:
    """The devices a worker runs `target` on, from its probe (workers.targets.probe)."""
    if target.get("device") in ("cuda", "gpu"):
        return [TargetDevice(name=str(gpu.get("name")), memory_bytes=gpu.get("memory_bytes"))
                for gpu in capabilities.get("gpus") or []]
    cpu = capabilities.get("cpu") or {}
    runtime = (capabilities.get("runtimes") or {}).get(target.get("runtime") or "") or {}
    name = ((runtime.get("devices") or {}).get("CPU") or {}).get("name") or cpu.get("name") or "CPU"
    return [TargetDevice(name=str(name), isa=list(cpu.get("isa") or []))]


def _versions(target: dict[str, Any], capabilities: dict[str, Any]) -> dict[str, str]:
    runtimes = capabilities.get("runtimes") or {}
    names = [target.get("runtime") or ""] + (["nncf"] if target.get("runtime") == "openvino" and
                                             str(target.get("precision")).startswith("int8") else [])
    found = {name: str(runtimes[name]["version"]) for name in names if (runtimes.get(name) or {}).get("version")}
    if target.get("runtime") == "litert" and (runtimes.get("litert") or {}).get("onnx2tf"):
        found["onnx2tf"] = str(runtimes["litert"]["onnx2tf"])  # what exports to it
    return found


def summarize(workers: list[Worker]) -> list[TargetPublic]:
    """One entry per target the workers serve (and the default target always), default first."""
    found: dict[tuple, dict[str, Any]] = {
        DEFAULT_TARGET: {"workers": 0, "devices": {}, "versions": {}}}
    for worker in workers:
        for target in worker.targets or []:
            key = (target.get("runtime"), target.get("device"), target.get("precision"))
            entry = found.setdefault(key, {"workers": 0, "devices": {}, "versions": {}})
            entry["workers"] += 1
            for device in _devices(target, worker.capabilities or {}):
                entry["devices"].setdefault(json.dumps(device.model_dump(), sort_keys=True), device)
            for name, version in _versions(target, worker.capabilities or {}).items():
                entry["versions"].setdefault(name, {})[version] = None
    ordered = sorted(found, key=lambda key: (key != DEFAULT_TARGET, *(part or "" for part in key)))
    return [TargetPublic(runtime=key[0], device=key[1], precision=key[2], queue=queue_for(*key),
                         default=key == DEFAULT_TARGET, workers=found[key]["workers"],
                         devices=list(found[key]["devices"].values()),
                         versions={name: ", ".join(seen) for name, seen in found[key]["versions"].items()})
            for key in ordered]


def listing(*, db: Session, settings: Settings) -> TargetsPublic:
    """GET /v1/targets: one query."""
    workers = live_workers(db=db, settings=settings)
    return TargetsPublic(targets=summarize(workers), workers=[WorkerPublic.model_validate(w) for w in workers])


def check_served(*, db: Session, settings: Settings, target: TargetSpec) -> None:
    """A job for `target` is accepted only while a live worker serves exactly that runtime, device and precision;
    otherwise 422 no_worker_for_target, listing the targets live workers do serve."""
    targets = summarize(live_workers(db=db, settings=settings))
    wanted = target.key()
    if any((t.runtime, t.device, t.precision) == wanted and t.workers for t in targets):
        return
    served = [t for t in targets if t.workers]
    names = ", ".join(target_name(t.runtime, t.device, t.precision) for t in served) or "none"
    raise NoWorkerForTarget(
        f"no running worker serves the target {target_name(*wanted)}; the live workers serve: {names} "
        "(GET /v1/targets). Start a worker that can serve it (MODELPRESS_WORKER_TARGETS), or pick one of those.",
        field="target", target=target_name(*wanted),
        targets=[t.model_dump(include={"runtime", "device", "precision", "queue", "workers"}) for t in served])
