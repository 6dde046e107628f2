"""The job state machine: every write of `status` happens here, as a conditional UPDATE.

    queued --claim--> running --finish--> succeeded | failed | cancelled
    queued --cancel--> cancelled
    running (lease expired) --reap--> queued (attempts left) | failed (no attempts left)

A worker's writes carry the claim token it got from `claim_job`; a write whose token no longer
matches (the lease expired and someone else claimed the job) changes nothing and returns False.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any, NamedTuple, cast

from sqlalchemy import (
    ColumnElement,
    Integer,
    Table,
    and_,
    bindparam,
    column,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Session

from db.batching import KEY_COLUMNS, BatchKey, same_batch
from db.keys import keyring_for
from db.locking import pick_for_update
from db.models import Job, JobStatus, WebhookState, utcnow
from db.queries import get_job
from db.sealing import object_name, seal_json, seal_text


@dataclass(frozen=True)
class Outcome:
    """The final state a worker wants to write for one claimed job."""

    job_id: uuid.UUID
    claim_token: uuid.UUID
    status: JobStatus
    # Plaintext; `sealed_outcomes` makes the copies whose result is the stored (sealed) text.
    result: dict[str, Any] | None = None
    error_type: str | None = None
    error_message: str | None = None
    metrics: dict[str, Any] | None = None
    # Whose job it is: its result and error are sealed with that tenant's data key. Unknown (""):
    # read from the row first.
    tenant: str = ""


def _failed(now: datetime, error_type: str, message: str) -> dict[str, Any]:
    """The column values of a job ending `failed` outside a worker's normal final write."""
    return {
        "status": JobStatus.FAILED,
        "error_type": error_type,
        "error_message": message,
        "finished_at": now,
        "updated_at": now,
        "lease_expires_at": None,
    }


def _requeued(now: datetime, published_at: datetime | None) -> dict[str, Any]:
    """The column values of a job going back to `queued` (its attempt still counts)."""
    return {
        "status": JobStatus.QUEUED,
        "claim_token": None,
        "lease_expires_at": None,
        "published_at": published_at,
        "updated_at": now,
    }


def create_job(session: Session, **fields: Any) -> Job:
    """A new queued job (`new_job`'s fields), added to the session: stored by its next flush."""
    job = new_job(**fields)
    session.add(job)
    return job


def new_job(
    *,
    tenant: str,
    kind: str,
    params: dict[str, Any],
    queue: str,
    max_attempts: int,
    model: str | None = None,
    webhook_url: str | None = None,
    job_id: uuid.UUID | None = None,
    batch_cost: int = 1,
    model_version: int | None = None,
    shadow_version: int | None = None,
) -> Job:
    """The row of a new queued job, in no session: every job row is built here (`create_job`
    adds one to a session; `insert_jobs` stores many in one statement)."""
    now = utcnow()
    # published_at is set optimistically: the caller publishes right after commit and clears it
    # with `mark_unpublished` if that fails; the sweeper covers a crash in between.
    return Job(
        id=job_id or uuid.uuid4(),
        tenant=tenant,
        kind=kind,
        model=model,
        model_version=model_version,
        shadow_version=shadow_version,
        queue=queue,
        status=JobStatus.QUEUED,
        params=params,
        batch_cost=max(1, batch_cost),
        attempts=0,
        max_attempts=max_attempts,
        cancel_requested=False,
        created_at=now,
        updated_at=now,
        published_at=now,
        webhook_url=webhook_url,
        webhook_state=WebhookState.PENDING if webhook_url else None,
        webhook_attempts=0,
    )


def insert_jobs(session: Session, jobs: Sequence[Job]) -> None:
    """Store jobs built by `new_job` with one multi-row INSERT in the caller's transaction (the
    API's group commit). They stay out of the session. RETURNING makes SQLAlchemy send one
    `INSERT ... VALUES (...), (...)` ("insertmanyvalues"), where psycopg's executemany would send
    a statement per row."""
    if not jobs:
        return
    attrs = [(a.key, a.columns[0].key) for a in _job_mapper().column_attrs]
    keyring = keyring_for(session.get_bind().engine)
    rows = []
    for job in jobs:
        given = job.__dict__
        row = {name: given[key] for key, name in attrs if key in given}
        # The ORM's flush would seal the params (db/sealing.py); this INSERT bypasses it.
        cipher = keyring.cipher(job.tenant, session.connection())
        row["params"] = seal_json(cipher, object_name("jobs", job.id, "params"), job.params)
        rows.append(row)
    stored = session.execute(_insert_statement(), rows).scalars().all()
    if len(stored) != len(jobs):
        raise RuntimeError(f"{len(jobs)} jobs inserted, {len(stored)} stored")


