"""HTTP shapes. The request body of POST /v1/jobs is built from the job kinds' own schemas."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, create_model

from db.models import Job, JobStatus
from tasks.registry import all_kinds


class JobErrorOut(BaseModel):
    type: str = Field(description="A stable error name, e.g. InvalidParams, WorkerLost, RuntimeError.")
    message: str


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


def _job_create_models() -> list[type[BaseModel]]:
    return [
        create_model(
            f"{_pascal(kind.name)}JobCreate",
            __config__=ConfigDict(extra="forbid"),
            kind=(Literal[kind.name], Field(description=kind.description)),  # type: ignore[arg-type]
            input=(kind.params, ...),
            device=(DeviceChoice, Field(default="any", description="Require a GPU or CPU worker, or any.")),
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
    labels: list[str]
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


class AliasOut(BaseModel):
    model: str
    alias: str
    version: int
