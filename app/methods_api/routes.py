from __future__ import annotations

from fastapi import APIRouter

from app import catalog
from app.catalog import recipes
from app.deps import Caller

router = APIRouter(prefix="/methods", tags=["methods"])


@router.get("", summary="Registered compression methods and the JSON Schema of their params")
def list_methods(caller: Caller) -> list[dict]:
    return catalog.catalog()


recipes_router = APIRouter(prefix="/recipes", tags=["methods"])


@recipes_router.get("", summary="Named chains of steps (POST /v1/jobs with recipe and params) and their params' schemas")
def list_recipes(caller: Caller) -> list[dict]:
    return recipes.catalog()
