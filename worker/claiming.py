"""Claiming a message's jobs, and topping a batch up from the queue while it is flowing."""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from db.batching import key_of
from db.jobs import Claimant, Fill, claim_jobs
from db.models import Job
from db.session import one_statement
from tasks.registry import JobKind
from tensorq.core.settings import Settings
from worker.retry import is_transient, with_retries

log = logging.getLogger(__name__)


class Claimer:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.database_url = settings.sqlalchemy_url

    def claimant(self, worker_name: str) -> Claimant:
        return Claimant(worker_name, self.settings.worker_device, self.settings.lease_seconds)

    def claim(
        self, kind: JobKind[Any, Any], named: list[uuid.UUID], worker_name: str, batches: bool
    ) -> list[Job]:
        """The named jobs and, when the kind batches here, queued jobs that fit their batch."""
        fill = Fill(self.settings.batch_max_texts, same_tenant=kind.reads_tenant_data) if batches else None

        def claim() -> list[Job]:
            with one_statement(self.database_url) as session:  # one UPDATE ... RETURNING
                return claim_jobs(session, named, self.claimant(worker_name), fill)

        return with_retries(claim, what=f"claim job {named[0]}")

    def top_up(self, kind: JobKind[Any, Any], jobs: list[Job], worker_name: str, batches: bool) -> list[Job]:
        """More jobs for a batch that is not full while the queue is flowing, after one short wait.

        An optimisation: when the claim fails even after its retries, the batch goes ahead with the
        jobs it has, which are held already and must not wait out their leases for it."""
        s = self.settings
        texts = sum(j.batch_cost for j in jobs)
        if not batches or len(jobs) == 1 or s.batch_max_wait_ms <= 0 or texts >= s.batch_max_texts:
            return []
        first = jobs[0]
        # The queue is flowing: give the batch one short wait to fill.
        time.sleep(s.batch_max_wait_ms / 1000)
        fill = Fill(s.batch_max_texts - texts, like=key_of(first, kind.reads_tenant_data))

        def claim() -> list[Job]:
            with one_statement(self.database_url) as session:  # one UPDATE ... RETURNING
                return claim_jobs(session, [], self.claimant(worker_name), fill)

        try:
            return with_retries(claim, what=f"top up the batch of job {first.id}")
        except Exception as exc:
            log.warning(
                "job %s: batch top-up failed (%s: %s); going ahead with the %d jobs claimed",
                first.id,
                type(exc).__name__,
                exc,
                len(jobs),
                exc_info=not is_transient(exc),
            )
            return []
