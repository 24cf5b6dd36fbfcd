"""Jobs: create (validated, idempotent, enqueued after commit), read, list, cancel, artifacts."""
from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

from pydantic import ValidationError
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app import catalog
from app.audit import service as audit
from app.audit.service import Actor
from app.common import at_field, echo_id, get_owned_or_404, newest_first_page
from app.datasets import service as datasets_service
from app.dbmodels import TERMINAL_STATUSES, Artifact, AuditEntry, Job, JobDataset, JobEvent, JobModel, Model, Tenant
from app.errors import (
    ArtifactExpired,
    ArtifactNotFound,
    Conflict,
    IdempotencyKeyReused,
    InvalidInputShape,
    InvalidParams,
    JobNotCancellable,
    JobNotFound,
    ModelNotFound,
    ModelPressError,
    ServiceUnavailable,
    UnknownMethod,
)
from app.formats.dataset_files import check_against_model
from app.formats.input_shapes import ShapeError
from app.formats.input_shapes import check_against_model as check_shapes_against_model
from app.integrations import service as integrations
from app.jobs import replay
from app.jobs.schemas import JobCreate, StepSpec
from app.jobs.state import set_status
from app.limits import check_concurrent_jobs
from app.models import service as models_service
from app.queue import enqueue_job
from app.settings import Settings
from app.targets import service as targets
from app.targets.schemas import queue_for, target_name
from app.webhooks import service as webhooks

log = logging.getLogger(__name__)


def validate_steps(spec: JobCreate) -> list[dict]:
    """Each step's method must exist and its params must satisfy the method's schema.

    Returns the steps with defaults filled in, so the worker runs exactly what was accepted.
    """
    from app.catalog import recipes

    if spec.steps is None and spec.recipe is None:
        return []  # a target's lowering alone (JobCreate allows it only with a target other than the default)
    given = spec.steps if spec.steps is not None else [
        StepSpec.model_validate(step) for step in recipes.expand(spec.recipe or "", spec.params)]
    steps = []
    for index, step in enumerate(given):
        try:
            method = catalog.get(step.method)
        except UnknownMethod as exc:  # it carries the known ids; add the field
            raise at_field(exc, f"steps[{index}].method") from None
        try:
            params = method.params_model.model_validate(step.params)
        except ValidationError as exc:
            errors = [
                {
                    "field": f"steps[{index}].params" + "".join(
                        f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"]
                    ),
                    "message": err["msg"],
                }
                for err in exc.errors()
            ]
            first = errors[0]
            raise InvalidParams(
                f"{first['field']}: {first['message']} (method {method.id})", errors=errors, field=first["field"]
            ) from None
        steps.append({"method": method.id, "version": method.version, "params": params.model_dump(mode="json")})
    return steps


def check_input_shapes(spec: JobCreate, model: Model) -> None:
    """evaluate.input_shapes must fit the model's inputs (names, ranks, fixed sizes, dim names, positive sizes);
    422 invalid_input_shape naming the input and axis otherwise."""
    try:
        check_shapes_against_model(spec.evaluate.input_shapes, (model.inspection or {}).get("inputs") or [],
                                   spec.evaluate.input_values)
    except ShapeError as exc:
        field = "evaluate.input_values" if exc.where.get("input") in (spec.evaluate.input_values or {}) else \
            "evaluate.input_shapes"
        raise InvalidInputShape(f"{field}: {exc.message}", field=field, **exc.where) from None


def dataset_links(db: Session, tenant_id: str, model: Model, spec: JobCreate, steps: list[dict]) -> list[tuple]:
    """(role, dataset) for every dataset the job names, each checked against the model's inputs.

    Roles: "eval" for evaluate.eval_dataset_id, "steps[i].<param>" for a step's dataset params.
    Another tenant's dataset is a 404; a dataset that does not fit the model is a 422 naming the array.
    """
    named: list[tuple[str, str, str]] = []  # (role, dataset id, field)
    if spec.evaluate.eval_dataset_id:
        named.append(("eval", spec.evaluate.eval_dataset_id, "evaluate.eval_dataset_id"))
    if spec.target is not None and spec.target.calibration_dataset_id:
        named.append(("target.calibration", spec.target.calibration_dataset_id, "target.calibration_dataset_id"))
    if spec.goal is not None:
        for key in ("eval", "calibration", "train"):
            value = getattr(spec.goal.datasets, f"{key}_dataset_id")
            if value and not (key == "eval" and value == spec.evaluate.eval_dataset_id):
                named.append((f"goal.{key}", value, f"goal.datasets.{key}_dataset_id"))
    for index, step in enumerate(steps):
        for param in catalog.get(step["method"]).dataset_params:
            value = step["params"].get(param)
            if value:
                named.append((f"steps[{index}].{param}", value, f"steps[{index}].params.{param}"))
    links = []
    for role, dataset_id, field in named:
        try:
            dataset = datasets_service.get_for_job(db=db, tenant_id=tenant_id, dataset_id=dataset_id)
        except ModelPressError as exc:
            raise at_field(exc, field, prefix=True) from None
        try:
            check_against_model(dataset.inspection, model.inspection, f"{field} ({dataset.name})")
        except ModelPressError as exc:
            raise at_field(exc, field) from None
        links.append((role, dataset))
    return links


