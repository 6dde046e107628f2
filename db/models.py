"""Typed SQLAlchemy tables."""

from __future__ import annotations

import enum
import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    true,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class JobStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores them naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given; use db.models.utcnow()")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# none_as_null: a Python None is SQL NULL (e.g. a failed job's result), not the JSON value null.
JSONType = JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql")


# ModelVersion.task values.
TEXT_CLASSIFIER = "text-classifier"
MASKED_LM = "masked-lm"
EMBEDDER = "embedder"


class Base(DeclarativeBase):
    type_annotation_map = {
        dict[str, Any]: JSONType,
        datetime: UTCDateTime,
    }


# Every job, dataset and model belongs to one tenant; the API scopes every query by it.
TENANT = String(63)


class Tenant(Base):
    __tablename__ = "tenants"

    name: Mapped[str] = mapped_column(TENANT, primary_key=True)
    # Signs this tenant's webhook deliveries (HMAC-SHA256); never returned in job records or logs.
    webhook_secret: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiKey(Base):
    """An API key: only its SHA-256 is stored; the key itself is shown once, at creation."""

    __tablename__ = "api_keys"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    tenant: Mapped[str] = mapped_column(TENANT, ForeignKey("tenants.name", ondelete="CASCADE"))
    # The key's first characters, to tell keys apart in listings.
    prefix: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    admin: Mapped[bool] = mapped_column(Boolean, default=False)
    label: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None]


