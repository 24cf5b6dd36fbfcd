"""The job report as typed, versioned models: what workers/steps.py writes to report.json and the job row, and
what `GET /v1/jobs/{id}` (its `summary`) and `GET /v1/jobs/{id}/report` serve.

Strict where the report does not vary (the summary's figures, a step's record, a latency entry), lenient
(`extra="allow"`) where it legitimately does: a method's step details, the environment, the parts a
measurement adds per provider or per dataset. Version 2 adds `report_version` itself, `candidates` (filled by a
goal search), the `verdict` every job now ends with and the `pareto` front of its models; a stored report without
`report_version` is version 1 and loads as one. Every model serializes the fields it was given and no others, so a
stored report, old or new, serves with the same keys and values it was written with.

Plain pydantic: the API imports this, so nothing heavy (no numpy, onnxruntime, torch, nothing of workers).
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Tag, TypeAdapter, model_serializer

REPORT_VERSION = 2

Number = int | float


class _AsGiven(BaseModel):
    """Serializes the fields that were set (given in the data, or by the code that built it), never a default
    filled in on load: a report stored before a field existed serves without it, not with a null."""

    model_config = ConfigDict(extra="forbid")

    @model_serializer(mode="wrap")
    def _as_given(self, handler):
        data = handler(self)
        if not isinstance(data, dict):
            return data
        kept = self.model_fields_set | set(self.model_extra or {})
        return {key: value for key, value in data.items() if key in kept}


class Open(_AsGiven):
    """A part whose keys vary with the method, the provider or the run: the fields named are typed, the rest kept."""

    model_config = ConfigDict(extra="allow")


# --- measurement ----------------------------------------------------------------------------------

class LatencyStats(Open):
    """One model's per-call times at one batch size (workers.measure.stats.summarize)."""

    count: int
    mean_ms: Number
    stdev_ms: Number
    cv: Number
    noisy: bool
    min_ms: Number
    p50_ms: Number
    p90_ms: Number
    p95_ms: Number
    p99_ms: Number
    max_ms: Number
    throughput_per_s: Number | None


class SpeedupInterval(Open):
    speedup: Number
    low: Number | None = None
    high: Number | None = None


class LatencyAtBatch(Open):
    batch_size: int
    baseline: LatencyStats
    result: LatencyStats
    p50_ratio: Number
    speedup: Number
    speedup_ci: SpeedupInterval
    speedup_text: str | None = None
    noisy: bool = False
    input_shapes: dict[str, list[Any]] | None = None


class SkippedBatch(_AsGiven):
    batch_size: int
    reason: str


class Latency(Open):
    provider: str | None = None
    threads: int | None = None
    warmup: int
    iterations: int
    batch_sizes: list[LatencyAtBatch]
    skipped: list[SkippedBatch] = []
    samples_artifact: str | None = None


class ModelSize(Open):
    file_bytes: int
    parameters: int | None = None
    initializer_bytes: int | None = None


class Size(Open):
    baseline: ModelSize
    result: ModelSize
    ratio: Number | None


class ColdStartRole(_AsGiven):
    load_ms: Number
    first_run_ms: Number
    batch_size: int


class Energy(Open):
    value: dict[str, Number] | None
    unit: str = "J"
    reason: str | None = None


class OutputFidelity(Open):
    name: str
    top1_agreement: Number | None = None


class Fidelity(Open):
    cosine_similarity: Number | None
    max_abs_diff: Number | None
    samples: int
    runs: int
    batch_size: int
    outputs: list[OutputFidelity]


class ProviderMeasurement(Open):
    """One execution provider: measured (latency, energy, cold start), or not available and why."""

    provider: str
    available: bool
    reason: str | None = None
    primary: bool | None = None
    cold_start: dict[str, ColdStartRole | str] | None = None
    latency: Latency | None = None
    energy: Energy | None = None


class Measurement(Open):
    """The original and the result measured side by side (workers.measure.measure_pair)."""

    environment: dict[str, Any]
    inputs: list[dict[str, Any]]
    input_shapes: dict[str, list[Any]] | None = None
    input_shapes_source: dict[str, Any] | None = None
    size: Size
    latency: Latency
    # Not in reports of the first measurement releases.
    cold_start: dict[str, ColdStartRole | str] = {}
    providers: list[ProviderMeasurement] = []
    fidelity: Fidelity
    dataset: dict[str, Any] | None = None
    energy: Energy
    memory: dict[str, Any]
    notes: list[str]


