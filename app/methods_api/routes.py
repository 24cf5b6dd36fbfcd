from __future__ import annotations

from fastapi import APIRouter

from app.deps import Caller
from workers import methods

router = APIRouter(prefix="/methods", tags=["methods"])


@router.get("", summary="Registered compression methods and the JSON Schema of their params")
def list_methods(caller: Caller) -> list[dict]:
    return methods.catalog()
