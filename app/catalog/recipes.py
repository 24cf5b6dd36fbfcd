"""Named recipes: the common chains of steps, with the params a user sets once.

    POST /v1/jobs {"model_id": "...", "recipe": "prune-finetune-int8", "params": {"train_dataset_id": "..."}}

A recipe expands into ordinary steps before the job is validated, so a recipe job is
exactly the job its steps would make (the stored spec shows the steps). Like the method
registry, this module imports nothing heavy: the API lists and expands recipes.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from app.errors import InvalidParams

DatasetId = Annotated[str, StringConstraints(min_length=1, max_length=200)]


class RecipeParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    train_dataset_id: DatasetId = Field(
        description="Training data for fine-tuning or distillation (arrays named after the model's inputs, "
        "optional `labels`).")
    eval_dataset_id: DatasetId | None = Field(
        None, description="Held-out data for early stopping and choosing the best epoch.")
    calibration_dataset_id: DatasetId | None = Field(
        None, description="Calibration data for static int8; defaults to the training data.")
    epochs: int = Field(10, ge=1, le=1000)
    lr: float = Field(1e-3, gt=0, le=1.0)
    batch_size: int = Field(64, ge=1, le=65_536)

    def training(self) -> dict[str, Any]:
        return {"train_dataset_id": self.train_dataset_id, "eval_dataset_id": self.eval_dataset_id,
                "epochs": self.epochs, "lr": self.lr, "batch_size": self.batch_size}

    def int8_static(self) -> dict[str, Any]:
        return {"method": "quantize.int8_static",
                "params": {"calibration_dataset_id": self.calibration_dataset_id or self.train_dataset_id}}


class PruneFinetuneInt8Params(RecipeParams):
    ratio: float = Field(0.5, gt=0, lt=1, description="Fraction of channels removed from every prunable layer.")
    importance: Literal["l1", "l2", "taylor", "bn_scale"] = Field("l2", description="As prune.channels' importance.")


class DistillInt8Params(RecipeParams):
    epochs: int = Field(20, ge=1, le=1000)
    width_ratio: float = Field(0.5, gt=0, lt=1, description="Fraction of the channels removed from every prunable "
                               "layer of the teacher to make the student (distill.kd's width_ratio).")
    temperature: float = Field(4.0, gt=0, le=100)
    alpha: float = Field(0.5, ge=0, le=1)


class DeepCompressionParams(RecipeParams):
    sparsity: float = Field(0.8, gt=0, lt=1, description="Fraction of weights pruned to zero (magnitude, gradual).")
    clusters: int = Field(16, ge=2, le=256, description="Shared values per layer after k-means clustering.")


@dataclass(frozen=True)
class Recipe:
    id: str
    description: str
    params_model: type[RecipeParams]
    expand: Callable[[Any], list[dict[str, Any]]]


def _prune_finetune_int8(p: PruneFinetuneInt8Params) -> list[dict[str, Any]]:
    return [{"method": "prune.channels", "params": {"ratio": p.ratio, "importance": p.importance, **p.training()}},
            p.int8_static()]


def _distill_int8(p: DistillInt8Params) -> list[dict[str, Any]]:
    return [{"method": "distill.kd", "params": {"student": "width", "width_ratio": p.width_ratio,
                                                "temperature": p.temperature, "alpha": p.alpha, **p.training()}},
            p.int8_static()]


def _deep_compression(p: DeepCompressionParams) -> list[dict[str, Any]]:
    return [{"method": "prune.magnitude", "params": {"sparsity": p.sparsity, "schedule": "gradual", **p.training()}},
            {"method": "cluster.kmeans", "params": {"clusters": p.clusters, "pack": "zstd"}}]


RECIPES: dict[str, Recipe] = {r.id: r for r in (
    Recipe("prune-finetune-int8", "Structured channel pruning with fine-tuning on your data, then static int8 "
           "quantization calibrated on it: smaller and faster on any runtime.",
           PruneFinetuneInt8Params, _prune_finetune_int8),
    Recipe("distill-int8", "A student of reduced width derived from your model, trained by knowledge distillation "
           "on your data, then static int8 quantization.", DistillInt8Params, _distill_int8),
    Recipe("deep-compression", "Han et al.'s Deep Compression: gradual magnitude pruning with fine-tuning, k-means "
           "weight sharing per layer, and a zstd-packed artifact (the smallest file to store or ship).",
           DeepCompressionParams, _deep_compression),
)}


def catalog() -> list[dict[str, Any]]:
    return [{"id": r.id, "description": r.description, "params_schema": r.params_model.model_json_schema(),
             "steps": [s["method"] for s in r.expand(r.params_model.model_construct(
                 train_dataset_id="<train_dataset_id>"))]}
            for r in RECIPES.values()]


def expand(recipe_id: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    """The recipe's steps for these params; an unknown recipe or bad params is a 422 naming the field."""
    from pydantic import ValidationError

    recipe = RECIPES.get(recipe_id)
    if recipe is None:
        raise InvalidParams(f"unknown recipe {recipe_id!r}; known recipes: {', '.join(RECIPES)}",
                            code="unknown_recipe", field="recipe")
    try:
        validated = recipe.params_model.model_validate(params)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = "params" + "".join(f".{p}" if isinstance(p, str) else f"[{p}]" for p in first["loc"])
        raise InvalidParams(f"{field}: {first['msg']} (recipe {recipe_id})", field=field) from None
    return recipe.expand(validated)