# --- verdict and Pareto front (workers.verdict) --------------------------------------------------------

class Budget(BaseModel):
    """What a job is judged against: its objective and the constraints the result must hold. A steps job takes
    it from `evaluate` (objective, objective_batch_size, min_cosine, max_accuracy_drop), a goal job from `goal`.
    Serialized whole: a verdict says every limit it applied."""

    model_config = ConfigDict(extra="forbid")

    objective: Literal["latency", "size", "energy"] = "latency"
    # The batch size the latency objective (and max_latency_ms) is judged at; null: the smallest measured.
    batch_size: int | None = None
    # The worst sample's output cosine against the original; null: not checked (a goal judged on accuracy alone).
    min_cosine: Number | None = 0.99
    # Points of top-1 accuracy; applies only where the eval dataset has labels. null: not checked.
    max_accuracy_drop: Number | None = 1.0
    max_latency_ms: Number | None = None
    max_size_bytes: int | None = None
    # The latency objective's least gain: the speedup interval's lower bound must reach it. null: above 1.00.
    min_speedup: Number | None = None

    @classmethod
    def from_evaluate(cls, evaluate: dict[str, Any]) -> Budget:
        """A steps job's budget: its evaluate spec (a job stored before budgets existed gets the defaults)."""
        sizes = evaluate.get("batch_sizes") or [1]
        given = {"objective": evaluate.get("objective"), "batch_size": evaluate.get("objective_batch_size"),
                 "min_cosine": evaluate.get("min_cosine"), "max_accuracy_drop": evaluate.get("max_accuracy_drop")}
        return cls(**{"batch_size": min(sizes)} | {k: v for k, v in given.items() if v is not None})

    @classmethod
    def from_goal(cls, goal: dict[str, Any], batch_sizes: list[int] | None = None) -> Budget:
        """A goal job's budget: its goal's fields of the same names, taken as given (a null min_cosine or
        max_accuracy_drop is not checked); batch_size, when absent, is the smallest of batch_sizes."""
        names = ("objective", "batch_size", "min_cosine", "max_accuracy_drop", "max_latency_ms", "max_size_bytes",
                 "min_speedup")
        given = {name: goal[name] for name in names if name in goal}
        if given.get("batch_size") is None:
            given["batch_size"] = min(batch_sizes or [1])
        return cls(**given)


CheckName = Literal["objective", "min_cosine", "max_accuracy_drop", "max_latency_ms", "max_size_bytes"]


class VerdictCheck(_AsGiven):
    """One thing the verdict checked: the objective or a constraint, its figure, its limit and a sentence."""

    name: CheckName
    value: Number | None
    limit: Number | None
    passed: bool
    text: str


class Verdict(_AsGiven):
    verdict: Literal["beneficial", "not_beneficial"]
    # One sentence naming the figures: every failed check, or (beneficial) every check.
    reason: str
    # The fields below are absent in verdicts written before they existed.
    objective: Literal["latency", "size", "energy"] | None = None
    checks: list[VerdictCheck] = []
    # What the objective measured: latency {"speedup", "low", "high", "batch_size"}; size {"size_ratio",
    # "original_bytes", "compressed_bytes"}; energy {"energy_ratio", "original_j", "compressed_j"}.
    improvement: dict[str, Number | None] | None = None
    budget: Budget | None = None


class ParetoPoint(_AsGiven):
    """One model of a job (the original, a step's, a candidate) on the front over latency, size, fidelity and
    energy, or the names of the models that dominate it."""

    name: str
    p50_ms: Number | None
    size_bytes: int | None
    worst_cosine: Number | None
    energy_j: Number | None = None
    on_front: bool
    dominated_by: list[str] = []


# --- steps and summary ----------------------------------------------------------------------------

class StepArtifact(Open):
    name: str
    kind: str
    sha256: str
    size_bytes: int


class StepRecord(_AsGiven):
    index: int
    method: str
    version: str | int
    params: dict[str, Any]
    duration_s: Number
    # What the method says about its run: its own keys (warnings, per-layer choices, ...).
    details: dict[str, Any]
    artifact: StepArtifact


class IntervalBounds(_AsGiven):
    """A speedup's 95% bootstrap interval as numbers (null with the reason where there is none: one round)."""

    low: Number | None
    high: Number | None
    reason: str | None = None


