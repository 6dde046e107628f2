"""claim -> run the job kind -> commit the final state. Celery acks the message after this returns.

Inference kinds that can batch are run with dynamic micro-batching: the job a message names is
claimed together with other queued jobs that may share its forward pass (`db.batching`), up to
`batch_max_texts` texts; if the queue is flowing but the batch is not full, the runner waits up to
`batch_max_wait_ms` once for more. A lone job (nothing else queued) is never held. All final states
of a batch are written in one transaction. Messages for jobs that joined another message's batch
find them finished (or held by a live lease) and are acknowledged as duplicates.

The steps live apart: `claiming`, `executing` (with `job_context`, what kinds see) and `committing`;
after the commit, `shadowing` runs jobs their alias picked on its shadow version too.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence

from db.jobs import Outcome
from db.models import Job, JobStatus
from tasks.context import JobContext
from tasks.registry import get_kind
from tensorq.core.active_jobs import ActiveJobCounter
from tensorq.core.artifacts import ArtifactStore
from tensorq.core.events import EventPublisher
from tensorq.core.settings import Settings
from worker import metrics
from worker.claiming import Claimer
from worker.committing import Committer, Republish, finished_info
from worker.executing import Executor
from worker.finished import RecentlyFinished
from worker.job_context import JobContexts
from worker.leases import LeaseKeeper
from worker.model_cache import ModelCache
from worker.retry import with_retries
from worker.shadowing import Shadows

log = logging.getLogger(__name__)


class Runner:
    def __init__(
        self,
        settings: Settings,
        republish: Republish | None = None,
        timeout_errors: tuple[type[BaseException], ...] = (),
    ) -> None:
        self.settings = settings
        self.device = settings.worker_device
        self.models = ModelCache(settings.model_cache_bytes)
        self.leases = LeaseKeeper(settings.sqlalchemy_url, settings.lease_seconds)
        self.finished_in_batches = RecentlyFinished()
        self.events = EventPublisher(settings.redis_url)
        self.active_jobs = ActiveJobCounter(settings.redis_url)
        store = ArtifactStore(settings.artifact_dir)
        self.contexts = JobContexts(settings, self.models, self.leases, self.events, store)
        self.claimer = Claimer(settings)
        self.executor = Executor(settings, self.contexts, timeout_errors)
        self.committer = Committer(settings.sqlalchemy_url, store, republish)
        self.shadows = Shadows(settings.sqlalchemy_url, self.contexts)

    def context(self, tenant: str | None) -> JobContext:
        return self.contexts.shared(tenant)

    def run(
        self, kind_name: str, job_id: str, worker_name: str, also: Sequence[str] = ()
    ) -> JobStatus | None:
        """Run the job a message names, and the others it names with it (`also`), with a batch
        around them when the kind batches.

        Returns the job's final status, or None when there was nothing for this message to do.
        """
        jid = uuid.UUID(job_id)
        named = [i for i in (jid, *map(uuid.UUID, also)) if i not in self.finished_in_batches]
        if not named:
            log.debug("job %s: already finished in a batch here", job_id)
            return None
        kind = get_kind(kind_name)
        batches = self.executor.batches(kind)
        jobs = self.claimer.claim(kind, named, worker_name, batches)
        if not jobs or jobs[0].id != named[0]:
            log.info("job %s: not claimable (finished, cancelled, or held by a live worker)", named[0])
            if not jobs:
                return None
        self.hold(jobs)
        try:
            more = self.claimer.top_up(kind, jobs, worker_name, batches)
            self.hold(more)
            jobs += more
            self.events.changed((job.id for job in jobs), running=True)
            if len(jobs) > 1 and batches:
                outcomes = self.executor.execute_batch(kind, jobs)
            else:  # one job, or a named group with batching switched off here
                outcomes = [self.executor.execute(kind, job) for job in jobs]
            outcomes = self.drop_lost(outcomes)
            tenants = {job.id: job.tenant for job in jobs}
            outcomes, written, rows = with_retries(
                lambda: self.committer.commit(kind, outcomes, tenants), what=f"finish job {jid}"
            )
            self.committer.clean_work_dirs([o for o in outcomes if o.job_id in written])
            self.events.changed(
                written,
                finished=finished_info(jobs, outcomes, written),
                final=True,
                rows=rows,
                # Final: no longer active. Taken off in the event's round trip, and before it.
                along=lambda pipe: self.active_jobs.finished((tenants[job_id] for job_id in written), pipe),
            )
            for o in outcomes:
                if o.job_id in written:
                    metrics.jobs_finished.labels(kind.name, o.status.value).inc()
        finally:
            metrics.in_flight.dec(len(jobs))
            for job in jobs:
                self.leases.release(job.id)
        # The jobs are final and announced: now the rollout's guards, then shadow runs.
        self.committer.check_guards(jobs, outcomes, written)
        self.shadows.run(kind, jobs, outcomes, written)
        for outcome in outcomes:
            if outcome.job_id not in written:
                log.warning(
                    "job %s: lost its claim before finishing; result discarded",
                    outcome.job_id,
                    extra={"job_id": str(outcome.job_id)},
                )
            elif outcome.job_id not in named:
                self.finished_in_batches.add(outcome.job_id)  # its own message will come
        if len(jobs) > 1:
            log.debug("batch of %d %s jobs finished (%d written)", len(jobs), kind.name, len(written))
        own = next((o for o in outcomes if o.job_id == jid), None)
        if own is None or jid not in written:
            return None
        log.debug("job %s: %s", job_id, own.status.value)
        return own.status

    def hold(self, jobs: list[Job]) -> None:
        metrics.in_flight.inc(len(jobs))
        for job in jobs:
            assert job.claim_token is not None
            self.leases.hold(job.id, job.claim_token)

    def drop_lost(self, outcomes: list[Outcome]) -> list[Outcome]:
        """The outcomes of jobs still held. A heartbeat that found a claim gone stopped its job at
        the next cancel check; the job was reaped and may run elsewhere, so nothing is written for
        it (the claim token would refuse it anyway). Asked before the final write: after it, a
        finished job is no longer held either."""
        kept = []
        for o in outcomes:
            if self.leases.lost(o.job_id):
                log.warning(
                    "job %s: lost its lease (no heartbeat landed within it); the job was reaped and "
                    "may run elsewhere, so this run stopped and writes nothing",
                    o.job_id,
                    extra={"job_id": str(o.job_id)},
                )
            else:
                kept.append(o)
        return kept
