"""Webhook delivery state of finished jobs: pending -> delivered | failed.

A job submitted with a webhook starts `pending`; once its status is final, a dispatcher takes it
with `claim_due_webhooks` (which pushes `webhook_next_at` out by a lease, so another API replica
does not send it at the same time), POSTs it, and records the attempt.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from db.locking import pick_for_update
from db.models import Job, JobStatus, WebhookState, utcnow

TERMINAL = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


def claim_due_webhooks(session: Session, *, limit: int, lease_seconds: float) -> list[Job]:
    now = utcnow()
    due = (
        select(Job.id)
        .where(
            Job.webhook_state == WebhookState.PENDING,
            Job.status.in_(TERMINAL),
            or_(Job.webhook_next_at.is_(None), Job.webhook_next_at <= now),
        )
        .order_by(Job.finished_at)
        .limit(limit)
    )
    due = pick_for_update(session.get_bind().dialect.name, due, "due_webhooks")
    stmt = (
        update(Job)
        .where(Job.id.in_(due), Job.webhook_state == WebhookState.PENDING)
        .values(webhook_next_at=now + timedelta(seconds=lease_seconds))
        .returning(Job)
        .execution_options(synchronize_session=False, populate_existing=True)
    )
    return list(session.scalars(stmt))


def record_webhook_attempt(
    session: Session, job_id: uuid.UUID, *, error: str | None, retry_at: datetime | None
) -> None:
    """Delivered when `error` is None; else retried at `retry_at`, or failed for good without one."""
    if error is None:
        state, next_at = WebhookState.DELIVERED, None
    elif retry_at is not None:
        state, next_at = WebhookState.PENDING, retry_at
    else:
        state, next_at = WebhookState.FAILED, None
    session.execute(
        update(Job)
        .where(Job.id == job_id, Job.webhook_state == WebhookState.PENDING)
        .values(
            webhook_state=state,
            webhook_next_at=next_at,
            webhook_attempts=Job.webhook_attempts + 1,
            webhook_error=error,
        )
        .execution_options(synchronize_session=False)
    )