class P50Pair(_AsGiven):
    original: Number | None
    compressed: Number | None


class SummaryFidelity(_AsGiven):
    cosine_similarity: Number | None
    max_abs_diff: Number | None
    top1_agreement: Number | None
    worst_cosine: Number | None = None
    # Float outputs that have no cosine, each with why (one value per sample, fewer than 2 samples seen): the figures
    # above are the other outputs', and a min_cosine budget is not shown to hold.
    not_compared: list[str] | None = None


class SummaryAccuracy(_AsGiven):
    samples: int
    original_top1: Number | None
    compressed_top1: Number | None
    top1_drop_points: Number | None
    original_top5: Number | None
    compressed_top5: Number | None


class ColdStartSummary(_AsGiven):
    load: Number
    first_run: Number


class TrajectoryEntry(_AsGiven):
    """One step's model against the original, in the summary's terms."""

    step: int
    method: str
    artifact: str
    size_bytes: int | None
    size_ratio: Number | None
    latency_p50_ms: dict[str, Number | None]
    speedup: dict[str, Number] | None
    top1: Number | None
    top1_drop_points: Number | None
    cosine: Number | None
    # Not in reports written before verdicts: the worst sample's cosine and the energy per inference (where a
    # counter was read), the Pareto front's other dimensions.
    worst_cosine: Number | None = None
    energy_j: Number | None = None


class JobSummary(_AsGiven):
    """A compression job's headline figures (the job row's `summary`; batch sizes as string keys)."""

    original_size_bytes: int | None = None
    compressed_size_bytes: int | None = None
    size_ratio: Number | None = None
    latency_p50_ms: dict[str, P50Pair] = {}
    latency_p50_ratio: dict[str, Number] = {}
    speedup: dict[str, Number] = {}
    # "1.83x (1.79-1.88)": the ratio of medians and its 95% bootstrap interval over the paired rounds.
    speedup_ci: dict[str, str] = {}
    # The same intervals as numbers, per batch size (the verdict reads them).
    speedup_interval: dict[str, IntervalBounds] = {}
    noisy_batch_sizes: list[int] = []
    provider: str | None = None
    # Per provider: speedup text per batch size, or {"unavailable": reason}.
    providers: dict[str, dict[str, str]] = {}
    cold_start_ms: dict[str, ColdStartSummary] = {}
    energy_j_per_inference: dict[str, Number] | None = None
    energy_note: str | None = None
    fidelity: SummaryFidelity | None = None
    fidelity_on: str | None = None
    accuracy: SummaryAccuracy | None = None
    accuracy_note: str | None = None
    skipped_batch_sizes: list[SkippedBatch] = []
    notes: list[str] = []
    steps: list[str] = []
    input_shapes: dict[str, list[Any]] | None = None
    input_shapes_source: dict[str, Any] | None = None
    trajectory: list[TrajectoryEntry] | None = None
    # A target runtime (app.targets.schemas): {runtime, device, precision}; speedup is then the total gain (the
    # result on the target against the original on ONNX Runtime fp32), split into the runtime's gain (the original
    # on the target at f32) and the compression's (the result against that), each per batch size with its interval.
    target: dict[str, Any] | None = None
    runtime_speedup: dict[str, Number] | None = None
    runtime_speedup_ci: dict[str, str] | None = None
    compression_speedup: dict[str, Number] | None = None
    compression_speedup_ci: dict[str, str] | None = None
    # beneficial or not, and why (workers.verdict.judge); absent in summaries written before verdicts.
    verdict: Verdict | None = None


class ConversionSummary(_AsGiven):
    """A conversion job's summary (jobs.kind = "convert": an upload exported to ONNX)."""

    converted_format: str
    converted_size_bytes: int
    task: str | None = None
    exporter: str | None = None
    check: dict[str, Any] | str | None = None
    duration_s: Number


def _summary_kind(value: Any) -> str:
    if isinstance(value, dict):
        return "convert" if "converted_format" in value else "compress"
    return "convert" if isinstance(value, ConversionSummary) else "compress"


AnySummary = Annotated[
    Annotated[JobSummary, Tag("compress")] | Annotated[ConversionSummary, Tag("convert")],
    Discriminator(_summary_kind),
]


# --- placeholders a goal search fills (the next issue) ------------------------------------------------

class Candidate(Open):
    """One measured model of a search: how it was made and what it measured."""

    name: str
    steps: list[str] = []
    measurement: Measurement | None = None
    summary: JobSummary | None = None


