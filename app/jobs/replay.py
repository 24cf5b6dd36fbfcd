"""Replayable jobs: the content-addressed inputs a job records at submit, and its replay (POST /v1/jobs/{id}/replay).

A job's recipe (`report.recipe`, and the job's `recipe.json` artifact; not the catalog recipe a job may be
submitted with) has two halves. The API records the first when the job is created, in `job.spec["provenance"]`:
the sha256 of the model and of every dataset and other model it names, and each step's method, version and
params as validated. The worker adds the second when it starts the job (workers.replay): seeds, library versions
and the environment fingerprint.

A replay is a new job with the same model, datasets, steps (or goal, or target) and evaluation, linked to its
original by `spec["replay_of"]`, which also carries what the worker compares the replay's result with: the
original's recipe, summary and artifact sha256s. The worker writes that comparison into the replay's report.
"""
from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.audit.service import Actor
from app.dbmodels import Artifact, Dataset, Job, Model
from app.errors import DatasetNotFound, JobNotReplayable, ModelNotFound, ReplayInputDeleted
from app.jobs.schemas import JobCreate
from app.settings import Settings

PROVENANCE_VERSION = 1
# Artifacts that are a run's record rather than its result: never byte-identical from one run to the next.
RECORD_KINDS = ("report", "samples", "recipe", "candidate-record")


def provenance(*, model: Model, datasets: list[tuple[str, Dataset]], others: list[tuple[str, Model]],
               steps: list[dict]) -> dict[str, Any]:
    """What a job is made of, by content: the model's and each dataset's sha256 (by role), the steps' methods with
    their versions and params as validated. Recorded at submit, so it names the bytes the job was given even after
    an input is deleted."""
    return {
        "version": PROVENANCE_VERSION,
        "model": {"id": model.id, "sha256": model.sha256, "format": model.format},
        "datasets": [{"role": role, "id": d.id, "sha256": d.sha256, "name": d.name} for role, d in datasets],
        "models": [{"role": role, "id": m.id, "sha256": m.sha256} for role, m in others],
        "methods": [{"method": s["method"], "version": s["version"], "params": s["params"]} for s in steps],
    }


def replay_request(job: Job) -> JobCreate:
    """The original job's request as the API stored it: the validated steps (a catalog recipe's expanded steps),
    the goal, the target and the evaluation, on the same model. The webhook is not carried over."""
    spec = job.spec
    goal, target = spec.get("goal"), spec.get("target")
    steps = [{"method": s["method"], "params": s["params"]} for s in spec.get("steps") or []]
    default_target = target is None or (target.get("runtime"), target.get("device")) == ("onnxruntime", "cpu")
    name = f"replay of {job.name or job.id}"[:255]
    return JobCreate.model_validate({
        "model_id": job.model_id, "evaluate": spec.get("evaluate") or {}, "name": name,
        **({"goal": goal} if goal else {"steps": steps} if steps else {}),
        **({"target": target} if target is not None else {}),
        # A non-default target's queue follows from the target; asking for it again would be refused if it moved.
        **({"queue": job.queue} if default_target and job.queue in ("cpu", "gpu") else {}),
    })


def original_record(db: Session, job: Job) -> dict[str, Any]:
    """What the replay's worker compares its result with: the original's recipe, summary and result artifacts."""
    artifacts = db.execute(select(Artifact.name, Artifact.kind, Artifact.sha256).where(
        Artifact.job_id == job.id, Artifact.kind.not_in(RECORD_KINDS)).order_by(Artifact.name)).all()
    return {
        "job_id": job.id,
        "recipe": (job.report or {}).get("recipe"),
        "summary": job.summary,
        "artifacts": [{"name": name, "kind": kind, "sha256": sha} for name, kind, sha in artifacts],
    }


def replay(*, db: Session, settings: Settings, actor: Actor, job_id: str,
           idempotency_key: str | None = None) -> tuple[Job, bool]:
    """A new job with the original's recipe, linked to it; returns (job, created) as jobs.service.create does.

    Another tenant's job is a 404. A job that did not succeed, or a conversion, is 409 job_not_replayable; one
    whose model (or another model it names) was deleted is 409 replay_model_deleted, one whose dataset was
    deleted 409 replay_dataset_deleted. None of them creates anything.
    """
    from app.jobs import service

    original = service.get(db=db, tenant_id=actor.tenant, job_id=job_id)
    if (original.kind or "compress") != "compress":
        raise JobNotReplayable(f"job {original.id} is a conversion, which runs when a model is uploaded; upload the "
                               "model again to convert it again", job_status=original.status)
    if original.status != "succeeded":
        raise JobNotReplayable(f"job {original.id} is {original.status}; only a job that succeeded has a result to "
                               "reproduce and compare with (submit it again instead)", job_status=original.status)
    recorded = (original.spec.get("provenance") or {}).get("model") or {}
    if original.model_id is None:
        raise ReplayInputDeleted(
            f"job {original.id}'s model was deleted, so the job cannot be replayed; nothing was created (upload the "
            "model again and submit a new job" + (f": its sha256 was {recorded['sha256']})" if recorded.get("sha256")
                                                  else ")"),
            sha256=recorded.get("sha256"))
    try:
        request = replay_request(original)
    except ValidationError as exc:  # a request this version of the API no longer accepts as it was stored
        raise JobNotReplayable(f"job {original.id}'s request is no longer valid, so it cannot be replayed as it was "
                               f"({exc.errors()[0]['msg']}); submit it again", job_status=original.status) from None
    try:
        return service.create(db=db, settings=settings, actor=actor, spec=request,
                              idempotency_key=idempotency_key, replay_of=original_record(db, original))
    except (DatasetNotFound, ModelNotFound) as exc:
        # A dataset (or a distillation student) the original named is gone: the replay cannot use the same bytes.
        db.rollback()
        code = "replay_dataset_deleted" if isinstance(exc, DatasetNotFound) else "replay_model_deleted"
        raise ReplayInputDeleted(f"job {original.id} cannot be replayed: an input it used was deleted since "
                                 f"({exc.message}); nothing was created", code=code, **exc.extra) from None
