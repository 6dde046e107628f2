"""HTTP shapes. The request body of POST /v1/jobs is built from the job kinds' own schemas."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, HttpUrl, StringConstraints, create_model

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


class JobList(BaseModel):
    items: list[JobOut]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last.")


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


class ModelVersionOut(BaseModel):
    version: int
    labels: list[str]
    metrics: dict[str, Any]
    artifact: str = Field(description="Location in the artifact store (safetensors + config).")
    job_id: uuid.UUID | None
    created_at: datetime
    task: str = Field(default="text-classifier", description="text-classifier, masked-lm or embedder.")
    parent: str | None = Field(default=None, description='The version it was made from, "name:version".')


class ModelOut(BaseModel):
    name: str
    latest_version: int | None
    aliases: dict[str, int] = Field(description='alias -> version, e.g. {"production": 3}')
    versions: list[ModelVersionOut]
    created_at: datetime


class ModelList(BaseModel):
    items: list[ModelOut]


class AliasIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int = Field(ge=1, le=999_999_999)


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

    admin: bool = False
    label: Annotated[str, StringConstraints(max_length=200), Storable] | None = None


class KeyCreated(KeyOut):
    key: str = Field(description="The new key. Shown this once; only its hash is stored.")


class KeyList(BaseModel):
    items: list[KeyOut]


class WebhookSecretOut(BaseModel):
    tenant: str
    webhook_secret: str = Field(description="Signs this tenant's webhook deliveries (HMAC-SHA256)")


class AliasOut(BaseModel):
    model: str
    alias: str
    version: int