@lru_cache(maxsize=1)
def _job_mapper() -> Any:
    return sa_inspect(Job)


@lru_cache(maxsize=1)
def _insert_statement() -> Any:
    table = cast(Table, Job.__table__)
    return insert(table).returning(table.c.id)


def mark_unpublished(session: Session, job_ids: Sequence[uuid.UUID]) -> None:
    session.execute(
        update(Job)
        .where(Job.id.in_(job_ids), Job.status == JobStatus.QUEUED)
        .values(published_at=None)
        .execution_options(synchronize_session=False)
    )


def mark_published(session: Session, job_ids: Sequence[uuid.UUID]) -> None:
    session.execute(
        update(Job)
        .where(Job.id.in_(job_ids), Job.status == JobStatus.QUEUED)
        .values(published_at=utcnow())
        .execution_options(synchronize_session=False)
    )


def _claimable(now: datetime | ColumnElement[Any]) -> ColumnElement[bool]:
    return and_(
        Job.cancel_requested.is_(False),
        Job.attempts < Job.max_attempts,
        or_(
            Job.status == JobStatus.QUEUED,
            and_(Job.status == JobStatus.RUNNING, Job.lease_expires_at < now),
        ),
    )


@dataclass(frozen=True)
class Claimant:
    """Who claims: the worker's name, its device, and how long its lease runs between heartbeats."""

    worker: str
    device: str
    lease_seconds: float


@dataclass(frozen=True)
class Fill:
    """Queued jobs to claim beside the named ones for a batch: those that may share their forward
    pass (`db.batching`), oldest first, while the batch costs of all claimed jobs add up to at most
    `max_cost`. `like` names the batch (a top-up); None means like the first named job, of the
    same tenant unless `same_tenant` is False."""

    max_cost: int
    like: BatchKey | None = None
    same_tenant: bool = True


def claim_job(
    session: Session, job_id: uuid.UUID, *, worker: str, device: str, lease_seconds: float
) -> Job | None:
    """Take a queued job (or one whose holder's lease expired). None if it is not claimable."""
    jobs = claim_jobs(session, [job_id], Claimant(worker, device, lease_seconds))
    return jobs[0] if jobs else None


def claim_jobs(
    session: Session, named: Sequence[uuid.UUID], claimant: Claimant, fill: Fill | None = None
) -> list[Job]:
    """Claim the `named` jobs (a message names one, or a group) whatever their cost and, with
    `fill`, more queued jobs for their batch, in one statement. Jobs another worker is claiming
    right now are skipped (SKIP LOCKED on PostgreSQL; SQLite has a single writer). The first named
    job, if claimed, comes first; the rest oldest first."""
    others = fill is not None and fill.max_cost > 0
    if not named and not others:
        return []
    like = fill.like if fill is not None else None
    if not named and like is None:
        raise ValueError("a fill without named jobs needs the batch it fills (`like`)")
    same_tenant = like.tenant is not None if like is not None else (fill is None or fill.same_tenant)
    now = utcnow()
    stmt = _claim_statement(
        session.get_bind().dialect.name,
        named=min(len(named), 2),  # none, one, or a group: three shapes
        others=others,
        like_job=like is None,
        same_tenant=same_tenant,
    )
    params: dict[str, Any] = {
        "job_id": named[0] if named else None,
        "named_ids": list(named),
        "now": now,
        "p_claim_token": uuid.uuid4(),
        "p_worker": claimant.worker,
        "p_device": claimant.device,
        "lease_until": now + timedelta(seconds=claimant.lease_seconds),
        "fill_to_cost": fill.max_cost if fill is not None else 0,
    }
    if like is not None:
        params.update({f"p_{name}": getattr(like, name) for name in KEY_COLUMNS})
    jobs = list(session.scalars(stmt, params))  # parameters the statement lacks are ignored
    first = named[0] if named else None
    jobs.sort(key=lambda j: (j.id != first, j.created_at))
    return jobs