class TenantKey(Base):
    """A tenant's data key, wrapped by the master key (tensorq/core/crypto.py). The highest version
    is the active one; older ones remain only while a rotation rewrites what they sealed.
    No foreign key: jobs may name a tenant without a row, and deleting a tenant deletes these first."""

    __tablename__ = "tenant_keys"

    tenant: Mapped[str] = mapped_column(TENANT, primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    wrapped: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class KeyCheck(Base):
    """One row: how to recognise the master key the data keys are wrapped with, and whether rows
    written before encryption (plaintext) may still be read (until `tensorq encrypt-existing`)."""

    __tablename__ = "key_check"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    master_fingerprint: Mapped[str | None] = mapped_column(String(64))
    legacy_plaintext: Mapped[bool] = mapped_column(Boolean, default=False)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class WebhookState(enum.StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    tenant: Mapped[str] = mapped_column(TENANT)
    kind: Mapped[str] = mapped_column(String(64))
    model: Mapped[str | None] = mapped_column(String(200))
    # The registered version assigned at submission when `model` names one through an alias (its
    # split decides, by the job's id; see db/rollouts.py) or by number; kept through retries, and
    # part of the batching key. NULL: resolved when the job runs (`name`, the latest version).
    model_version: Mapped[int | None] = mapped_column(Integer)
    # The alias's shadow version, when this job was picked to run on it too (after its own commit).
    shadow_version: Mapped[int | None] = mapped_column(Integer)
    queue: Mapped[str] = mapped_column(String(64))
    status: Mapped[JobStatus] = mapped_column(
        Enum(JobStatus, native_enum=False, length=16, values_callable=lambda e: [m.value for m in e]),
        default=JobStatus.QUEUED,
    )
    params: Mapped[dict[str, Any]]
    # What the job adds to a batch in the units `batch_max_texts` caps (texts), so a claim can
    # fill a batch by its cost in SQL: set at submission from the kind's `batch_cost`.
    batch_cost: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    result: Mapped[dict[str, Any] | None]
    error_type: Mapped[str | None] = mapped_column(String(100))
    error_message: Mapped[str | None] = mapped_column(Text)
    progress: Mapped[dict[str, Any] | None]
    # How the final attempt ran: batch_size (jobs sharing its forward pass), run_ms.
    metrics: Mapped[dict[str, Any] | None]
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer)
    worker: Mapped[str | None] = mapped_column(String(255))
    device: Mapped[str | None] = mapped_column(String(32))
    # The claim: only the holder of this token may write progress or the final state.
    claim_token: Mapped[uuid.UUID | None]
    lease_expires_at: Mapped[datetime | None]
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    published_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    # A URL POSTed the job once it is final (see api/webhooks/dispatcher.py); delivery state lives beside it.
    webhook_url: Mapped[str | None] = mapped_column(String(2083))
    webhook_state: Mapped[WebhookState | None] = mapped_column(
        Enum(WebhookState, native_enum=False, length=16, values_callable=lambda e: [m.value for m in e])
    )
    webhook_attempts: Mapped[int] = mapped_column(Integer, default=0)
    webhook_next_at: Mapped[datetime | None]
    webhook_error: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (
        Index("ix_jobs_tenant_created", "tenant", "created_at", "id"),
        Index("ix_jobs_tenant_status_created", "tenant", "status", "created_at", "id"),
        Index("ix_jobs_webhook_due", "webhook_state", "webhook_next_at"),
        Index("ix_jobs_created", "created_at", "id"),
        Index("ix_jobs_status_created", "status", "created_at", "id"),
        Index("ix_jobs_kind_created", "kind", "created_at", "id"),
        Index("ix_jobs_status_lease", "status", "lease_expires_at"),
        Index("ix_jobs_status_published", "status", "published_at"),
        # Per-version statistics and rollout guards: one alias's jobs of one version, by time.
        Index("ix_jobs_tenant_model_version_created", "tenant", "model", "model_version", "created_at"),
    )


class Dataset(Base):
    """An uploaded text dataset; its rows live in the artifact store as JSONL."""

    __tablename__ = "datasets"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    tenant: Mapped[str] = mapped_column(TENANT, index=True)
    name: Mapped[str | None] = mapped_column(String(200))
    path: Mapped[str] = mapped_column(String(500))  # relative to the artifact directory
    rows: Mapped[int] = mapped_column(Integer)
    labels: Mapped[list[str]] = mapped_column(JSONType)
    # Every row has a label (a classifier's data), or none has (texts only, for pretrain-mlm).
    labelled: Mapped[bool] = mapped_column(Boolean, default=True, server_default=true())
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    size_bytes: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Model(Base):
    __tablename__ = "models"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant: Mapped[str] = mapped_column(TENANT)
    name: Mapped[str] = mapped_column(String(63))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (UniqueConstraint("tenant", "name", name="uq_models_tenant_name"),)


class ModelVersion(Base):
    __tablename__ = "model_versions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    version: Mapped[int] = mapped_column(Integer)
    artifact_path: Mapped[str] = mapped_column(String(500))  # relative to the artifact directory
    labels: Mapped[list[str]] = mapped_column(JSONType)
    metrics: Mapped[dict[str, Any]]
    job_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # What the version is: text-classifier, masked-lm (an encoder with its head) or embedder.
    task: Mapped[str] = mapped_column(String(32), default=TEXT_CLASSIFIER, server_default=TEXT_CLASSIFIER)
    # The version it was made from (fine-tuned, pretrained further, optimised), if a registered one.
    parent_name: Mapped[str | None] = mapped_column(String(63))
    parent_version: Mapped[int | None] = mapped_column(Integer)
    # How it was made from its parent: {"method", "options", "comparison", "base_model", ...}.
    lineage: Mapped[dict[str, Any] | None]

    __table_args__ = (UniqueConstraint("model_id", "version", name="uq_model_versions_model_version"),)


class ModelEvaluation(Base):
    """One `evaluate` job's figures for a version, kept on it (GET /v1/models/{name})."""

    __tablename__ = "model_evaluations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id", ondelete="CASCADE"))
    dataset_id: Mapped[str] = mapped_column(String(128))
    split: Mapped[str] = mapped_column(String(16))
    metrics: Mapped[dict[str, Any]]
    device: Mapped[str] = mapped_column(String(32))
    job_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (Index("ix_model_evaluations_version", "model_version_id", "id"),)


class ModelAlias(Base):
    """A movable name for a model's versions, e.g. `production`: one version, or a split of jobs
    between up to four (a canary), optionally with a shadow version and a rollback guard."""

    __tablename__ = "model_aliases"

    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), primary_key=True)
    alias: Mapped[str] = mapped_column(String(63), primary_key=True)
    # The baseline: the one version, or the split's largest share (the lower version on a tie).
    version: Mapped[int] = mapped_column(Integer)
    # {"3": 90, "4": 10}: percentages by version, summing to 100; NULL means {version: 100}.
    split: Mapped[dict[str, Any] | None]
    # {"version": 5, "percent": 20}: that share of the alias's jobs also runs on this version.
    shadow: Mapped[dict[str, Any] | None]
    # {"max_failure_rate": 0.05, "min_jobs": 20}: roll the split back when a candidate trips it.
    guard: Mapped[dict[str, Any] | None]
    # Bumped by every change: rollbacks are conditional on the revision they saw (one wins).
    revision: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class AliasChange(Base):
    """One change of an alias's assignment: who (an API key, or the guard), when, why."""

    __tablename__ = "model_alias_history"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    alias: Mapped[str] = mapped_column(String(63))
    action: Mapped[str] = mapped_column(String(16))  # set, rollback, auto-rollback
    # Assignments as {"split": {...}, "shadow": ..., "guard": ...}; from is NULL for a new alias.
    from_assignment: Mapped[dict[str, Any] | None]
    to_assignment: Mapped[dict[str, Any]]
    key_id: Mapped[uuid.UUID | None]  # the API key that made it; NULL for the guard
    reason: Mapped[str | None] = mapped_column(Text)
    revision: Mapped[int] = mapped_column(Integer)  # the alias's revision after the change
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (Index("ix_model_alias_history_alias", "model_id", "alias", "id"),)


