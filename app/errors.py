"""Domain errors. Each carries its HTTP status and a stable machine-readable code.

Services and workers raise these; one exception handler (app.main) turns them
into RFC 9457 problem+json. Workers store `code` and `message` on a failed job.
"""
from __future__ import annotations

from typing import Any


class ModelPressError(Exception):
    status: int = 400
    code: str = "bad_request"
    title: str = "Bad request"

    def __init__(self, message: str, *, code: str | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.extra = extra

    def problem(self, instance: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "type": f"https://modelpress.dev/problems/{self.code}",
            "title": self.title,
            "status": self.status,
            "code": self.code,
            "detail": self.message,
            "message": self.message,
        }
        if instance:
            body["instance"] = instance
        body.update(self.extra)
        return body


class Unauthorized(ModelPressError):
    status, code, title = 401, "unauthorized", "Missing or invalid API key"


class Forbidden(ModelPressError):
    status, code, title = 403, "forbidden", "Forbidden"


class InsufficientScope(Forbidden):
    """The key is valid but lacks the scope (read, write, admin) the route needs."""

    code, title = "insufficient_scope", "Insufficient scope"


class NotFound(ModelPressError):
    status, code, title = 404, "not_found", "Not found"


class ApiKeyNotFound(NotFound):
    code = "api_key_not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class JobNotFound(NotFound):
    code = "job_not_found"


class ArtifactNotFound(NotFound):
    code = "artifact_not_found"


class ArtifactExpired(ModelPressError):
    """The job's artifacts were deleted by the retention policy; the job row and its report stay."""

    status, code, title = 410, "artifact_expired", "Artifact expired"


class RangeNotSatisfiable(ModelPressError):
    status, code, title = 416, "range_not_satisfiable", "Range not satisfiable"


class DatasetNotFound(NotFound):
    code = "dataset_not_found"


class Conflict(ModelPressError):
    status, code, title = 409, "conflict", "Conflict"


class ModelInUse(Conflict):
    code = "model_in_use"


class JobNotCancellable(Conflict):
    code = "job_not_cancellable"


class DatasetInUse(Conflict):
    code = "dataset_in_use"


class Unprocessable(ModelPressError):
    status, code, title = 422, "unprocessable", "Unprocessable request"


class InvalidModel(Unprocessable):
    """Not an ONNX model, a corrupt protobuf, or a model that fails the checker."""

    code, title = "invalid_model", "Invalid model"


class UnsafeArchive(Unprocessable):
    """A zip upload that tries to escape its folder, links out, or inflates too far."""

    code, title = "unsafe_archive", "Unsafe archive"


class InvalidDataset(Unprocessable):
    """Not an .npz or safetensors file of numeric arrays, or arrays that break the dataset rules."""

    code, title = "invalid_dataset", "Invalid dataset"


class DatasetMismatch(Unprocessable):
    """A dataset whose arrays do not fit the inputs of the model it is used with."""

    code, title = "dataset_mismatch", "Dataset does not match the model"


class RemoteCodeRefused(Unprocessable):
    """A model folder that would need its own Python code to load (`auto_map` in config.json, *.py files)."""

    code, title = "remote_code_refused", "Remote code refused"


class PickleRefused(Unprocessable):
    """A model folder holding pickled weights or state (`pytorch_model.bin`, *.pt, training_args.bin, ...)."""

    code, title = "pickle_refused", "Pickled files refused"


class UnsafeLayerRefused(Unprocessable):
    """A Keras model with a Lambda layer or another serialized Python function (Keras safe_mode refuses it)."""

    code, title = "unsafe_layer_refused", "Layer with Python code refused"


class CustomObjectRefused(Unprocessable):
    """A Keras model using a class or function that is not a Keras built-in: loading it needs the user's code."""

    code, title = "custom_object_refused", "Custom Keras object refused"


class UnsupportedArchitecture(Unprocessable):
    """A Hugging Face folder whose `model_type` ModelPress does not convert; `supported` lists those it does."""

    code, title = "unsupported_architecture", "Unsupported architecture"


class JobNotReplayable(Conflict):
    """A replay of a job that has no result to reproduce: one still queued or running, failed, cancelled, or a
    conversion (which runs at upload)."""

    code = "job_not_replayable"


class ReplayInputDeleted(Conflict):
    """A replay of a job whose model (or a dataset or other model it names) was deleted since: the recipe names its
    sha256, but the bytes are gone, so nothing is created."""

    code = "replay_model_deleted"


class ConversionPending(Conflict):
    """A job or dataset names a model whose conversion to ONNX has not finished yet."""

    code = "conversion_pending"


class ConversionFailed(Unprocessable):
    """A job or dataset names a model whose conversion to ONNX failed; the message carries the reason."""

    code, title = "conversion_failed", "Conversion failed"


class TokenizerMissing(Unprocessable):
    """A texts dataset for a model that has no tokenizer."""

    code, title = "tokenizer_missing", "The model has no tokenizer"


class InvalidParams(Unprocessable):
    code, title = "invalid_params", "Invalid job specification"


class UnknownMethod(Unprocessable):
    code, title = "unknown_method", "Unknown method"


class IdempotencyKeyReused(Unprocessable):
    code, title = "idempotency_key_reused", "Idempotency key reused with another request"


class InvalidInputShape(Unprocessable):
    """evaluate.input_shapes that break its rules or contradict the model's inputs (names the input and axis)."""

    code, title = "invalid_input_shape", "Invalid input shape"


class NoWorkerForTarget(Unprocessable):
    """A job's target (runtime, device, precision) that no live registered worker serves; `targets` lists those
    that live workers do serve (GET /v1/targets)."""

    code, title = "no_worker_for_target", "No worker serves this target"


class WebhookSecretMissing(Unprocessable):
    code, title = "webhook_secret_missing", "No webhook signing secret"


class WebhookUrlForbidden(Unprocessable):
    """A webhook target on a loopback, private, link-local, multicast, reserved or unspecified address (SSRF)."""

    code, title = "webhook_url_forbidden", "Webhook URL not allowed"


class WebhookUrlUnresolvable(Unprocessable):
    code, title = "webhook_url_unresolvable", "Webhook host does not resolve"


class GatePolicyEmpty(Unprocessable):
    """A gate whose policy sets no limit: nothing could make it fail, so it would pass whatever it measured."""

    code, title = "empty_policy", "The gate's policy sets no limit"


class GateInputsMismatch(Unprocessable):
    """A gate's candidate and baseline that do not take the same inputs (names, dtypes, fixed dims)."""

    code, title = "inputs_mismatch", "The candidate and the baseline take different inputs"


class NoModelHandedOver(Unprocessable):
    """A gate baseline named by a job that handed over no ONNX model (model.onnx): a goal job whose verdict was
    not beneficial, a conversion, or a result built for another runtime."""

    code, title = "no_model_handed_over", "The job handed over no model"


class BaselineJobNotSucceeded(Conflict):
    """A gate baseline named by a job that is still queued or running, or that failed or was cancelled."""

    code = "baseline_job_not_succeeded"


class PayloadTooLarge(ModelPressError):
    status, code, title = 413, "payload_too_large", "Payload too large"


class TooManyRequests(ModelPressError):
    """429; `retry_after_s` in the problem becomes the Retry-After header."""

    status, code, title = 429, "rate_limited", "Too many requests"


class QuotaExceeded(TooManyRequests):
    """The tenant has as many queued and running jobs as it may."""

    code, title = "quota_exceeded", "Quota exceeded"


class StorageQuotaExceeded(TooManyRequests):
    """The upload would take the tenant's models and datasets past its stored-bytes quota."""

    code, title = "storage_quota_exceeded", "Storage quota exceeded"


class UnsupportedMediaType(ModelPressError):
    status, code, title = 415, "unsupported_media_type", "Unsupported media type"


class ServiceUnavailable(ModelPressError):
    status, code, title = 503, "service_unavailable", "Service unavailable"


class SecretKeyMissing(ServiceUnavailable):
    """A credential to store or read, on a production server without MODELPRESS_SECRET_KEY to encrypt it with."""

    code, title = "secret_key_missing", "No secret key configured"


# --- MLflow (app.integrations): the tenant's tracking server, both ways ---------------------------------------

class MlflowNotConfigured(Unprocessable):
    """A job that logs to MLflow, or a model pulled from MLflow, for a tenant without MLflow settings."""

    code, title = "mlflow_not_configured", "No MLflow settings"


class MlflowUriForbidden(Unprocessable):
    """A tracking URI on a loopback, private, link-local or otherwise non-public address (SSRF), or not http(s)."""

    code, title = "mlflow_uri_forbidden", "MLflow tracking URI not allowed"


class MlflowUriUnresolvable(Unprocessable):
    """A tracking URI whose host does not resolve when the settings are saved."""

    code, title = "mlflow_uri_unresolvable", "MLflow host does not resolve"


class InvalidMlflowUri(Unprocessable):
    """A model URI that is not models:/<name>/<version>, models:/<name>@<alias> or runs:/<run_id>/<path>."""

    code, title = "invalid_mlflow_uri", "Invalid MLflow model URI"


class MlflowCredentialsUnreadable(Unprocessable):
    """Stored MLflow credentials that this server's secret key cannot decrypt (the key was changed)."""

    code, title = "mlflow_credentials_unreadable", "MLflow credentials unreadable"


class MlflowUnauthorized(Unprocessable):
    """The tracking server refused the tenant's credentials (HTTP 401 or 403)."""

    code, title = "mlflow_unauthorized", "MLflow refused the credentials"


class MlflowModelNotFound(NotFound):
    code = "mlflow_model_not_found"


class MlflowNotOnnx(Unprocessable):
    """An MLflow model without the ONNX flavour (its MLmodel file's `flavors` has no `onnx`)."""

    code, title = "mlflow_not_onnx", "Not an ONNX model"


class MlflowArtifactsNotProxied(Unprocessable):
    """A model or run whose artifacts the tracking server does not serve itself (file:, s3:, ...): ModelPress reads
    and writes artifacts only through the server (`mlflow server --serve-artifacts`), never with its own access."""

    code, title = "mlflow_artifacts_not_proxied", "MLflow artifacts not served by the tracking server"


class MlflowError(ModelPressError):
    """The tracking server answered with an error ModelPress has no more specific code for."""

    status, code, title = 502, "mlflow_error", "MLflow server error"


class MlflowUnreachable(MlflowError):
    """The tracking server did not answer: refused, timed out, or its host does not resolve."""

    code, title = "mlflow_unreachable", "MLflow server unreachable"


class JobFailed(ModelPressError):
    """Raised inside a worker: the job fails with this code and message."""

    status, code, title = 500, "job_failed", "Job failed"


class StepFailed(JobFailed):
    code = "step_failed"


class MeasurementFailed(JobFailed):
    code = "measurement_failed"


class InputShapeRequired(JobFailed):
    """The model does not run at the sizes guessed for its dynamic dims; the user must give them."""

    code = "input_shape_required"