@lru_cache(maxsize=64)
def _claim_statement(dialect: str, *, named: int, others: bool, like_job: bool, same_tenant: bool) -> Any:
    """The claim UPDATE of `claim_jobs` for one shape of call, built once, values as parameters:
    building and cache-keying it anew was a millisecond of every claim."""
    c = Job.__table__.c
    now = bindparam("now", type_=c.started_at.type)
    job_id = bindparam("job_id", type_=c.id.type)
    named_ids = bindparam("named_ids", expanding=True, type_=c.id.type)
    conditions = []
    if named:
        conditions.append(and_(Job.id.in_(named_ids) if named > 1 else Job.id == job_id, _claimable(now)))
    if others:

        def value_of(name: str) -> Any:
            if like_job:
                return select(c[name]).where(Job.id == job_id).scalar_subquery()
            return bindparam(f"p_{name}", type_=c[name].type)

        fill_to_cost = bindparam("fill_to_cost", type_=Integer)
        candidates = (
            select(Job.id, Job.batch_cost, Job.created_at)
            .where(
                Job.status == JobStatus.QUEUED,
                Job.cancel_requested.is_(False),
                *same_batch(value_of, same_tenant),
            )
            .order_by(Job.created_at, Job.id)
            .limit(fill_to_cost)  # every job costs at least 1
        )
        budget: Any = fill_to_cost
        if named:  # the named jobs are in the batch already: they take neither places nor budget twice
            candidates = candidates.where(Job.id.not_in(named_ids))
            named_cost = select(func.coalesce(func.sum(Job.batch_cost), 0)).where(Job.id.in_(named_ids))
            budget = fill_to_cost - named_cost.scalar_subquery()
        locked = pick_for_update(dialect, candidates, "claimable").subquery("candidates")
        filled = select(
            locked.c.id,
            func.sum(locked.c.batch_cost).over(order_by=(locked.c.created_at, locked.c.id)).label("filled"),
        ).subquery("filled")
        picked = select(filled.c.id).where(filled.c.filled <= budget)
        conditions.append(and_(Job.id.in_(picked), Job.status == JobStatus.QUEUED))
    return (
        update(Job)
        .where(or_(*conditions))
        .values(
            status=JobStatus.RUNNING,
            # A fresh token per claim statement: the holder's later writes must match (id, token).
            claim_token=bindparam("p_claim_token", type_=c.claim_token.type),
            attempts=Job.attempts + 1,
            worker=bindparam("p_worker", type_=c.worker.type),
            device=bindparam("p_device", type_=c.device.type),
            started_at=now,
            lease_expires_at=bindparam("lease_until", type_=c.lease_expires_at.type),
            updated_at=now,
        )
        .returning(Job)
        # populate_existing: a Job already in this session's identity map gets the claimed values.
        .execution_options(synchronize_session=False, populate_existing=True)
    )


def extend_leases(
    session: Session, claims: Sequence[tuple[uuid.UUID, uuid.UUID]], *, lease_seconds: float
) -> dict[uuid.UUID, bool]:
    """Heartbeat for jobs still held: the ids of the claims that still hold (the job is running
    under that token), each with whether its cancellation was requested. A claim left out was lost:
    its lease ran out and the job was reaped, and may have been claimed again."""
    if not claims:
        return {}
    now = utcnow()
    held = or_(*(and_(Job.id == job_id, Job.claim_token == token) for job_id, token in claims))
    rows = session.execute(
        update(Job)
        .where(held, Job.status == JobStatus.RUNNING)
        .values(lease_expires_at=now + timedelta(seconds=lease_seconds))
        .returning(Job.id, Job.cancel_requested)
        .execution_options(synchronize_session=False)
    )
    return {job_id: bool(cancel) for job_id, cancel in rows}