def model_links(db: Session, tenant_id: str, model: Model, steps: list[dict]) -> list[tuple[str, Model]]:
    """(role, model) for every other model the job's steps name (e.g. a distillation student).

    Another tenant's model is a 404; one that does not take the job model's inputs is a 422.
    Each is row-locked until commit, like the job's own model.
    """
    links = []
    for index, step in enumerate(steps):
        for param in catalog.get(step["method"]).model_params:
            value = step["params"].get(param)
            if not value:
                continue
            field = f"steps[{index}].params.{param}"
            try:
                other = get_owned_or_404(db, Model, tenant_id=tenant_id, object_id=value, error=ModelNotFound,
                                         lock=True)
            except ModelPressError as exc:
                raise at_field(exc, field, prefix=True) from None
            wanted = [i["name"] for i in model.inspection.get("inputs", [])]
            takes = [i["name"] for i in other.inspection.get("inputs", [])]
            if sorted(wanted) != sorted(takes):
                raise InvalidParams(
                    f"{field}: model {other.id} takes inputs {takes}, but the job's model takes {wanted}; a student "
                    "must take the same inputs as its teacher", code="student_mismatch", field=field)
            links.append((f"steps[{index}].{param}", other))
    return links


def route(*, db: Session, settings: Settings, spec: JobCreate) -> tuple[str, dict | None]:
    """(the job's queue, its target as job.spec stores it). Without a target, or with the default one (ONNX Runtime
    on the CPU), the queue is the one asked for or the server's default, as ever: such a job may wait for a worker.
    Any other target goes to its own queue, and only while a live worker serves it."""
    target = spec.target
    stored = None if target is None else target.model_dump(mode="json") | {"precision": target.effective_precision}
    if target is None or target.is_default:
        return spec.queue or settings.default_queue, stored
    queue = queue_for(*target.key())
    if spec.queue is not None and spec.queue != queue:
        raise InvalidParams(f"queue: {spec.queue!r} does not serve the target {target_name(*target.key())}, "
                            f"whose jobs go to the queue {queue!r}; leave queue out", field="queue")
    if target.runtime == "litert" and target.effective_precision == "int8" and not target.calibration_dataset_id \
            and not spec.evaluate.eval_dataset_id:
        # Full-integer int8 fixes every activation's range from real samples; random ones would mislead it.
        raise InvalidParams("full-integer int8 on the litert target needs calibration samples (a representative "
                            "dataset): give target.calibration_dataset_id, or an eval dataset "
                            "(evaluate.eval_dataset_id) whose inputs it calibrates on",
                            code="calibration_required", field="target.calibration_dataset_id")
    targets.check_served(db=db, settings=settings, target=target)
    return queue, stored


TRAINING_FAMILIES = ("prune", "distill")


