"""Gates: create (every input checked before anything is queued), read. A gate is a job of kind "gate": it is
queued, run, followed (GET /v1/jobs/{id}, its events, SSE, webhooks) and cancelled like any job; the worker's
side is workers/gate.py."""
from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.audit import service as audit
from app.audit.service import Actor
from app.common import at_field, get_owned_or_404
from app.datasets import service as datasets_service
from app.dbmodels import Artifact, Job, JobDataset, JobModel, Model, Tenant
from app.errors import (
    ArtifactExpired,
    BaselineJobNotSucceeded,
    GateInputsMismatch,
    GatePolicyEmpty,
    InvalidParams,
    JobNotFound,
    ModelNotFound,
    ModelPressError,
    NoModelHandedOver,
)
from app.formats.dataset_files import check_against_model
from app.gates.schemas import GateCreate, GatePublic
from app.jobs import service as jobs_service
from app.jobs.schemas import JobError
from app.jobs.state import set_status
from app.limits import check_concurrent_jobs
from app.models import service as models_service
from app.settings import Settings

KIND = "gate"
# The artifact a job hands over as its ONNX result (workers/steps.py; a goal search's chosen candidate).
HANDED_OVER = "model.onnx"


def create(*, db: Session, settings: Settings, actor: Actor, spec: GateCreate,
           idempotency_key: str | None) -> tuple[Job, bool]:
    """Returns (the gate's job, created). A repeated Idempotency-Key returns the first gate."""
    tenant_id = actor.tenant
    digest = jobs_service.request_hash(spec)  # type: ignore[arg-type]  # any pydantic model hashes alike
    if idempotency_key:
        existing = jobs_service._by_idempotency_key(db, tenant_id, idempotency_key)
        if existing is not None:
            return jobs_service._same_request_or_error(existing, digest), False
    policy = spec.policy.limits() if spec.policy is not None else {}
    if not policy:
        raise GatePolicyEmpty("policy: set at least one limit (max_slowdown_pct, min_cosine, max_accuracy_drop, "
                              "max_size_bytes, max_size_growth_pct); a gate without one passes whatever it measures",
                              field="policy")
    check_concurrent_jobs(db, db.get_one(Tenant, tenant_id, with_for_update=True), settings)
    try:
        candidate = get_owned_or_404(db, Model, tenant_id=tenant_id, object_id=spec.candidate_model_id,
                                     error=ModelNotFound, lock=True)
        candidate = models_service.converted_for_use(db=db, model=candidate, lock=True)
    except ModelPressError as exc:
        raise at_field(exc, "candidate_model_id", prefix=True) from None
    baseline, baseline_inputs = _baseline(db, tenant_id, spec)
    if baseline_inputs is not None:
        _check_inputs(candidate.inspection.get("inputs") or [], baseline_inputs)
    dataset = _eval_dataset(db, tenant_id, spec, candidate, baseline_inputs)
    if "max_accuracy_drop" in policy and (dataset is None or not dataset.inspection.get("has_labels")):
        raise InvalidParams(
            "policy.max_accuracy_drop is in points of top-1 accuracy, which needs an eval dataset with a 'labels' "
            "array " + ("(eval_dataset_id names none)" if dataset is None else f"({dataset.name} has none)"),
            code="needs_labels", field="policy.max_accuracy_drop")
    gate = {"candidate_model_id": candidate.id, "baseline": baseline, "policy": policy,
            "eval_dataset_id": dataset.id if dataset else None, "eval_max_samples": spec.eval_max_samples,
            "batch_size": spec.batch_size, "time_budget_s": spec.time_budget_s}
    job_spec: dict[str, Any] = {"steps": [], "gate": gate, "evaluate": {"batch_sizes": [spec.batch_size]}}
    if "job_id" in baseline:
        job_spec["blob_inputs"] = [{"id": baseline["input_id"], "sha256": baseline["sha256"], "format": "onnx"}]
    job = Job(tenant_id=tenant_id, model_id=candidate.id, kind=KIND, name=spec.name, queue=settings.default_queue,
              spec=job_spec, status="queued", progress=0.0, stage="queued", idempotency_key=idempotency_key,
              request_hash=digest)
    db.add(job)
    try:
        db.flush()
    except IntegrityError:
        if not idempotency_key:
            raise
        db.rollback()  # a concurrent request with the same Idempotency-Key won the race
        existing = jobs_service._by_idempotency_key(db, tenant_id, idempotency_key)
        if existing is None:
            raise
        return jobs_service._same_request_or_error(existing, digest), False
    if "model_id" in baseline:
        db.add(JobModel(job_id=job.id, model_id=baseline["model_id"], role="gate.baseline"))
    if dataset is not None:
        db.add(JobDataset(job_id=job.id, dataset_id=dataset.id, role="eval"))
    set_status(db, job, "queued", message="waiting for a worker")
    audit.record(db, actor, "gate.submit", object_type="job", object_id=job.id, model_id=candidate.id,
                 baseline={k: v for k, v in baseline.items() if k in ("model_id", "job_id")})
    db.commit()
    jobs_service.enqueue_or_undo(db, job)
    return job, True


