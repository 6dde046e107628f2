"""Storage of the OpenAI-compatible Files and Batch API (api/openai): files, batches, and each
batch line's job or error. Every lookup a route makes is scoped by tenant."""

from __future__ import annotations

import enum
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Select, and_, func, or_, select, update
from sqlalchemy.orm import Session

from db.models import Job, JobStatus, OpenAIBatch, OpenAIBatchRequest, OpenAIFile, utcnow


class BatchStatus(enum.StrEnum):
    VALIDATING = "validating"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"


# Batches the API's batch loop still has work on: lines to submit, jobs to wait for, files to write.
OPEN_STATUSES = (
    BatchStatus.VALIDATING,
    BatchStatus.IN_PROGRESS,
    BatchStatus.CANCELLING,
    BatchStatus.FINALIZING,
)
ACTIVE_JOB = (JobStatus.QUEUED, JobStatus.RUNNING)


def new_file_id() -> str:
    return f"file-{uuid.uuid4().hex}"


def new_batch_id() -> str:
    return f"batch_{uuid.uuid4().hex}"


def get_file(session: Session, file_id: str, tenant: str) -> OpenAIFile | None:
    row = session.get(OpenAIFile, file_id)
    return row if row is not None and row.tenant == tenant else None


def get_batch(
    session: Session, batch_id: str, tenant: str, *, for_update: bool = False
) -> OpenAIBatch | None:
    """The tenant's batch; `for_update` waits for the batch loop's lock and holds the row, so a
    change from a request (cancel) is ordered after the loop's step, never interleaved with it:
    the two touching the batch's jobs in opposite orders had deadlocked (a 500 on cancel)."""
    row = session.get(OpenAIBatch, batch_id, populate_existing=True, with_for_update=for_update)
    return row if row is not None and row.tenant == tenant else None


def list_batches(
    session: Session, tenant: str, *, limit: int, after: OpenAIBatch | None = None
) -> tuple[list[OpenAIBatch], bool]:
    """Newest first; `after` is the last batch of the previous page. Returns (page, has_more)."""
    stmt = select(OpenAIBatch).where(OpenAIBatch.tenant == tenant)
    if after is not None:
        stmt = stmt.where(
            or_(
                OpenAIBatch.created_at < after.created_at,
                and_(OpenAIBatch.created_at == after.created_at, OpenAIBatch.id < after.id),
            )
        )
    rows = list(
        session.scalars(stmt.order_by(OpenAIBatch.created_at.desc(), OpenAIBatch.id.desc()).limit(limit + 1))
    )
    return rows[:limit], len(rows) > limit


def open_batch_ids(session: Session, limit: int = 100) -> list[str]:
    stmt = (
        select(OpenAIBatch.id)
        .where(OpenAIBatch.status.in_([s.value for s in OPEN_STATUSES]))
        .order_by(OpenAIBatch.created_at)
        .limit(limit)
    )
    return list(session.scalars(stmt))


def lock_batch(session: Session, batch_id: str) -> OpenAIBatch | None:
    """The batch, locked for this transaction (PostgreSQL; SQLite serialises writers anyway); None
    when another API replica holds it: that one is working on it."""
    stmt = select(OpenAIBatch).where(OpenAIBatch.id == batch_id).with_for_update(skip_locked=True)
    return session.scalars(stmt.execution_options(populate_existing=True)).first()


def _batch_jobs(batch_id: str) -> Select[Any]:
    return select(OpenAIBatchRequest.job_id).where(
        OpenAIBatchRequest.batch_id == batch_id, OpenAIBatchRequest.job_id.is_not(None)
    )


def active_job_count(session: Session, batch_id: str) -> int:
    stmt = select(func.count()).where(Job.id.in_(_batch_jobs(batch_id)), Job.status.in_(ACTIVE_JOB))
    return int(session.scalar(stmt) or 0)


def line_counts(session: Session, batch_id: str) -> tuple[int, int]:
    """(completed, failed) so far: lines whose job succeeded; lines refused, or whose job failed or
    was cancelled."""
    jobs = dict(
        session.execute(
            select(Job.status, func.count())
            .join(OpenAIBatchRequest, OpenAIBatchRequest.job_id == Job.id)
            .where(OpenAIBatchRequest.batch_id == batch_id)
            .group_by(Job.status)
        ).all()
    )
    refused = session.scalar(
        select(func.count()).where(
            OpenAIBatchRequest.batch_id == batch_id, OpenAIBatchRequest.job_id.is_(None)
        )
    )
    failed = int(refused or 0) + int(jobs.get(JobStatus.FAILED, 0)) + int(jobs.get(JobStatus.CANCELLED, 0))
    return int(jobs.get(JobStatus.SUCCEEDED, 0)), failed


def cancel_batch_jobs(session: Session, batch_id: str) -> list[uuid.UUID]:
    """As `db.jobs.cancel_job` for every job of the batch: queued ones are cancelled now (returned),
    running ones asked to stop."""
    now = utcnow()
    queued = list(
        session.scalars(
            select(Job.id).where(Job.id.in_(_batch_jobs(batch_id)), Job.status == JobStatus.QUEUED)
        )
    )
    for chunk in _chunks(queued, 1000):
        session.execute(
            update(Job)
            .where(Job.id.in_(chunk), Job.status == JobStatus.QUEUED)
            .values(status=JobStatus.CANCELLED, cancel_requested=True, finished_at=now, updated_at=now)
            .execution_options(synchronize_session=False)
        )
    session.execute(
        update(Job)
        .where(Job.id.in_(_batch_jobs(batch_id)), Job.status == JobStatus.RUNNING)
        .values(cancel_requested=True, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    return queued


def request_page(
    session: Session, batch_id: str, after_line: int, limit: int
) -> list[tuple[OpenAIBatchRequest, Job | None]]:
    """A batch's lines after `after_line`, in order, each with its job (None: refused, or pruned)."""
    stmt = (
        select(OpenAIBatchRequest, Job)
        .outerjoin(Job, Job.id == OpenAIBatchRequest.job_id)
        .where(OpenAIBatchRequest.batch_id == batch_id, OpenAIBatchRequest.line > after_line)
        .order_by(OpenAIBatchRequest.line)
        .limit(limit)
    )
    return [(req, job) for req, job in session.execute(stmt).tuples()]


def set_timestamp(batch: OpenAIBatch, name: str, when: datetime | None = None) -> None:
    if getattr(batch, name) is None:
        setattr(batch, name, when or utcnow())


def _chunks(items: Sequence[uuid.UUID], size: int) -> list[Sequence[uuid.UUID]]:
    return [items[i : i + size] for i in range(0, len(items), size)]