def check_goal(spec: JobCreate, links: dict[str, Any]) -> dict[str, Any] | None:
    """What job.spec keeps of a goal ({"goal": ..., "evaluate": ...}), after the checks the datasets allow: a budget
    in accuracy points needs labels (422 needs_labels), families that train need a train dataset when they are the
    only ones asked for (422 dataset_required). The goal's eval dataset becomes the job's (the final measurement
    runs on it) and its batch size one of the measured ones."""
    goal = spec.goal
    if goal is None:
        return None
    eval_dataset = links.get("goal.eval") or links.get("eval")
    if goal.max_accuracy_drop is not None and (eval_dataset is None or not eval_dataset.inspection.get("has_labels")):
        raise InvalidParams(
            "goal.max_accuracy_drop is in points of top-1 accuracy, which needs an eval dataset with a 'labels' array "
            + ("(none is named: goal.datasets.eval_dataset_id)" if eval_dataset is None else
               f"({eval_dataset.name} has none)") + "; use min_cosine instead, or name a labelled dataset",
            code="needs_labels", field="goal.max_accuracy_drop")
    if goal.families and set(goal.families) <= set(TRAINING_FAMILIES) and not goal.datasets.train_dataset_id:
        raise InvalidParams(f"goal.families {goal.families} all train, which needs goal.datasets.train_dataset_id "
                            "(a labelled dataset)", code="dataset_required", field="goal.datasets.train_dataset_id")
    evaluate = spec.evaluate.model_dump(mode="json")
    if eval_dataset is not None:
        evaluate["eval_dataset_id"] = eval_dataset.id
    evaluate["batch_sizes"] = sorted(set(evaluate["batch_sizes"]) | {goal.batch_size})
    return {"goal": goal.model_dump(mode="json"), "evaluate": evaluate}