# --- per-node sensitivity (workers.search.sensitivity) -------------------------------------------------

class SensitivityFigures(_AsGiven):
    """The model's outputs with one node quantized, against the float model's: worst sample and mean cosine."""

    worst_cosine: Number
    mean_cosine: Number


class SensitivityRow(Open):
    """One node: its output error when it alone is int8 (and fp16), and its share of profiled run time, in the
    float model and in the quantized candidate; "unmapped" where no profiled kernel could be traced to it, null
    where that model was not profiled."""

    node: str
    op_type: str
    int8: SensitivityFigures | None
    fp16: SensitivityFigures | None = None
    float_time_share: Number | Literal["unmapped"] | None = None
    quantized_time_share: Number | Literal["unmapped"] | None = None


class SensitivitySkip(_AsGiven):
    node: str
    op_type: str
    reason: str


class SensitivityReport(Open):
    """Nodes ranked by int8 output error (worst cosine ascending), what they were judged on, what was left out."""

    rows: list[SensitivityRow]
    samples: int
    source: str
    calibration: str
    seconds: Number
    threads: int
    quantized_model: str | None = None
    skipped: list[SensitivitySkip] = []
    unmapped_time_share: dict[str, Number] = {}
    unmapped_nodes: dict[str, list[str]] = {}
    notes: list[str] = []


# --- reports --------------------------------------------------------------------------------------

class ReportArtifact(Open):
    name: str
    kind: str


class JobReport(_AsGiven):
    """report.json of a compression job."""

    # Absent in reports written before versioning: those are version 1.
    report_version: int = 1
    job_id: str
    sandbox: dict[str, Any] = {}
    intake: dict[str, Any] | None = None
    steps: list[StepRecord]
    evaluate: dict[str, Any]
    measurement: Measurement
    summary: JobSummary
    candidates: list[Candidate] | None = None
    verdict: Verdict | None = None
    # Per-node sensitivity of the original (workers.search.sensitivity); absent in reports written before it.
    sensitivity: SensitivityReport | None = None
    # The original and each step's (or candidate's) model: which are on the Pareto front (workers.verdict).
    pareto: list[ParetoPoint] | None = None
    artifacts: list[ReportArtifact] = []
    # The job's MLflow run (the job's `mlflow` option, workers.mlflow_log): logged (run id, registered model version)
    # or failed (its code and message; the job itself still succeeded). Absent for a job that did not ask for it.
    mlflow: dict[str, Any] | None = None
    # The target runtime the result was lowered to: its spec, the lowering's record (precision, NNCF, accuracy
    # control) and the artifacts it wrote.
    target: dict[str, Any] | None = None
    # A goal search (workers.search.run): the goal, the time spent, the candidates by status, the one chosen (or
    # the closest when none met the goal) and the artifact handed over.
    search: dict[str, Any] | None = None
    # The content-addressed recipe (workers.replay; also the recipe.json artifact): the sha256 of the model and of
    # each dataset, method versions, params, seeds, library versions and the environment fingerprint. Absent in
    # reports written before it.
    recipe: dict[str, Any] | None = None
    # A replay's comparison with its original (POST /v1/jobs/{id}/replay): what differed, how far the figures moved,
    # which artifacts are byte-identical.
    replay: dict[str, Any] | None = None


class ConversionReport(_AsGiven):
    """report.json of a conversion job: what was exported, and the stored ONNX model's inspection."""

    report_version: int = 1
    job_id: str
    kind: Literal["convert"]
    sandbox: dict[str, Any] = {}
    conversion: dict[str, Any]
    converted: dict[str, Any]
    summary: ConversionSummary
    artifacts: list[ReportArtifact] = []


def _report_kind(value: Any) -> str:
    if isinstance(value, dict):
        return "convert" if value.get("kind") == "convert" else "compress"
    return "convert" if isinstance(value, ConversionReport) else "compress"


AnyReport = Annotated[
    Annotated[JobReport, Tag("compress")] | Annotated[ConversionReport, Tag("convert")],
    Discriminator(_report_kind),
]

_REPORTS: TypeAdapter[JobReport | ConversionReport] = TypeAdapter(AnyReport)


def load_report(stored: dict[str, Any]) -> JobReport | ConversionReport:
    """A stored report (any version) as its model; one without report_version loads as version 1."""
    return _REPORTS.validate_python(stored)
