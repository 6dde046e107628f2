"""HTTP shapes. The request body of POST /v1/jobs is built from the job kinds' own schemas."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    HttpUrl,
    StringConstraints,
    create_model,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from db.models import Job, JobStatus, WebhookState
from tasks.registry import all_kinds
from tasks.texts import Storable


class JobErrorOut(BaseModel):
    type: str = Field(description="A stable error name, e.g. InvalidParams, WorkerLost, RuntimeError.")
    message: str


class WebhookOut(BaseModel):
    url: str
    state: WebhookState = Field(description="pending until delivered (2xx) or out of attempts (failed)")
    attempts: int
    error: str | None = Field(description="Why the last attempt failed")


class JobOut(BaseModel):
    id: uuid.UUID
    kind: str
    status: JobStatus
    model: str | None
    model_version: int | None = Field(
        description="The registered version the job runs on: assigned at submission for name@alias "
        "(by the alias's split) and name:N; for a bare name, the latest version it ran on, once finished."
    )
    queue: str = Field(description="inference, training, or gpu./cpu.-prefixed when a device was required")
    input: dict[str, Any]
    progress: dict[str, Any] | None
    result: dict[str, Any] | None = Field(description="The kind's result schema, e.g. EmbedResult.")
    error: JobErrorOut | None
    metrics: dict[str, Any] | None = Field(
        description="How the job ran: batch_size (jobs that shared its forward pass), run_ms."
    )
    attempts: int
    max_attempts: int
    cancel_requested: bool
    worker: str | None
    device: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    webhook: WebhookOut | None

    @classmethod
    def from_row(cls, job: Job) -> JobOut:
        error = None
        if job.error_type is not None:
            error = JobErrorOut(type=job.error_type, message=job.error_message or "")
        return cls(
            id=job.id,
            kind=job.kind,
            status=job.status,
            model=job.model,
            model_version=job.model_version if job.model_version is not None else ran_version(job),
            queue=job.queue,
            input=job.params,
            progress=job.progress,
            result=job.result,
            error=error,
            metrics=job.metrics,
            attempts=job.attempts,
            max_attempts=job.max_attempts,
            cancel_requested=job.cancel_requested,
            worker=job.worker,
            device=job.device,
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
            webhook=None
            if job.webhook_url is None or job.webhook_state is None
            else WebhookOut(
                url=job.webhook_url,
                state=job.webhook_state,
                attempts=job.webhook_attempts,
                error=job.webhook_error,
            ),
        )


# What a listing leaves out unless `?include=` names it: the parts of a job that grow with its data.
LISTED_PAYLOADS = ("input", "result")


class JobSummary(BaseModel):
    """A job as listed: JobOut without `input` and `result` unless `?include=` names them."""

    id: uuid.UUID
    kind: str
    status: JobStatus
    model: str | None
    model_version: int | None = Field(
        default=None, description="The version assigned at submission (an alias's split, or name:N)."
    )
    queue: str
    input: dict[str, Any] | None = Field(default=None, description="Only with include=input.")
    progress: dict[str, Any] | None
    result: dict[str, Any] | None = Field(default=None, description="Only with include=result.")
    error: JobErrorOut | None
    metrics: dict[str, Any] | None
    attempts: int
    max_attempts: int
    cancel_requested: bool
    worker: str | None
    device: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    webhook: WebhookOut | None

    @classmethod
    def from_row(cls, job: Job, payloads: dict[str, Any] | None = None) -> JobSummary:
        """`payloads`: the included columns (input, result), read apart from the row."""
        error = None
        if job.error_type is not None:
            error = JobErrorOut(type=job.error_type, message=job.error_message or "")
        return cls(
            id=job.id,
            kind=job.kind,
            status=job.status,
            model=job.model,
            model_version=job.model_version,
            queue=job.queue,
            progress=job.progress,
            error=error,
            metrics=job.metrics,
            attempts=job.attempts,
            max_attempts=job.max_attempts,
            cancel_requested=job.cancel_requested,
            worker=job.worker,
            device=job.device,
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
            webhook=_webhook_out(job),
            **(payloads or {}),
        )


def _webhook_out(job: Job) -> WebhookOut | None:
    if job.webhook_url is None or job.webhook_state is None:
        return None
    return WebhookOut(
        url=job.webhook_url, state=job.webhook_state, attempts=job.webhook_attempts, error=job.webhook_error
    )


def ran_version(job: Job) -> int | None:
    """The version an inference job resolved when it ran (its result's `version`), for jobs not
    assigned one at submission."""
    kind = all_kinds().get(job.kind)
    version = (job.result or {}).get("version")
    if kind is None or kind.category != "inference" or not isinstance(version, int):
        return None
    return version


class JobList(BaseModel):
    items: list[JobSummary] = Field(
        description="Newest first; `input` and `result` only when `include` names them."
    )
    next_cursor: str | None = Field(
        description="Pass as `cursor` for the next page; null on the last. A page may hold fewer "
        "jobs than `limit` when its size reached TENSORQ_LIST_MAX_BYTES."
    )


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    checks: dict[str, str] = Field(default_factory=dict)


class ErrorOut(BaseModel):
    detail: Any = Field(description="A message, or FastAPI's list of {loc, msg, type} naming the field.")


def _pascal(name: str) -> str:
    return "".join(part.capitalize() for part in name.replace("_", "-").split("-"))


DeviceChoice = Literal["any", "gpu", "cpu"]
# HttpUrl also bounds the length (2083 characters).


def _job_create_models() -> list[type[BaseModel]]:
    return [
        create_model(
            f"{_pascal(kind.name)}JobCreate",
            __config__=ConfigDict(extra="forbid"),
            kind=(Literal[kind.name], Field(description=kind.description)),  # type: ignore[arg-type]
            input=(kind.params, ...),
            device=(DeviceChoice, Field(default="any", description="Require a GPU or CPU worker, or any.")),
            webhook=(
                HttpUrl | None,
                Field(
                    default=None,
                    description="POSTed the job (signed, see X-Tensorq-Signature) once it is final; "
                    "private and loopback destinations are refused unless allowed by the server.",
                ),
            ),
        )
        for kind in all_kinds().values()
    ]


_models = _job_create_models()
# One member per job kind, told apart by "kind"; adding a kind adds a member here by itself.
JobCreate: Any = (
    _models[0] if len(_models) == 1 else Annotated[Union[tuple(_models)], Field(discriminator="kind")]  # noqa: UP007
)
KIND_TAGS = frozenset(all_kinds())

MAX_BATCH_JOBS = 1000


class JobBatchCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    jobs: list[JobCreate] = Field(
        min_length=1,
        max_length=MAX_BATCH_JOBS,
        description=f"1 to {MAX_BATCH_JOBS} jobs, stored all or none.",
    )


class JobBatchOut(BaseModel):
    ids: list[uuid.UUID] = Field(description="The new jobs' ids, in the order submitted.")


class DatasetOut(BaseModel):
    id: uuid.UUID
    name: str | None
    rows: int
    labels: list[str] = Field(description="The distinct labels, sorted; [] for a text-only dataset.")
    labelled: bool = Field(description='Every row has a "label" (classifier data), or none has (texts only).')
    sha256: str
    size_bytes: int
    created_at: datetime


class DatasetList(BaseModel):
    items: list[DatasetOut]


class EvaluationOut(BaseModel):
    dataset_id: str
    split: str = Field(description='"validation" or "all".')
    metrics: dict[str, Any]
    device: str
    job_id: uuid.UUID | None
    created_at: datetime


class ModelVersionOut(BaseModel):
    version: int
    labels: list[str]
    metrics: dict[str, Any]
    artifact: str = Field(description="Location in the artifact store (safetensors + config).")
    job_id: uuid.UUID | None
    created_at: datetime
    task: str = Field(default="text-classifier", description="text-classifier, masked-lm or embedder.")
    parent: str | None = Field(default=None, description='The version it was made from, "name:version".')
    lineage: dict[str, Any] | None = Field(
        default=None,
        description="How an optimize job made it: method, options, parent, comparison with the parent, "
        "recipe steps and the chain of versions it came from.",
    )
    evaluations: list[EvaluationOut] = Field(
        default_factory=list, description="Its evaluate jobs' figures, oldest first."
    )


class ModelOut(BaseModel):
    name: str
    latest_version: int | None
    aliases: dict[str, int] = Field(description='alias -> version, e.g. {"production": 3}')
    versions: list[ModelVersionOut]
    created_at: datetime


class ModelList(BaseModel):
    items: list[ModelOut]


VersionNumber = Annotated[int, Field(strict=True, ge=1, le=999_999_999)]
VersionKey = Annotated[str, StringConstraints(pattern=r"^[1-9][0-9]{0,8}$")]
Percent = Annotated[int, Field(strict=True, ge=1, le=100)]
MAX_SPLIT_VERSIONS = 4


class ShadowIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: VersionNumber = Field(description="A registered version outside the split")
    percent: Percent = Field(description="The share of the alias's jobs that also run on it")


class GuardIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_failure_rate: float = Field(strict=True, ge=0, le=1, description="0 to 1")
    min_jobs: int = Field(
        strict=True, ge=1, le=1_000_000, description="Jobs of a candidate before it is judged"
    )


class AliasIn(BaseModel):
    """`{"version": 3}`, or `{"split": {"3": 90, "4": 10}}`; either with an optional shadow, a
    split with an optional guard. Integers are strict: "3" is not 3."""

    model_config = ConfigDict(extra="forbid")

    version: VersionNumber | None = None
    split: dict[VersionKey, Percent] | None = Field(
        default=None,
        description=f"version -> integer percentage, summing to 100, at most {MAX_SPLIT_VERSIONS} versions",
    )
    shadow: ShadowIn | None = None
    guard: GuardIn | None = Field(
        default=None, description="Roll the split back when a candidate fails more often than this"
    )

    @field_validator("split")
    @classmethod
    def _split_adds_up(cls, split: dict[str, int] | None) -> dict[str, int] | None:
        if split is None:
            return None
        if not 1 <= len(split) <= MAX_SPLIT_VERSIONS:
            raise ValueError(f"1 to {MAX_SPLIT_VERSIONS} versions")
        if sum(split.values()) != 100:
            raise ValueError(f"percentages must sum to 100, not {sum(split.values())}")
        return split

    @model_validator(mode="after")
    def _one_assignment(self) -> AliasIn:
        if (self.version is None) == (self.split is None):
            raise PydanticCustomError("version_or_split", "give either version or split")
        if self.guard is not None and self.split is None:
            raise PydanticCustomError("guard_needs_split", "a guard needs a split")
        return self


class KeyOut(BaseModel):
    id: uuid.UUID
    tenant: str
    prefix: str = Field(description="The key's first characters, to recognise it")
    admin: bool
    label: str | None
    created_at: datetime
    revoked_at: datetime | None


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Strict: only JSON true/false; "yes", "1" or 1 would otherwise make an admin key.
    admin: bool = Field(default=False, strict=True)
    label: Annotated[str, StringConstraints(max_length=200), Storable] | None = None


class KeyCreated(KeyOut):
    key: str = Field(description="The new key. Shown this once; only its hash is stored.")


class KeyList(BaseModel):
    items: list[KeyOut]


class WebhookSecretOut(BaseModel):
    tenant: str
    webhook_secret: str = Field(description="Signs this tenant's webhook deliveries (HMAC-SHA256)")


class AliasOut(BaseModel):
    """What PUT answers; split, shadow and guard only when set (a plain version answers as before)."""

    model: str
    alias: str
    version: int = Field(description="The one version, or the split's baseline (its largest share)")
    split: dict[str, int] | None = None
    shadow: dict[str, int] | None = None
    guard: dict[str, Any] | None = None


class AliasChangeOut(BaseModel):
    action: str = Field(description="set, rollback (by a key) or auto-rollback (by the guard)")
    from_: dict[str, Any] | None = Field(
        serialization_alias="from", description="The assignment before; null for a new alias"
    )
    to: dict[str, Any]
    at: datetime
    key_id: uuid.UUID | None = Field(description="The API key that made the change; null for the guard")
    reason: str | None
    revision: int


class VersionStatsOut(BaseModel):
    version: int
    role: str = Field(description="baseline, candidate, shadow, or other (assigned earlier in the window)")
    percent: int = Field(description="Its share of the alias's new jobs now")
    jobs: int
    by_status: dict[str, int]
    failure_rate: float | None = Field(description="failed / (succeeded + failed)")
    run_ms: dict[str, float | int | None] = Field(
        description="p50, p95 (started to finished) and the sample size"
    )
    labels: dict[str, int] = Field(description="Top labels predicted (classifiers), over the same sample")
    shadow: dict[str, Any] | None = Field(description="As a shadow: runs, failed, mean agreement")


class AliasDetailOut(BaseModel):
    model: str
    alias: str
    version: int
    split: dict[str, int]
    shadow: dict[str, int] | None
    guard: dict[str, Any] | None
    revision: int
    updated_at: datetime
    window_seconds: float
    stats: list[VersionStatsOut]
    history: list[AliasChangeOut] = Field(description="Newest first")


class RollbackIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: Annotated[str, StringConstraints(max_length=500), Storable] | None = None