def request_hash(spec: JobCreate) -> str:
    return hashlib.sha256(json.dumps(spec.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


def create(
    *, db: Session, settings: Settings, actor: Actor, spec: JobCreate, idempotency_key: str | None,
    replay_of: dict | None = None,
) -> tuple[Job, bool]:
    """Returns (job, created). A repeated Idempotency-Key returns the first job. `replay_of`: the original job's
    record when this is its replay (app.jobs.replay), kept in the spec for the worker to compare with."""
    tenant_id = actor.tenant
    digest = request_hash(spec)
    if idempotency_key:
        existing = _by_idempotency_key(db, tenant_id, idempotency_key)
        if existing is not None:
            return _same_request_or_error(existing, digest), False
    # The tenant row stays locked until commit: two submissions cannot both take its last job slot.
    check_concurrent_jobs(db, db.get_one(Tenant, tenant_id, with_for_update=True), settings)
    # Locked until commit: a concurrent delete cannot drop the model from under the new job.
    model = get_owned_or_404(db, Model, tenant_id=tenant_id, object_id=spec.model_id, error=ModelNotFound, lock=True)
    # An upload in another format (a Hugging Face folder) runs as the ONNX model the worker converted it to.
    model = models_service.converted_for_use(db=db, model=model, lock=True)
    steps = validate_steps(spec)
    check_input_shapes(spec, model)
    links = dataset_links(db, tenant_id, model, spec, steps)
    others = model_links(db, tenant_id, model, steps)
    goal = check_goal(spec, dict(links))
    if spec.webhook_url:
        webhooks.check_target(db=db, settings=settings, tenant_id=tenant_id, url=spec.webhook_url)
    if spec.mlflow is not None:
        integrations.check_job_logging(db=db, tenant_id=tenant_id)
    queue, target = route(db=db, settings=settings, spec=spec)
    job = Job(
        tenant_id=tenant_id, model_id=model.id, name=spec.name, queue=queue,
        spec={"steps": steps, "evaluate": spec.evaluate.model_dump(mode="json")}
        | ({"recipe": {"id": spec.recipe, "params": spec.params}} if spec.recipe else {})
        | (goal or {})
        | ({"target": target} if target is not None else {})
        | ({"mlflow": spec.mlflow.model_dump(mode="json")} if spec.mlflow is not None else {})
        | {"provenance": replay.provenance(model=model, datasets=links, others=others, steps=steps)}
        | ({"replay_of": replay_of} if replay_of is not None else {}),
        status="queued", progress=0.0, stage="queued", idempotency_key=idempotency_key, request_hash=digest,
        webhook_url=spec.webhook_url,
        webhook_events=(spec.webhook_events or webhooks.DEFAULT_EVENTS) if spec.webhook_url else None,
    )
    db.add(job)
    try:
        db.flush()
    except IntegrityError:
        if not idempotency_key:
            raise
        # A concurrent request with the same Idempotency-Key won the race.
        db.rollback()
        existing = _by_idempotency_key(db, tenant_id, idempotency_key or "")
        if existing is None:
            raise
        return _same_request_or_error(existing, digest), False
    for role, dataset in links:
        db.add(JobDataset(job_id=job.id, dataset_id=dataset.id, role=role))
    for role, other in others:
        db.add(JobModel(job_id=job.id, model_id=other.id, role=role))
    set_status(db, job, "queued", message="waiting for a worker")
    audit.record(db, actor, "job.submit", object_type="job", object_id=job.id, model_id=model.id,
                 steps=[step["method"] for step in steps],
                 **({"replay_of": replay_of["job_id"]} if replay_of is not None else {}))
    db.commit()
    enqueue_or_undo(db, job)
    return job, True


def enqueue_or_undo(db: Session, job: Job) -> None:
    """Queue a committed job (after commit: the row exists before the message does); where the broker cannot take
    it, the job, its links and its audit entry are removed again and the request is a 503 broker_unavailable."""
    try:
        enqueue_job(job.id, job.queue)
    except Exception as exc:
        log.exception("could not enqueue job %s", job.id)
        db.execute(delete(JobDataset).where(JobDataset.job_id == job.id))
        db.execute(delete(JobModel).where(JobModel.job_id == job.id))
        db.execute(delete(AuditEntry).where(AuditEntry.object_type == "job", AuditEntry.object_id == job.id))
        db.delete(job)
        db.commit()
        raise ServiceUnavailable(f"the job queue is unreachable, nothing was created; retry later ({exc})",
                                 code="broker_unavailable") from exc


def _by_idempotency_key(db: Session, tenant_id: str, key: str) -> Job | None:
    return db.scalar(select(Job).where(Job.tenant_id == tenant_id, Job.idempotency_key == key))


def _same_request_or_error(job: Job, digest: str) -> Job:
    if job.request_hash != digest:
        raise IdempotencyKeyReused(
            "this Idempotency-Key was already used for a different request; use a new key for a new job",
            job_id=job.id,
        )
    return job


def get(*, db: Session, tenant_id: str, job_id: str) -> Job:
    return get_owned_or_404(db, Job, tenant_id=tenant_id, object_id=job_id, error=JobNotFound)


def list_page(
    *, db: Session, tenant_id: str, status: str | None, limit: int, cursor: str | None
) -> tuple[list[Job], str | None]:
    query = select(Job).where(Job.tenant_id == tenant_id)
    if status:
        query = query.where(Job.status == status)
    return newest_first_page(db, query, Job, limit=limit, cursor=cursor)


def cancel(*, db: Session, actor: Actor, job_id: str) -> Job:
    job = get_owned_or_404(db, Job, tenant_id=actor.tenant, object_id=job_id, error=JobNotFound, lock=True)
    if job.status in TERMINAL_STATUSES:
        raise JobNotCancellable(f"job {job.id} has already {job.status}")
    if job.status == "queued":
        job.stage = "cancelled"
        set_status(db, job, "cancelled", message="cancelled before it started")
    else:
        # A running job stops at its next step boundary; the worker marks it cancelled.
        job.cancel_requested = True
        set_status(db, job, job.status, message="cancellation requested; stopping at the next step boundary")
    audit.record(db, actor, "job.cancel", object_type="job", object_id=job.id, status=job.status)
    db.commit()
    return job


def events(*, db: Session, tenant_id: str, job_id: str, after: int = 0) -> list[JobEvent]:
    job = get(db=db, tenant_id=tenant_id, job_id=job_id)
    return list(db.scalars(select(JobEvent).where(JobEvent.job_id == job.id, JobEvent.id > after).order_by(JobEvent.id)))


def report(*, db: Session, tenant_id: str, job_id: str) -> dict:
    job = get(db=db, tenant_id=tenant_id, job_id=job_id)
    if job.report is None:
        raise Conflict(f"job {job.id} is {job.status}; its report is written when it finishes",
                       code="report_not_ready", job_status=job.status)
    return job.report


def artifacts(*, db: Session, tenant_id: str, job_id: str) -> list[Artifact]:
    job = get(db=db, tenant_id=tenant_id, job_id=job_id)
    return list(db.scalars(select(Artifact).where(Artifact.job_id == job.id).order_by(Artifact.created_at, Artifact.name)))


def artifact(*, db: Session, tenant_id: str, job_id: str, name: str) -> Artifact:
    job = get(db=db, tenant_id=tenant_id, job_id=job_id)
    if job.expired_at is not None:
        raise ArtifactExpired(f"job {job.id}'s artifacts were deleted by the retention policy on "
                              f"{job.expired_at:%Y-%m-%d}; its report and measurements remain",
                              expired_at=job.expired_at.isoformat())
    found = db.scalar(select(Artifact).where(Artifact.job_id == job.id, Artifact.name == name))
    if found is None:
        raise ArtifactNotFound(f"job {job.id} has no artifact named {echo_id(name)}")
    return found
