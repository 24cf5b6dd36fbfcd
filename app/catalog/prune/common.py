"""What the methods of workers/prune/ share in their params (the implementation: workers/prune/common.py)."""
from __future__ import annotations

from typing import Annotated

from pydantic import Field, StringConstraints

from app.catalog.base import MethodParams

DatasetId = Annotated[str, StringConstraints(min_length=1, max_length=200)]

LayerName = Annotated[str, StringConstraints(min_length=1, max_length=500)]

class FineTuneParams(MethodParams):
    """Fine-tuning after pruning; it runs when train_dataset_id is set."""

    train_dataset_id: DatasetId | None = Field(
        None,
        description="Dataset to fine-tune the pruned model on: arrays named after the model's inputs, first axis = "
        "samples. With a `labels` array the loss is cross-entropy on the first output; without labels the pruned "
        "model learns to reproduce the unpruned model's outputs (distillation). Without a training dataset the "
        "model is pruned one-shot and not fine-tuned, which usually costs accuracy.",
    )
    eval_dataset_id: DatasetId | None = Field(
        None,
        description="Held-out dataset for early stopping and for choosing the best epoch (top-1 accuracy with "
        "labels, cosine to the unpruned model without). Defaults to the training data.",
    )
    epochs: int = Field(10, ge=1, le=1000, description="Fine-tuning epochs (at most; early stopping may end sooner).")
    lr: float = Field(1e-3, gt=0, le=1.0, description="Peak learning rate of AdamW, decayed on a cosine schedule.")
    batch_size: int = Field(64, ge=1, le=65_536, description="Samples per fine-tuning step.")
    weight_decay: float = Field(0.01, ge=0, le=1.0, description="AdamW weight decay.")
    patience: int | None = Field(
        3, ge=1, le=1000,
        description="Stop when the eval metric has not improved for this many epochs; null runs every epoch. "
        "The best epoch's weights are kept either way.",
    )
