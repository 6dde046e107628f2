"""The one typed settings object. Nothing else in tensorq reads the environment."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, IPvAnyNetwork, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TENSORQ_", extra="ignore")

    # Storage and broker
    database_url: str = "sqlite:///./var/tensorq.db"
    redis_url: str = "redis://127.0.0.1:6379/0"
    artifact_dir: Path = Path("./var/artifacts")
    # Encryption at rest (tensorq/core/crypto.py): the master key that wraps every tenant's data
    # key, 32 bytes in base64, given directly or as a file (mode 0600). Required by the API, the
    # workers and the operator commands; `tensorq up` makes ./var/master.key on first start.
    master_key: SecretStr | None = None
    master_key_file: Path | None = None
    # How long a process keeps using a tenant's active data key before asking the database again:
    # a rotation waits this long (twice) before it rewrites data, so no writer is left behind.
    data_key_cache_seconds: float = Field(default=5.0, gt=0, le=300)
    # BENCHMARK ONLY (bench/encryption.py measures what sealing costs): store tenants' data
    # unencrypted. Never in a deployment: what it writes is plaintext, and a database written
    # with it accepts plaintext (as if `legacy_plaintext`) from every process that has it set.
    benchmark_unencrypted: bool = False
    # Port for the embedded redis-server that `tensorq up` starts when TENSORQ_REDIS_URL is not set.
    embedded_redis_port: int = 6390

    # API
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    max_body_bytes: int = Field(default=2 * 1024 * 1024, ge=1024)
    list_page_max: int = Field(default=200, ge=1)
    # GET /v1/jobs?include=result|input: rows are added to a page until its JSON would pass this
    # many bytes (at least one job is always answered); the page then ends with a next_cursor.
    list_max_bytes: int = Field(default=4 * 1024 * 1024, ge=64 * 1024)
    # Seconds a client has to send a whole request body once its headers arrived (else 408).
    request_body_timeout_seconds: float = Field(default=30.0, gt=0)
    # Seconds a client has to send a request's headers, from the connection opening or the end of
    # the previous response on it (else the connection is closed); see api/server.py.
    request_header_timeout_seconds: float = Field(default=10.0, gt=0)
    # Idle seconds a keep-alive connection is kept between requests (uvicorn's timeout_keep_alive).
    keep_alive_timeout_seconds: int = Field(default=5, ge=1)
    # Dataset uploads (POST /v1/datasets) have their own, larger limits.
    dataset_max_bytes: int = Field(default=32 * 1024 * 1024, ge=1024)
    dataset_max_rows: int = Field(default=200_000, ge=2)
    # Per-tenant quotas on stored datasets (all uploads together): bytes and count. Over them: 413.
    tenant_max_dataset_bytes: int = Field(default=1024 * 1024 * 1024, ge=1024)
    tenant_max_datasets: int = Field(default=100, ge=1)

    # Each API process caches the API keys it looked up for this long (0 = off). Revocations reach
    # every process's cache through Redis pub/sub within milliseconds; the cache is bypassed while
    # the subscription is down, so this only bounds a revocation whose publish failed (see
    # api/keycache.py).
    api_key_cache_seconds: float = Field(default=10.0, ge=0, le=3600)

    # Per-request limits (a job's texts are also capped by its kind's schema; these may only lower them).
    max_texts_per_job: int = Field(default=256, ge=1, le=256)
    max_batch_jobs: int = Field(default=1000, ge=1, le=1000)

    # The OpenAI-compatible API (/openai/v1, see api/openai): a batch input file (POST /files) is
    # refused (400) above these; its lines become jobs `openai_batch_chunk_lines` per transaction,
    # with at most `openai_batch_max_active_jobs` of one batch's jobs queued or running at once.
    openai_file_max_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    openai_file_max_lines: int = Field(default=50_000, ge=1)
    openai_batch_chunk_lines: int = Field(default=500, ge=1, le=1000)
    openai_batch_max_active_jobs: int = Field(default=2000, ge=1)
    # How often the API's batch loop looks for batches to advance or finalise (it is also woken).
    openai_batch_poll_seconds: float = Field(default=1.0, gt=0)

    # Per-tenant quotas: jobs queued or running at once, and submissions per second (a token
    # bucket in Redis holding up to `burst` jobs, refilled at `rate` per second). Over them: 429.
    tenant_max_active_jobs: int = Field(default=10_000, ge=1)
    tenant_submit_rate: float = Field(default=200.0, gt=0)
    tenant_submit_burst: int = Field(default=2000, ge=1)

    # A job asking for device "gpu" or "cpu" is refused (422 naming `device`) when no live worker
    # consumes its queue: workers announce their queues in Redis every few seconds (see
    # tensorq/core/presence.py), and the API caches what it read this many seconds.
    worker_presence_cache_seconds: float = Field(default=5.0, ge=0)

    # Webhooks: destinations that resolve to private, loopback or link-local addresses are refused
    # unless inside one of these networks (CIDR, e.g. ["10.1.0.0/16"]).
    webhook_allowed_networks: list[IPvAnyNetwork] = Field(default_factory=list)
    # The whole of one delivery (connect, send, answer), not each read; at most half the 60 s lease.
    webhook_timeout_seconds: float = Field(default=5.0, gt=0)
    webhook_max_attempts: int = Field(default=8, ge=1)
    # Retry n waits about base * 2**(n-1) seconds (jittered), at most the cap.
    webhook_retry_base_seconds: float = Field(default=5.0, gt=0)
    webhook_retry_cap_seconds: float = Field(default=3600.0, gt=0)

    # For the client and CLI: the key sent as `Authorization: Bearer ...`.
    api_key: SecretStr | None = None

    # Flower, always behind basic auth ("user:password"); `tensorq up` makes one if unset.
    flower_port: int = 5555
    flower_basic_auth: SecretStr | None = None
    # Celery's task-sent event lets Flower list a job before a worker receives it; it costs the API
    # a second Redis publish per job (0.3 of 0.68 ms per message here). Off: Flower shows jobs from
    # `received` on, and GET /v1/jobs?status=queued lists what waits.
    task_sent_events: bool = False

    # Delivery and leases
    max_attempts: int = Field(default=3, ge=1)
    lease_seconds: float = Field(default=60.0, gt=0)
    visibility_timeout_seconds: int = Field(default=3600, ge=1)
    # A queued job whose message was published this long ago without being claimed is published again.
    republish_after_seconds: float = Field(default=600.0, gt=0)
    sweep_interval_seconds: float = Field(default=5.0, gt=0)

    # Worker
    worker_device: str = "cpu"  # set by `tensorq worker` for each process it starts
    worker_pool: str = "prefork"
    # Prometheus endpoint of each worker process: this port on CPU, port + 1 + i on GPU i; 0 = off.
    worker_metrics_port: int = Field(default=9101, ge=0, le=65535)
    # Where those endpoints listen: 0.0.0.0 in a container, for a scraper outside it.
    worker_metrics_host: str = "127.0.0.1"
    torch_threads: int | None = None
    # How long libgomp's idle threads (PyTorch's CPU threads) spin before sleeping, as GOMP_SPINCOUNT.
    # libgomp's own default (300000) spins ~1 ms after every forward pass, on cores the API and
    # PostgreSQL need on a shared machine; None (only in code) leaves it. See docs/performance.md.
    omp_spin_count: int | None = Field(default=10_000, ge=0)
    # Inference forward passes over at most this many texts run on one CPU thread; 0 = never.
    one_thread_max_texts: int = Field(default=2, ge=0)
    model_cache_bytes: int = Field(default=4 * 1024**3, ge=0)
    # Dynamic micro-batching of inference jobs (see worker/runner.py).
    batching: bool = True
    batch_max_texts: int = Field(default=128, ge=1, le=4096)
    batch_max_wait_ms: float = Field(default=5.0, ge=0, le=1000)

    # BENCHMARK ONLY, off by default: the worker skips the forward pass of `embed` jobs and writes a
    # fixed 384-float vector per text, so `bench.run` can measure the service's own ceiling (queue
    # capacity) with a model that costs nearly nothing. Results are not embeddings. Accepted only
    # with a database whose name contains "bench" (the benchmark's own), never in a real deployment.
    benchmark_skip_forward_pass: bool = False

    # Model rollouts: the window of an alias's per-version statistics (GET /v1/models/{name}/aliases/{alias}).
    rollout_stats_window_seconds: float = Field(default=3600.0, gt=0)

    # Per-kind (soft, hard) time limits in seconds overriding the kinds' own, e.g.
    # TENSORQ_TIME_LIMITS='{"train-text-classifier": [3600, 3900]}'.
    time_limits: dict[str, tuple[float | None, float | None]] = Field(default_factory=dict)

    # `tensorq prune` default age for finished jobs' results and artifacts.
    retention_days: int = Field(default=30, ge=1)

    log_level: str = "INFO"
    # "json", "text", or "auto": JSON lines unless stderr is a terminal.
    log_format: str = Field(default="auto", pattern="^(auto|json|text)$")

    @model_validator(mode="after")
    def _benchmark_mode_only_in_benchmarks(self) -> Settings:
        if self.benchmark_skip_forward_pass and "bench" not in self.database_url.rpartition("/")[2]:
            raise ValueError(
                "TENSORQ_BENCHMARK_SKIP_FORWARD_PASS is benchmark-only (results are not embeddings); "
                "it is refused unless the database's name contains 'bench'"
            )
        return self

    @property
    def sqlalchemy_url(self) -> str:
        """The database URL with the psycopg 3 driver made explicit for PostgreSQL."""
        url = self.database_url
        for prefix in ("postgresql://", "postgres://"):
            if url.startswith(prefix):
                return "postgresql+psycopg://" + url[len(prefix) :]
        return url


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
