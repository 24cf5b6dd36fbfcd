"""One Settings object for the API, the workers, the CLI and Alembic (prefix MODELPRESS_)."""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.formats.limits import Limits


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MODELPRESS_", extra="ignore")

    mode: Literal["local", "production"] = "local"
    # Everything of the embedded default lives under this folder.
    data_dir: Path = Path(".modelpress")
    # Empty: SQLite file in data_dir. Production: postgresql+psycopg://...
    database_url: str = ""
    # PostgreSQL connections each process keeps (and may add under load): the API's request threads share them.
    db_pool_size: int = Field(default=10, ge=1)
    db_max_overflow: int = Field(default=20, ge=0)
    # Empty: kombu filesystem transport in data_dir. Production: redis://...
    broker_url: str = ""
    # Queue a job goes to unless it asks for another; queue names get this prefix
    # (tests use a unique prefix to share one Redis without flushing it).
    default_queue: Literal["cpu", "gpu"] = "cpu"
    queue_prefix: str = ""
    # Upload caps.
    max_upload_bytes: int = Field(default=4 * 1024**3, ge=1)
    max_unpacked_bytes: int = Field(default=8 * 1024**3, ge=1)
    # Seconds a Redis message may stay unacknowledged before redelivery: longer than the longest job.
    visibility_timeout_s: int = 6 * 3600
    # ONNX Runtime intra-op threads for measurements (0: physical cores).
    measure_threads: int = 0
    # Each measurement runs in a fresh process pinned to cores (workers.measure.isolated); off only to debug.
    measure_isolated: bool = True
    measure_timeout_s: int = Field(default=4 * 3600, ge=1)
    # Artifact store: empty = local directory (data_dir/store); s3://bucket/prefix = S3-compatible (boto3;
    # credentials and region from the standard AWS_* variables). Either way tmp/ and the workers' download
    # cache stay under data_dir/store.
    artifacts: str = Field(default="", pattern=r"^(s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?)?$")
    s3_endpoint_url: str = ""  # MinIO, Ceph, moto...; empty: AWS
    s3_multipart_chunksize: int = Field(default=64 * 1024**2, ge=5 * 1024**2)  # S3's minimum part is 5 MiB
    # /metrics (Prometheus): off, or only with `Authorization: Bearer <metrics_token>` when a token is set.
    metrics_enabled: bool = True
    metrics_token: str = ""
    # The job duration histogram covers jobs that finished within this window (read from the database).
    metrics_duration_window_s: int = Field(default=24 * 3600, ge=60)
    # Retention: artifacts of jobs finished more than this many days ago are deleted (0: kept forever);
    # Celery beat checks every retention_interval_s.
    retention_days: int = Field(default=0, ge=0)
    retention_interval_s: int = Field(default=3600, ge=10)
    # Webhooks: an admin may allow targets on loopback/private/link-local addresses (off: refused, against SSRF).
    webhook_allow_private: bool = False
    # Webhook egress lists, comma-separated host names (`hooks.example.com`, `*.example.com`) or networks
    # (`203.0.113.0/24`): a denied target is always refused; with an allowlist, only allowed targets are reached.
    webhook_allowed_hosts: str = ""
    webhook_denied_hosts: str = ""
    # A failing webhook delivery is retried with exponential backoff for at most this long after its first attempt.
    webhook_retry_window_s: int = Field(default=3600, ge=0)
    # Credentials a tenant stores (MLflow's) are encrypted with this Fernet key (urlsafe base64 of 32 bytes; a
    # comma-separated list decrypts with each and encrypts with the first, to rotate). Empty: in local mode a key
    # generated into data_dir/secret.key; in production, storing a credential is refused until it is set.
    secret_key: SecretStr = SecretStr("")
    # MLflow tracking servers, like webhooks, may only be on public addresses; an admin may allow private ones.
    mlflow_allow_private: bool = False
    # Server-wide defaults for each tenant's limits (a tenant's own value, when set, wins; 0: unlimited).
    # Requests per minute per API key (token bucket; shared through Redis when the broker is Redis).
    rate_limit_per_minute: int = Field(default=0, ge=0)
    # Queued + running jobs per tenant, and bytes of models + datasets stored per tenant.
    max_concurrent_jobs: int = Field(default=100, ge=0)
    max_stored_bytes: int = Field(default=1024**4, ge=0)
    # Retry-After (seconds) of a 429 quota_exceeded at job submission.
    quota_retry_after_s: int = Field(default=30, ge=1)
    # Each job runs in a child process of the worker with these limits (issue 9): memory (RLIMIT_DATA: the
    # heap and anonymous mappings; 0: 80% of the host's memory, -1: none), CPU seconds per process (0: none),
    # wall-clock seconds for the whole job, and its network ("none": a fresh network namespace where the OS
    # allows it, so a hostile model reaches nothing; "host": the worker's own).
    job_memory_limit_bytes: int = Field(default=0, ge=-1)
    # Off only to debug (or for tests that register methods in their own process): no limits then.
    job_isolated: bool = True
    job_cpu_time_limit_s: int = Field(default=24 * 3600, ge=0)
    job_timeout_s: int = Field(default=5 * 3600, ge=1)
    job_network: Literal["none", "host"] = "none"
    # CPU priority of a job's process (nice, 0-19): on a machine the API shares, polls stay fast while jobs
    # run. Latency figures are ratios of interleaved rounds, so a lower priority costs them noise, not bias.
    job_nice: int = Field(default=10, ge=0, le=19)
    # Recovery: a running job's worker writes a heartbeat this often; a job whose heartbeat is older than the
    # timeout is requeued by the reaper (Celery beat, every reaper_interval_s) up to job_max_attempts
    # attempts in all, then failed with worker_lost. Queued jobs without a message in the broker (Redis
    # restarted or flushed) are enqueued again once they have waited requeue_grace_s.
    heartbeat_interval_s: float = Field(default=10.0, gt=0)
    heartbeat_timeout_s: float = Field(default=120.0, gt=0)
    job_max_attempts: int = Field(default=3, ge=1)
    reaper_interval_s: float = Field(default=30.0, ge=1)
    requeue_grace_s: float = Field(default=30.0, ge=0)
    # Worker registry (issue 18): the targets a worker serves, of those its hardware and runtimes make servable:
    # "auto" (all), or comma-separated prefixes of runtime.device.precision (`onnxruntime`, `openvino.cpu`,
    # `openvino.cpu.f32`). A worker refreshes its row every worker_heartbeat_s; one not seen for worker_stale_s
    # counts as gone (GET /v1/targets leaves it out, and jobs are not routed to what only it served).
    worker_targets: str = Field(default="auto", max_length=1000)
    worker_heartbeat_s: float = Field(default=30.0, gt=0)
    worker_stale_s: float = Field(default=120.0, gt=0)
    api_host: str = "127.0.0.1"
    api_port: int = 8000

    @model_validator(mode="after")
    def _recovery_timings_fit(self) -> Settings:
        if self.heartbeat_timeout_s < 2 * self.heartbeat_interval_s:
            raise ValueError("MODELPRESS_HEARTBEAT_TIMEOUT_S must be at least twice MODELPRESS_HEARTBEAT_INTERVAL_S")
        if self.worker_stale_s < 2 * self.worker_heartbeat_s:
            raise ValueError("MODELPRESS_WORKER_STALE_S must be at least twice MODELPRESS_WORKER_HEARTBEAT_S")
        return self

    @model_validator(mode="after")
    def _production_needs_servers(self) -> Settings:
        # The embedded defaults (SQLite, filesystem broker) are for one machine only.
        if self.mode == "production":
            if not self.database_url or self.database_url.startswith("sqlite"):
                raise ValueError("production mode needs MODELPRESS_DATABASE_URL pointing at PostgreSQL")
            if not self.broker_url or self.broker_url.startswith("filesystem"):
                raise ValueError("production mode needs MODELPRESS_BROKER_URL pointing at Redis")
        return self

    @property
    def data_path(self) -> Path:
        return self.data_dir.expanduser().resolve()

    @property
    def sqlalchemy_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_path / 'modelpress.db'}"

    @property
    def celery_broker_url(self) -> str:
        return self.broker_url or "filesystem://"

    @property
    def broker_folder(self) -> Path:
        return self.data_path / "broker"

    @property
    def store_path(self) -> Path:
        return self.data_path / "store"

    def queue_name(self, queue: str) -> str:
        return f"{self.queue_prefix}{queue}"

    def file_limits(self) -> Limits:
        """The bounds an uploaded or stored model file is unpacked and parsed within."""
        return Limits(max_unpacked_bytes=self.max_unpacked_bytes)


@functools.lru_cache
def get_settings() -> Settings:
    return Settings()
