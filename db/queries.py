"""The read side of jobs: lookups, listing with keyset cursors, counts. Nothing here writes."""

from __future__ import annotations

import base64
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session, defer

from db.models import Job, JobStatus, utcnow
from db.sealing import open_column


def get_job(session: Session, job_id: uuid.UUID, tenant: str | None = None) -> Job | None:
    """The job, fresh from the database; with `tenant`, None unless the job is that tenant's."""
    job = session.get(Job, job_id, populate_existing=True)
    if job is None or (tenant is not None and job.tenant != tenant):
        return None
    return job


def fetch_job(session: Session, job_id: uuid.UUID, tenant: str | None = None) -> Job | None:
    """`get_job` in a read transaction of its own, begun fresh (SQLite keeps one snapshot per
    transaction) and ended before returning, so a caller that then waits (a long-poll, up to a
    minute) holds no pooled connection idle in a transaction. The row stays loaded: sessions do
    not expire on commit."""
    session.rollback()
    try:
        return get_job(session, job_id, tenant)
    finally:
        session.commit()


def count_active_jobs(session: Session, tenant: str) -> int:
    """Queued and running jobs of one tenant, for its quota."""
    stmt = select(func.count()).where(
        Job.tenant == tenant, Job.status.in_((JobStatus.QUEUED, JobStatus.RUNNING))
    )
    return int(session.scalar(stmt) or 0)


def jobs_to_publish(
    session: Session, *, republish_after: float, limit: int = 500, now: datetime | None = None
) -> list[Job]:
    """Queued jobs never published, or published so long ago (before `now` - `republish_after`)
    that the message may be lost, oldest first."""
    stale = (now or utcnow()) - timedelta(seconds=republish_after)
    stmt = (
        select(Job)
        .where(
            Job.status == JobStatus.QUEUED,
            or_(Job.published_at.is_(None), Job.published_at < stale),
        )
        .order_by(Job.created_at)
        .limit(limit)
    )
    return list(session.scalars(stmt))


# Keyset pagination: newest first, by (created_at, id).


def encode_cursor(created_at: datetime, job_id: uuid.UUID) -> str:
    raw = f"{created_at.isoformat()}|{job_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    """Raises ValueError on a malformed cursor."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        ts, job_id = raw.split("|", 1)
        created = datetime.fromisoformat(ts)
        if created.tzinfo is None:
            raise ValueError("cursor timestamp has no timezone")
        # In UTC, as stored: 0001-01-01T00:00:00+14:00 has no UTC time, and would overflow at the query.
        return created.astimezone(UTC), uuid.UUID(job_id)
    except (UnicodeDecodeError, ValueError, TypeError, OverflowError) as exc:
        raise ValueError("malformed cursor") from exc


def list_jobs(
    session: Session,
    *,
    tenant: str,
    status: JobStatus | None = None,
    kind: str | None = None,
    limit: int = 50,
    cursor: str | None = None,
) -> tuple[list[Job], str | None]:
    """A page of the tenant's jobs, newest first, without their params and result (deferred:
    read them with `job_payloads`, a few at a time), and the cursor after it (None on the last)."""
    stmt = select(Job).options(defer(Job.params), defer(Job.result)).where(Job.tenant == tenant)
    if status is not None:
        stmt = stmt.where(Job.status == status)
    if kind is not None:
        stmt = stmt.where(Job.kind == kind)
    if cursor is not None:
        created, last_id = decode_cursor(cursor)
        stmt = stmt.where(or_(Job.created_at < created, and_(Job.created_at == created, Job.id < last_id)))
    stmt = stmt.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)
    rows = list(session.scalars(stmt))
    next_cursor = None
    if len(rows) > limit:
        rows = rows[:limit]
        next_cursor = encode_cursor(rows[-1].created_at, rows[-1].id)
    return rows, next_cursor


PAYLOAD_COLUMNS = {"input": Job.params, "result": Job.result}


def job_payloads(
    session: Session, job_ids: Sequence[uuid.UUID], fields: Sequence[str]
) -> dict[uuid.UUID, dict[str, Any]]:
    """{job id: {field: value}} for `fields` among "input" (the params) and "result", read as
    plain columns (kept out of the session's identity map, so freed once serialised)."""
    columns = [PAYLOAD_COLUMNS[f] for f in fields]
    rows = session.execute(select(Job.id, Job.tenant, *columns).where(Job.id.in_(list(job_ids))))
    bind = session.get_bind()
    return {
        job_id: {
            field: open_column(bind, Job, tenant, job_id, PAYLOAD_COLUMNS[field].key, value)
            for field, value in zip(fields, values, strict=True)
        }
        for job_id, tenant, *values in rows
    }


def is_cancel_requested(session: Session, job_id: uuid.UUID) -> bool:
    return bool(session.scalar(select(Job.cancel_requested).where(Job.id == job_id)))


def count_jobs(session: Session) -> list[tuple[str, JobStatus, int]]:
    """(kind, status, count) for every kind and status present, for metrics."""
    rows = session.execute(select(Job.kind, Job.status, func.count()).group_by(Job.kind, Job.status))
    return [(kind, status, int(n)) for kind, status, n in rows]


def job_tenants(session: Session, job_ids: Sequence[uuid.UUID]) -> list[str]:
    """The tenant of each of these jobs (one name per job found)."""
    return list(session.scalars(select(Job.tenant).where(Job.id.in_(job_ids))))