class ShadowRun(Base):
    """A job's run on its alias's shadow version, after its own result was committed: kept apart
    from the job's result and never returned as it; `agreement` compares the two."""

    __tablename__ = "shadow_runs"

    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    tenant: Mapped[str] = mapped_column(TENANT)
    model: Mapped[str] = mapped_column(String(200))  # the job's reference, e.g. sentiment@production
    version: Mapped[int] = mapped_column(Integer)  # the shadow version
    primary_version: Mapped[int | None] = mapped_column(Integer)  # the version the job ran on
    ok: Mapped[bool] = mapped_column(Boolean)
    # Classifiers: the share of texts with the same top label; embedders: the mean cosine.
    agreement: Mapped[float | None] = mapped_column(Float)
    output: Mapped[dict[str, Any] | None]
    error: Mapped[str | None] = mapped_column(Text)
    run_ms: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (Index("ix_shadow_runs_tenant_model_created", "tenant", "model", "created_at"),)


class OpenAIFile(Base):
    """A file of the OpenAI-compatible API (api/openai): a batch's input (purpose `batch`) or its
    output or error file (`batch_output`); the bytes live in the artifact store at `path`."""

    __tablename__ = "openai_files"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # file-<32 hex>
    tenant: Mapped[str] = mapped_column(TENANT)
    purpose: Mapped[str] = mapped_column(String(32))
    filename: Mapped[str] = mapped_column(String(255))
    bytes: Mapped[int] = mapped_column(BigInteger)
    lines: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(String(500))  # relative to the artifact directory
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (Index("ix_openai_files_tenant_created", "tenant", "created_at", "id"),)


class OpenAIBatch(Base):
    """An OpenAI-style batch: the lines of its input file become embed jobs, a chunk at a time
    (`submitted_lines` / `submitted_bytes` is the cursor into the file), and once they are all final
    its output and error files are written (see api/openai/batches.py)."""

    __tablename__ = "openai_batches"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # batch_<32 hex>
    tenant: Mapped[str] = mapped_column(TENANT)
    endpoint: Mapped[str] = mapped_column(String(64))
    completion_window: Mapped[str] = mapped_column(String(16))
    input_file_id: Mapped[str] = mapped_column(String(64))
    # validating, in_progress, finalizing, completed, failed, cancelling, cancelled
    status: Mapped[str] = mapped_column(String(16))
    batch_metadata: Mapped[dict[str, Any] | None]
    errors: Mapped[dict[str, Any] | None]
    total_lines: Mapped[int] = mapped_column(Integer)
    submitted_lines: Mapped[int] = mapped_column(Integer, default=0)
    submitted_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    completed_lines: Mapped[int] = mapped_column(Integer, default=0)  # set when final
    failed_lines: Mapped[int] = mapped_column(Integer, default=0)  # set when final
    output_file_id: Mapped[str | None] = mapped_column(String(64))
    error_file_id: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime]
    in_progress_at: Mapped[datetime | None]
    finalizing_at: Mapped[datetime | None]
    completed_at: Mapped[datetime | None]
    failed_at: Mapped[datetime | None]
    cancelling_at: Mapped[datetime | None]
    cancelled_at: Mapped[datetime | None]

    __table_args__ = (
        Index("ix_openai_batches_tenant_created", "tenant", "created_at", "id"),
        Index("ix_openai_batches_status", "status"),
    )


class OpenAIBatchRequest(Base):
    """One line of a batch once submitted: its job, or the error that kept it from becoming one."""

    __tablename__ = "openai_batch_requests"

    batch_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("openai_batches.id", ondelete="CASCADE"), primary_key=True
    )
    line: Mapped[int] = mapped_column(Integer, primary_key=True)  # 1-based, in the input file
    custom_id: Mapped[str] = mapped_column(String(512))
    # No foreign key: retention may prune the job; the line then reports it as expired.
    job_id: Mapped[uuid.UUID | None]
    # What the response echoes (the model as asked for, encoding_format).
    options: Mapped[dict[str, Any]]
    # The OpenAI error response the line got instead of a job: {"status_code", "body"}.
    error: Mapped[dict[str, Any] | None]