def update_progress(
    session: Session, job_id: uuid.UUID, claim_token: uuid.UUID, progress: dict[str, Any]
) -> bool:
    res = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.claim_token == claim_token, Job.status == JobStatus.RUNNING)
        .values(progress=progress, updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    return bool(res.rowcount)  # type: ignore[attr-defined]


def finish_jobs(session: Session, outcomes: Sequence[Outcome]) -> set[uuid.UUID]:
    """Write final states in the caller's transaction; returns the ids that were still held.

    error_type/error_message are always overwritten, so a transient error from an earlier attempt
    does not linger on a job that then succeeds."""
    for o in outcomes:
        if not o.status.terminal:
            raise ValueError(f"not a final state: {o.status}")
    if not outcomes:
        return set()
    outcomes = sealed_outcomes(session, outcomes)
    now = utcnow()
    if len(outcomes) > 1 and session.get_bind().dialect.name == "postgresql":
        # One UPDATE for a whole batch: an UPDATE per job cost the worker about a fifth of its
        # time at full batches (py-spy, 64-job batches).
        rows = [
            {
                "id": str(o.job_id),
                "claim_token": str(o.claim_token),
                "status": o.status.value,
                "result": o.result,
                "error_type": o.error_type,
                "error_message": o.error_message,
                "metrics": o.metrics,
            }
            for o in outcomes
        ]
        return set(session.scalars(_finish_batch_statement(), {"final_rows": rows, "now": now}))
    # One job, or SQLite (single writer, no jsonb_to_recordset): an UPDATE per job.
    return {o.job_id for o in outcomes if finish_job(session, o, now) is not None}


def finish_job(session: Session, outcome: Outcome, now: datetime | None = None) -> dict[str, Any] | None:
    """Write one job's final state in the caller's transaction: the row as written (every
    column, by name), or None when the job was no longer held by `outcome.claim_token`."""
    if not outcome.status.terminal:
        raise ValueError(f"not a final state: {outcome.status}")
    (o,) = sealed_outcomes(session, [outcome])
    row = session.execute(
        _finish_statement(),
        {
            "job_id": o.job_id,
            "p_claim_token": o.claim_token,
            "p_status": o.status,
            "p_result": o.result,
            "p_error_type": o.error_type,
            "p_error_message": o.error_message,
            "p_metrics": o.metrics,
            "now": now or utcnow(),
        },
    ).first()
    return None if row is None else dict(row._mapping)


def sealed_outcomes(session: Session, outcomes: Sequence[Outcome]) -> list[Outcome]:
    """The outcomes with result and error message sealed for their tenants (db/sealing.py)."""
    unknown = [o.job_id for o in outcomes if not o.tenant]
    tenants: dict[uuid.UUID, str] = {}
    if unknown:
        tenants = dict(session.execute(select(Job.id, Job.tenant).where(Job.id.in_(unknown))).tuples().all())
    keyring = keyring_for(session.get_bind().engine)
    sealed = []
    for o in outcomes:
        tenant = o.tenant or tenants.get(o.job_id)
        if tenant is None:  # no such job: the UPDATE matches nothing either
            sealed.append(o)
            continue
        cipher = keyring.cipher(tenant, session.connection())
        sealed.append(
            dataclasses.replace(
                o,
                tenant=tenant,
                result=cast(Any, seal_json(cipher, object_name("jobs", o.job_id, "result"), o.result)),
                error_message=seal_text(
                    cipher, object_name("jobs", o.job_id, "error_message"), o.error_message
                ),
            )
        )
    return sealed


def _final_state() -> dict[str, Any]:
    now = bindparam("now", type_=Job.__table__.c.finished_at.type)
    return {"finished_at": now, "updated_at": now, "lease_expires_at": None}


# The finishing UPDATEs are built once, values as parameters (as the claim's, and for its reason).
@lru_cache(maxsize=1)
def _finish_statement() -> Any:
    c = Job.__table__.c
    return (
        update(Job)
        .where(
            Job.id == bindparam("job_id", type_=c.id.type),
            Job.claim_token == bindparam("p_claim_token", type_=c.claim_token.type),
            Job.status == JobStatus.RUNNING,
        )
        .values(
            status=bindparam("p_status", type_=c.status.type),
            result=bindparam("p_result", type_=c.result.type),
            error_type=bindparam("p_error_type", type_=c.error_type.type),
            error_message=bindparam("p_error_message", type_=c.error_message.type),
            metrics=bindparam("p_metrics", type_=c.metrics.type),
            **_final_state(),
        )
        # The whole row: a lone job's committed state travels with its finished event (db.snapshots).
        .returning(*c)
        .execution_options(synchronize_session=False)
    )


@lru_cache(maxsize=1)
def _finish_batch_statement() -> Any:
    """The rows travel as one JSON parameter, so the statement is the same for every batch size
    (compiled once, prepared by the driver)."""
    c = Job.__table__.c
    columns = (c.id, c.claim_token, c.status, c.result, c.error_type, c.error_message, c.metrics)
    final = (
        func.jsonb_to_recordset(bindparam("final_rows", type_=JSONB))
        .table_valued(*(column(col.name, col.type) for col in columns))
        .render_derived(name="final", with_types=True)
    )
    return (
        update(Job)
        .where(Job.id == final.c.id, Job.claim_token == final.c.claim_token, Job.status == JobStatus.RUNNING)
        .values(
            status=final.c.status,
            result=final.c.result,
            error_type=final.c.error_type,
            error_message=final.c.error_message,
            metrics=final.c.metrics,
            **_final_state(),
        )
        .returning(Job.id)
        .execution_options(synchronize_session=False)
    )


def release_job(
    session: Session, job_id: uuid.UUID, claim_token: uuid.UUID, *, error_type: str, message: str
) -> JobStatus | None:
    """Give a claimed job back to the queue after a transient failure (its attempt still counts).

    The caller publishes it again with a backoff delay; published_at is set so the sweeper does
    not republish it before that. Out of attempts, the job fails instead. Returns the state the
    job was put in (QUEUED or FAILED), or None if the claim no longer held.
    """
    now = utcnow()
    held = and_(Job.id == job_id, Job.claim_token == claim_token, Job.status == JobStatus.RUNNING)
    res = session.execute(
        update(Job)
        .where(held, Job.attempts < Job.max_attempts)
        .values(**_requeued(now, published_at=now), error_type=error_type, error_message=message)
        .execution_options(synchronize_session=False)
    )
    if res.rowcount:  # type: ignore[attr-defined]
        return JobStatus.QUEUED
    res = session.execute(
        update(Job)
        .where(held)
        .values(**_failed(now, error_type, no_attempts_left(message)))
        .execution_options(synchronize_session=False)
    )
    return JobStatus.FAILED if res.rowcount else None  # type: ignore[attr-defined]


def no_attempts_left(message: str) -> str:
    return f"{message} (transient, but no attempts are left)"


def cancel_job(session: Session, job_id: uuid.UUID, tenant: str) -> tuple[Job | None, bool]:
    """Cancel a queued job at once; ask a running one to stop. Terminal jobs are left as they are.
    Returns the job and whether this call cancelled it: a job found cancelled may have been
    cancelled earlier (or by a concurrent call), which is not the same answer to the caller."""
    now = utcnow()
    cancelled = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.tenant == tenant, Job.status == JobStatus.QUEUED)
        .values(status=JobStatus.CANCELLED, cancel_requested=True, finished_at=now, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    session.execute(
        update(Job)
        .where(Job.id == job_id, Job.tenant == tenant, Job.status == JobStatus.RUNNING)
        .values(cancel_requested=True, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    return get_job(session, job_id, tenant), bool(cancelled.rowcount)  # type: ignore[attr-defined]


def fail_held_job(session: Session, job_id: uuid.UUID, *, worker: str, error_type: str, message: str) -> bool:
    """Fail a running job held by `worker` whose process is gone (the claim token died with it).

    Used by the worker's parent process when Celery kills a child at the hard time limit.
    """
    now = utcnow()
    res = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.RUNNING, Job.worker == worker)
        .values(**_failed(now, error_type, message))
        .execution_options(synchronize_session=False)
    )
    return bool(res.rowcount)  # type: ignore[attr-defined]


class Reaped(NamedTuple):
    requeued: list[uuid.UUID]  # left unpublished, for the sweeper
    failed: list[uuid.UUID]
    cancelled: list[uuid.UUID]  # their cancellation had been requested


def reap_expired_leases(session: Session) -> Reaped:
    """Running jobs whose worker stopped heartbeating: requeue them, or fail them when out of
    attempts, or cancel them when that was asked for."""
    now = utcnow()
    expired = and_(Job.status == JobStatus.RUNNING, Job.lease_expires_at < now)
    cancelled = session.execute(
        update(Job)
        .where(expired, Job.cancel_requested.is_(True))
        .values(status=JobStatus.CANCELLED, finished_at=now, updated_at=now, lease_expires_at=None)
        .returning(Job.id)
        .execution_options(synchronize_session=False)
    )
    cancelled_ids = list(cancelled.scalars())
    failed = session.execute(
        update(Job)
        .where(expired, Job.attempts >= Job.max_attempts)
        .values(
            **_failed(
                now,
                "WorkerLost",
                "the worker running this job stopped (no heartbeat within the lease) and no attempts are left",
            )
        )
        .returning(Job.id)
        .execution_options(synchronize_session=False)
    )
    failed_ids = list(failed.scalars())
    requeued = session.execute(
        update(Job)
        .where(expired, Job.attempts < Job.max_attempts)
        .values(**_requeued(now, published_at=None))
        .returning(Job.id)
        .execution_options(synchronize_session=False)
    )
    return Reaped(list(requeued.scalars()), failed_ids, cancelled_ids)
