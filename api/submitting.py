"""Group commit of submissions: concurrent `POST /v1/jobs` requests of one API process share one
multi-row INSERT, one commit and one round of publishing, as the worker's jobs share a forward pass.

A request that finds no commit under way starts one at once, with only its own jobs: a lone
request never waits for company. Requests that arrive while a commit is under way wait for it to
end and then go together in the next one. Each request is answered when its group is committed
(and published): 202 still means committed. If the group's commit fails, every request in it
fails alike (503) and none of its jobs is stored, since they were one transaction.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import Counter

from fastapi import HTTPException
from fastapi.concurrency import run_in_threadpool
from prometheus_client import Gauge, Histogram
from sqlalchemy.orm import Session

from api.metrics import ApiMetrics
from db.batching import BatchKey, key_of
from db.jobs import insert_jobs, mark_unpublished
from db.models import Job
from db.session import AsyncSessions
from tasks.registry import get_kind
from tensorq.core.active_jobs import ActiveJobCounter
from tensorq.core.broker import Publisher
from tensorq.core.settings import Settings

log = logging.getLogger(__name__)

GROUP_JOBS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class CommitFailed(HTTPException):
    def __init__(self) -> None:
        super().__init__(
            status_code=503,
            detail="the job could not be stored (database unavailable); nothing was stored, try again",
            headers={"Retry-After": "1"},
        )


def message_groups(jobs: list[Job], max_texts: int) -> list[tuple[str, list[str], str]]:
    """Jobs submitted together that a worker would put in one batch anyway (`db.batching`'s rule,
    up to `max_texts` texts) go out as one message naming them all: a message per job made the
    worker consume, and acknowledge, a message for every job a batch had already finished.
    Everything else is one message per job."""
    open_groups: dict[BatchKey, tuple[list[str], int]] = {}  # -> (ids, texts)
    messages: list[tuple[str, list[str], str]] = []
    for job in jobs:
        kind = get_kind(job.kind)
        if kind.run_batch is None or max_texts <= 1:
            messages.append((kind.task_name, [str(job.id)], job.queue))
            continue
        cost = kind.batch_cost(kind.params.model_construct(**job.params))
        key = key_of(job, reads_tenant_data=True)  # a message names one tenant's jobs, whatever the kind
        ids, texts = open_groups.get(key, ([], 0))
        if not ids or texts + cost > max_texts:
            ids, texts = [], 0
            messages.append((kind.task_name, ids, job.queue))
        ids.append(str(job.id))
        open_groups[key] = (ids, texts + cost)
    return messages


def publish_after_commit(session: Session, publisher: Publisher, jobs: list[Job], max_texts: int = 1) -> None:
    """The rows are committed; if the broker is away they stay queued for the sweeper to publish."""
    try:
        publisher.publish_groups(message_groups(jobs, max_texts))
    except Exception as exc:
        log_unpublished(jobs, exc)
        mark_unpublished(session, [job.id for job in jobs])
        session.commit()


def log_unpublished(jobs: list[Job], exc: Exception) -> None:
    log.warning(
        "publish failed for %d job(s), left for the sweeper: %s",
        len(jobs),
        exc,
        extra={"job_id": str(jobs[0].id)},
    )


def insert_committed(session: Session, jobs: list[Job]) -> None:
    insert_jobs(session, jobs)
    session.commit()


def _unpublished_committed(session: Session, job_ids: list[uuid.UUID]) -> None:
    mark_unpublished(session, job_ids)
    session.commit()


class GroupCommit:
    """One per API process (app.state.group_commit). `sizes` observes the jobs of each commit."""

    def __init__(
        self,
        settings: Settings,
        db: AsyncSessions,
        publisher: Publisher,
        metrics: ApiMetrics,
        active_jobs: ActiveJobCounter,
    ) -> None:
        self.settings = settings
        self.db = db
        self.active_jobs = active_jobs
        self.publisher = publisher
        self.metrics = metrics
        self.sizes = Histogram(
            "tensorq_submit_group_jobs",
            "Jobs stored by one group commit of POST /v1/jobs (concurrent requests coalesced)",
            buckets=GROUP_JOBS,
            registry=metrics.registry,
        )
        self.waiting = Gauge(
            "tensorq_submit_waiting_requests",
            "POST /v1/jobs requests waiting for a group commit to start (one is under way)",
            registry=metrics.registry,
        )
        self._waiting: list[tuple[list[Job], asyncio.Future[None]]] = []
        self._committing = False

    async def commit(self, jobs: list[Job]) -> None:
        """Store `jobs` (built by `db.jobs.new_job`) with whatever other requests are waiting;
        returns once they are committed and published, raises CommitFailed if not stored."""
        done = asyncio.get_running_loop().create_future()
        self._waiting.append((jobs, done))
        if self._committing:
            self.waiting.inc()
        else:
            self._committing = True
            # A task of its own, so a request that goes away (its client disconnected) does not
            # take the commit of the others with it.
            asyncio.get_running_loop().create_task(self._drain())
        await asyncio.shield(done)

    async def _drain(self) -> None:
        try:
            while self._waiting:
                group, self._waiting = self._waiting, []
                self.waiting.set(0)
                jobs = [job for jobs, _ in group for job in jobs]
                try:
                    await self._store(jobs)
                except Exception as exc:
                    log.warning("group commit of %d job(s) failed; none stored: %s", len(jobs), exc)
                    # Admitted (counted as active) but not stored.
                    await run_in_threadpool(self.active_jobs.finished, [job.tenant for job in jobs])
                    for _, done in group:
                        if not done.done():
                            done.set_exception(CommitFailed())
                    continue
                for _, done in group:
                    if not done.done():
                        done.set_result(None)
        finally:
            self._committing = False

    async def _store(self, jobs: list[Job]) -> None:
        """One INSERT and its commit on the event loop (the async driver), then the messages.
        Celery's producer is synchronous: publishing is the one thread hop, once per group."""
        s = self.settings
        if len(jobs) <= self.db.rows_per_insert:
            # One statement, atomic by itself: sent in autocommit, one round trip, not three.
            await self.db.run_one_statement(insert_committed, jobs)
        else:  # several INSERT statements: one transaction around them
            await self.db.run(insert_committed, jobs)
        self.sizes.observe(len(jobs))
        messages = message_groups(jobs, s.batch_max_texts if s.batching else 1)
        try:
            await run_in_threadpool(self.publisher.publish_groups, messages)
        except Exception as exc:
            log_unpublished(jobs, exc)
            try:
                await self.db.run(_unpublished_committed, [job.id for job in jobs])
            except Exception as mark_exc:  # stored all the same: the sweeper's republishing finds them
                log.warning("jobs not marked unpublished: %s", mark_exc, extra={"job_id": str(jobs[0].id)})
        for kind, n in Counter(job.kind for job in jobs).items():
            self.metrics.submitted.labels(kind).inc(n)