def _baseline(db: Session, tenant_id: str, spec: GateCreate) -> tuple[dict[str, Any], list | None]:
    """(what job.spec keeps of the baseline, the baseline's inputs as an inspection lists them, None when unknown).

    A model: the caller's (another tenant's is a 404 like a missing one), row-locked until commit. A job: the
    caller's, succeeded, its artifacts not expired, and holding the model.onnx it handed over."""
    ref = spec.baseline
    if ref.model_id is not None:
        try:
            model = get_owned_or_404(db, Model, tenant_id=tenant_id, object_id=ref.model_id, error=ModelNotFound,
                                     lock=True)
            model = models_service.converted_for_use(db=db, model=model, lock=True)
        except ModelPressError as exc:
            raise at_field(exc, "baseline.model_id", prefix=True) from None
        return {"model_id": model.id, "input_id": model.id, "sha256": model.sha256}, model.inspection.get("inputs")
    try:
        job = get_owned_or_404(db, Job, tenant_id=tenant_id, object_id=ref.job_id or "", error=JobNotFound)
    except ModelPressError as exc:
        raise at_field(exc, "baseline.job_id", prefix=True) from None
    if job.status != "succeeded":
        raise BaselineJobNotSucceeded(f"baseline.job_id: job {job.id} is {job.status}; only a succeeded job's model "
                                      "can be a baseline", field="baseline.job_id", job_status=job.status)
    if job.expired_at is not None:
        raise ArtifactExpired(f"baseline.job_id: job {job.id}'s artifacts were deleted by the retention policy on "
                              f"{job.expired_at:%Y-%m-%d}; upload its model and name it as baseline.model_id",
                              field="baseline.job_id", expired_at=job.expired_at.isoformat())
    artifact = db.scalar(select(Artifact).where(Artifact.job_id == job.id, Artifact.name == HANDED_OVER))
    if artifact is None:
        raise NoModelHandedOver(
            f"baseline.job_id: job {job.id} ({job.kind}) handed over no ONNX model ({HANDED_OVER}): a goal job "
            "whose verdict was not beneficial, a conversion, a gate or a result built for another runtime; name a "
            "model instead (baseline.model_id)", field="baseline.job_id")
    source = db.get(Model, job.model_id) if job.model_id else None
    inputs = source.inspection.get("inputs") if source is not None else None
    return {"job_id": job.id, "input_id": f"job:{job.id}", "sha256": artifact.sha256}, inputs


def _check_inputs(candidate: list[dict], baseline: list[dict]) -> None:
    """Both models must take the same inputs: names, dtypes, ranks, and the dims both fix."""
    theirs = {i["name"]: i for i in baseline}
    ours = {i["name"]: i for i in candidate}
    if set(theirs) != set(ours):
        raise GateInputsMismatch(f"the candidate takes inputs {sorted(ours)} and the baseline {sorted(theirs)}; a "
                                 "gate compares two models on the same inputs", field="baseline")
    for name, mine in ours.items():
        other = theirs[name]
        if mine.get("dtype") != other.get("dtype"):
            raise GateInputsMismatch(f"input {name!r} is {mine.get('dtype')} in the candidate and "
                                     f"{other.get('dtype')} in the baseline", field="baseline", input=name)
        a, b = mine.get("shape"), other.get("shape")
        if a is None or b is None:
            continue
        if len(a) != len(b) or any(isinstance(x, int) and isinstance(y, int) and x != y for x, y in zip(a[1:], b[1:])):
            raise GateInputsMismatch(f"input {name!r} has shape {a} in the candidate and {b} in the baseline",
                                     field="baseline", input=name)


def _eval_dataset(db: Session, tenant_id: str, spec: GateCreate, candidate: Model, baseline_inputs: list | None):
    if not spec.eval_dataset_id:
        return None
    field = "eval_dataset_id"
    try:
        dataset = datasets_service.get_for_job(db=db, tenant_id=tenant_id, dataset_id=spec.eval_dataset_id)
    except ModelPressError as exc:
        raise at_field(exc, field, prefix=True) from None
    try:
        check_against_model(dataset.inspection, candidate.inspection, f"{field} ({dataset.name})")
        if baseline_inputs is not None:
            check_against_model(dataset.inspection, {"inputs": baseline_inputs}, f"{field} ({dataset.name})")
    except ModelPressError as exc:
        raise at_field(exc, field) from None
    return dataset


def get(*, db: Session, tenant_id: str, gate_id: str) -> Job:
    """The caller's gate; any other job, another tenant's, or none is a 404."""
    job = db.get(Job, gate_id)
    if job is None or job.tenant_id != tenant_id or job.kind != KIND:
        raise JobNotFound(f"no gate with id {gate_id[:64]!r}", code="gate_not_found")
    return job


def to_public(job: Job) -> GatePublic:
    gate = job.spec.get("gate") or {}
    summary = job.summary or {}
    return GatePublic(
        id=job.id, name=job.name, status=job.status, progress=round(job.progress, 4), stage=job.stage,
        message=job.message, candidate_model_id=job.model_id,
        baseline={k: v for k, v in (gate.get("baseline") or {}).items() if k in ("model_id", "job_id")},
        policy=gate.get("policy") or {}, batch_size=gate.get("batch_size", 1),
        time_budget_s=gate.get("time_budget_s", 0), eval_dataset_id=gate.get("eval_dataset_id"),
        verdict=summary.get("gate"), reason=(summary.get("verdict") or {}).get("reason"),
        checks=summary.get("checks") or [],
        error=JobError(code=job.error_code, message=job.error_message or "") if job.error_code else None,
        created_at=job.created_at, started_at=job.started_at, finished_at=job.finished_at)


def report(*, db: Session, tenant_id: str, gate_id: str) -> dict:
    """The gate's report as stored; 409 report_not_ready until its job has finished."""
    job = get(db=db, tenant_id=tenant_id, gate_id=gate_id)
    return jobs_service.report(db=db, tenant_id=tenant_id, job_id=job.id)
