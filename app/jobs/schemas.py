from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from app.integrations.schemas import MlflowLog
from app.reports import AnySummary
from app.targets.schemas import TargetSpec

Provider = Literal["CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"]
WebhookEvent = Literal["queued", "running", "succeeded", "failed", "cancelled", "progress"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StepSpec(Strict):
    method: str = Field(description="A method id from GET /v1/methods, e.g. quantize.int8_dynamic")
    params: dict[str, Any] = Field(default_factory=dict, description="The method's params (its JSON Schema)")


class EvaluateSpec(Strict):
    batch_sizes: list[int] = Field(default=[1], min_length=1, max_length=8)
    warmup: int = Field(default=10, ge=0, le=10_000)
    iterations: int = Field(default=100, ge=1, le=100_000)
    providers: list[Provider] = Field(default=["CPUExecutionProvider"], min_length=1, max_length=3)
    eval_dataset_id: str | None = Field(
        default=None,
        description="A dataset (POST /v1/datasets) to evaluate the original and the result on: top-1/top-5 "
        "accuracy when it has labels, fidelity on its inputs always. Checked against the model when the job is "
        "submitted.",
    )
    eval_max_samples: int | None = Field(
        default=None, ge=1, le=1_000_000, description="Evaluate on at most this many samples (the first ones)."
    )
    include_io: bool = Field(
        default=False,
        description="On a GPU provider, count the copies of inputs and outputs between host and device in each "
        "timed call. Off: inputs are bound on the device once (I/O binding) and each call ends with a device "
        "synchronisation. CPU calls always include everything.",
    )
    energy_estimate: bool = Field(
        default=False,
        description="Where no energy counter (RAPL, NVML) is readable, add an estimate from `tdp_watts`, labelled "
        "as an estimate with its formula. Off: energy is null with the reason.",
    )
    tdp_watts: float | None = Field(
        default=None, gt=0, le=5000, description="Thermal design power of the measuring CPU, for energy_estimate."
    )
    input_shapes: dict[str, list[int | None] | dict[str, int]] | None = Field(
        default=None,
        description="Sizes of the model's dynamic dims for latency, memory, fidelity and random calibration: "
        'input name -> one size per axis (e.g. {"x": [1, 3, 48, 320]}), and/or "dims": symbolic dim name -> size '
        '(e.g. {"dims": {"H": 48}}). A symbolic axis 0 is the batch axis and follows batch_sizes (give any value '
        "or null there). What is not given comes from the job's datasets' samples, else is guessed; the report "
        "says which. Checked against the model at submit (422 invalid_input_shape).",
        examples=[{"x": [1, 3, 48, 320]}, {"dims": {"H": 48, "W": 320}}],
        max_length=256,
    )
    input_values: dict[str, Any] | None = Field(
        default=None,
        description="Fixed values for inputs that are not data (a sample rate, a flag, a mode): input name -> a "
        'number, a boolean or nested lists (e.g. {"sr": 16000}); fed as given, cast to the input\'s type, to both '
        "models in every measurement, calibration and check, instead of generated values. The value's shape counts "
        "as given (a value for one sample, [[1]] for [N, 1], serves every batch size). Checked against the model "
        "at submit (422 invalid_input_shape).",
        examples=[{"sr": 16000}],
        max_length=64,
    )
    # The budget the job's verdict judges the result against (workers.verdict).
    objective: Literal["latency", "size"] = Field(
        default="latency", description="What the result must improve to be judged beneficial: `latency` (the "
        "speedup's 95% interval above 1.00 at objective_batch_size) or `size` (a smaller file).")
    objective_batch_size: int | None = Field(
        default=None, description="The batch size the latency objective is judged at; one of batch_sizes. "
        "Default: the smallest of batch_sizes.")
    min_cosine: float = Field(
        default=0.99, ge=0, le=1, description="The worst sample's output cosine against the original (on the eval "
        "dataset, else on random inputs) must be at least this for a beneficial verdict.")
    max_accuracy_drop: float = Field(
        default=1.0, ge=0, le=100, description="Top-1 accuracy may drop by at most this many points for a beneficial "
        "verdict (only where the eval dataset has labels).")

    @field_validator("batch_sizes")
    @classmethod
    def _batch_sizes(cls, value: list[int]) -> list[int]:
        for size in value:
            if not 1 <= size <= 1024:
                raise ValueError(f"batch size {size} is outside 1..1024")
        return sorted(set(value))

    @model_validator(mode="after")
    def _estimate_needs_tdp(self) -> EvaluateSpec:
        if self.energy_estimate and self.tdp_watts is None:
            raise ValueError("energy_estimate needs tdp_watts: the thermal design power of the measuring CPU "
                             "(it cannot be read from the host)")
        if self.tdp_watts is not None and not self.energy_estimate:
            raise ValueError("tdp_watts is used only with energy_estimate: true")
        if self.objective_batch_size is not None and self.objective_batch_size not in self.batch_sizes:
            raise ValueError(f"objective_batch_size {self.objective_batch_size} is not one of batch_sizes "
                             f"{self.batch_sizes}: the objective is judged on a measured batch size")
        return self


Family = Literal["quantize", "mixed_precision", "prune", "distill", "cluster", "targets"]
FAMILIES: tuple[str, ...] = ("quantize", "mixed_precision", "prune", "distill", "cluster", "targets")


class GoalDatasets(Strict):
    eval_dataset_id: str | None = Field(
        default=None, description="Samples every candidate is judged on (accuracy with labels, fidelity always). "
        "Default: evaluate.eval_dataset_id; with neither, random inputs at the job's input shapes (the report says so).")
    calibration_dataset_id: str | None = Field(
        default=None, description="Samples the int8 candidates calibrate on. Default: the eval dataset's inputs.")
    train_dataset_id: str | None = Field(
        default=None, description="Labelled samples for the candidates that train (channel pruning with "
        "fine-tuning, distillation); without it those families are skipped, and the report says so.")


class GoalSpec(Strict):
    """What a user needs instead of the steps to get there: the search tries the allowed families and every
    target this deployment's worker serves, measures each candidate, and hands over the best one that meets the
    budget, or none, with the evidence."""

    objective: Literal["latency", "size", "energy"] = Field(
        default="latency", description="What to improve: p50 latency at batch_size, file size, or energy per "
        "inference (only where a RAPL or NVML counter is readable).")
    batch_size: int = Field(default=1, ge=1, le=1024, description="The batch size the latency objective is at.")
    min_cosine: float | None = Field(
        default=0.99, gt=0, le=1, description="The worst sample's output cosine against the original (on the eval "
        "dataset, else on random inputs) must be at least this. null: judged by max_accuracy_drop alone.")
    max_accuracy_drop: float | None = Field(
        default=None, ge=0, le=100, description="Top-1 accuracy may drop by at most this many points on the "
        "labelled eval dataset (needs labels).")
    max_latency_ms: float | None = Field(default=None, gt=0, description="p50 at batch_size must be at most this.")
    max_size_bytes: int | None = Field(default=None, gt=0, description="The result's files must be at most this.")
    min_speedup: float | None = Field(
        default=None, ge=1.0, le=1000, description="The latency objective's least gain worth having: the speedup "
        "interval's lower bound at batch_size must reach it (1.3: at least 1.3x faster, else nothing is handed over). "
        "null: any gain whose lower bound is above 1.00.")
    time_budget_s: int = Field(default=900, ge=30, le=24 * 3600,
                               description="The search stops starting candidates once this is spent.")
    families: list[Family] | None = Field(
        default=None, min_length=1, description="The method families the search may use (default: all that "
        f"apply): {', '.join(FAMILIES)}. `targets`: every runtime the worker serves (OpenVINO f32, bf16, int8).")
    datasets: GoalDatasets = Field(default_factory=GoalDatasets)

    @model_validator(mode="after")
    def _a_budget(self) -> GoalSpec:
        if self.min_cosine is None and self.max_accuracy_drop is None:
            raise ValueError("a goal needs a fidelity budget: min_cosine, max_accuracy_drop or both (without one, "
                             "any broken model would meet it)")
        if self.min_speedup is not None and self.objective != "latency":
            raise ValueError(f"min_speedup applies to the latency objective, not to {self.objective!r}: drop it or "
                             "set objective to latency")
        if self.families is not None:
            self.families = list(dict.fromkeys(self.families))
        return self


class JobCreate(Strict):
    model_id: str
    steps: list[StepSpec] | None = Field(
        default=None, min_length=1, max_length=16,
        description="The steps, in order; each takes the previous step's model. Give steps or a recipe (or, with a "
        "target other than ONNX Runtime on the CPU, neither: the target's lowering and precision are the compression).")
    recipe: str | None = Field(default=None, description="A recipe id from GET /v1/recipes, instead of steps.")
    params: dict[str, Any] = Field(default_factory=dict, description="The recipe's params (its JSON Schema).")
    evaluate: EvaluateSpec = Field(default_factory=EvaluateSpec)
    name: str | None = Field(default=None, max_length=255)
    queue: Literal["cpu", "gpu"] | None = Field(default=None, description="Worker queue; the server's default if absent")
    goal: GoalSpec | None = Field(
        default=None, description="What you need instead of steps: the search finds the best model that meets it, "
        "or the evidence that none does. A job with only model_id runs the default goal (fastest at batch 1 within "
        "cosine 0.99).")
    target: TargetSpec | None = Field(
        default=None,
        description="The runtime and device the result is built for and measured on (GET /v1/targets lists what the "
        "workers serve). Default: ONNX Runtime on the CPU, as without a target. Another target is accepted only while "
        "a live worker serves it (422 no_worker_for_target otherwise).")
    webhook_url: str | None = Field(
        default=None, max_length=2048,
        description="An http(s) URL that receives a signed POST of the job JSON on each event in webhook_events "
        "(POST /v1/webhook-secret first). Hosts on loopback or private addresses are refused.")
    webhook_events: list[WebhookEvent] | None = Field(
        default=None, min_length=1, max_length=6,
        description="The events that trigger the webhook; default: succeeded, failed, cancelled. `progress` is "
        "sent at most every 10 s.")
    mlflow: MlflowLog | None = Field(
        default=None,
        description="When the job succeeds, log a run to the tenant's MLflow server (PUT /v1/integrations/mlflow "
        "first): params, metrics, the report, and the compressed model with the ONNX flavour, registered as a new "
        "version of `register_as` when given. The outcome is the report's `mlflow` section; a logging failure "
        "leaves the job succeeded (its model stays downloadable) with the failure's code there and in its message.")

    @field_validator("webhook_url")
    @classmethod
    def _webhook_url(cls, value: str | None) -> str | None:
        from app.common import check_http_url

        if value is not None:
            check_http_url(value, credentials="; receivers authenticate the ModelPress-Signature header")
        return value

    @field_validator("webhook_events")
    @classmethod
    def _webhook_events(cls, value: list[str] | None) -> list[str] | None:
        return list(dict.fromkeys(value)) if value is not None else None

    @model_validator(mode="after")
    def _steps_or_recipe(self) -> JobCreate:
        if self.steps is not None and self.recipe is not None:
            raise ValueError("give either steps or a recipe")
        if self.goal is not None and (self.steps is not None or self.recipe is not None or self.target is not None):
            raise ValueError("a goal replaces steps, a recipe and a target: the search chooses them (and tries every "
                             "target the workers serve)")
        if self.steps is None and self.recipe is None and self.goal is None:
            if self.target is not None and self.target.runtime == "onnxruntime":
                raise ValueError(f"give steps or a recipe with the onnxruntime {self.target.device} target (only "
                                 "another runtime may go without: its lowering is the compression), or leave the "
                                 "target out for the default goal")
            if self.target is None:
                # Only a model: the default goal (fastest at batch 1 within cosine 0.99).
                self.goal = GoalSpec()
        if self.params and self.recipe is None:
            raise ValueError("params belong to a recipe; a step's params go inside the step")
        if self.webhook_events is not None and self.webhook_url is None:
            raise ValueError("webhook_events needs a webhook_url")
        return self


class JobError(BaseModel):
    code: str
    message: str


class JobPublic(BaseModel):
    id: str
    name: str | None
    model_id: str | None
    status: str
    progress: float
    stage: str | None
    message: str | None
    steps: list[dict[str, Any]]
    recipe: dict[str, Any] | None = None
    evaluate: dict[str, Any]
    # "compress", or "convert": an upload in another format exported to ONNX (queued at upload)
    kind: str = "compress"
    queue: str
    attempts: int
    created_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    # Set when the retention policy deleted the job's artifacts (downloads answer 410 artifact_expired).
    expired_at: dt.datetime | None = None
    error: JobError | None
    # Typed (app.reports); a stored summary the models do not describe is served as it was stored.
    summary: AnySummary | dict[str, Any] | None = Field(union_mode="left_to_right")
    # The target the job was submitted with (its precision filled in); null: ONNX Runtime on the CPU.
    target: TargetSpec | dict[str, Any] | None = Field(default=None, union_mode="left_to_right")
    # The goal a search job was submitted with (defaults filled in); null for a steps job.
    goal: dict[str, Any] | None = None
    webhook_url: str | None = None
    webhook_events: list[str] | None = None
    # The job this one replays (POST /v1/jobs/{id}/replay); null for a job submitted as such.
    replay_of: str | None = None


class JobPage(BaseModel):
    items: list[JobPublic]
    next_cursor: str | None


class JobEventPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: int
    created_at: dt.datetime
    kind: str
    status: str
    progress: float
    stage: str | None
    message: str | None


class JobEventStreamed(JobEventPublic):
    """One server-sent event: the event plus the job's status and progress when it was sent."""

    job_status: str
    job_progress: float


class ArtifactPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    name: str
    kind: str
    size_bytes: int
    sha256: str
    content_type: str
    created_at: dt.datetime
