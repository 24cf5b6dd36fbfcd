from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Response

from app.deps import AppSettings, Caller, CallerActor, DbSession
from app.gates import service
from app.gates.schemas import GateCreate, GatePublic

router = APIRouter(prefix="/gates", tags=["gates"])


@router.post("", status_code=202, response_model=GatePublic, summary="Gate a candidate model against a baseline",
             description="Measure the candidate against the baseline on one worker (latency ratio with its interval, "
             "fidelity or accuracy, size) and turn the figures into pass or fail under the policy. The gate is a job "
             "of kind `gate`: follow it at GET /v1/gates/{id} or with the jobs routes (events, SSE, cancel).")
def create_gate(spec: GateCreate, response: Response, db: DbSession, actor: CallerActor, settings: AppSettings,
                idempotency_key: Annotated[str | None, Header(max_length=255)] = None):
    job, _created = service.create(db=db, settings=settings, actor=actor, spec=spec, idempotency_key=idempotency_key)
    response.headers["Location"] = f"/v1/gates/{job.id}"
    return service.to_public(job)


@router.get("/{gate_id}", response_model=GatePublic)
def get_gate(gate_id: str, db: DbSession, caller: Caller):
    return service.to_public(service.get(db=db, tenant_id=caller.id, gate_id=gate_id))


@router.get("/{gate_id}/report", description="The gate's report: the verdict, each check with its evidence, the "
            "latency rounds' looks and interval, fidelity, accuracy, sizes and the environment.")
def gate_report(gate_id: str, db: DbSession, caller: Caller) -> dict:
    return service.report(db=db, tenant_id=caller.id, gate_id=gate_id)
