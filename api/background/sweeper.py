"""Housekeeping that keeps the database and the broker in step.

- reap: running jobs whose lease expired go back to queued (or fail when out of attempts, or are
  cancelled when that was asked for; both announced on the job-events channel);
- publish: queued jobs whose message never left (broker down) or may be lost are published again;
  when Redis restarted (its run_id changed) every queued job is, since its queues may be gone.
A duplicate message is harmless: only one claim of a job can succeed.
"""

from __future__ import annotations

import logging
import threading

from db.jobs import mark_published, reap_expired_leases
from db.models import utcnow
from db.queries import job_tenants, jobs_to_publish
from db.session import session_scope
from tasks.registry import get_kind
from tensorq.core.active_jobs import ActiveJobCounter
from tensorq.core.broker import Publisher
from tensorq.core.events import EventPublisher
from tensorq.core.settings import Settings

log = logging.getLogger(__name__)

PAGE = 500


def sweep_once(
    settings: Settings,
    publisher: Publisher,
    republish_all: bool = False,
    events: EventPublisher | None = None,
    active_jobs: ActiveJobCounter | None = None,
) -> tuple[int, int]:
    """One pass; returns (jobs requeued, failed or cancelled by the reaper, jobs published)."""
    url = settings.sqlalchemy_url
    with session_scope(url) as session:
        reaped = reap_expired_leases(session)
        finished = reaped.failed + reaped.cancelled
        tenants = job_tenants(session, finished) if finished and active_jobs is not None else []
    for job_id in reaped.requeued:
        log.warning("job %s: lease expired, requeued", job_id, extra={"job_id": str(job_id)})
    for job_id in reaped.failed:
        log.error(
            "job %s: lease expired with no attempts left, failed", job_id, extra={"job_id": str(job_id)}
        )
    final = reaped.failed + reaped.cancelled
    if active_jobs is not None:
        active_jobs.finished(tenants)
    if final and events is not None:
        events.changed(final, final=True)  # their waiters answer now, not when their wait runs out
    # Every job due now, page by page: a published job's published_at moves past `now`, so no
    # page repeats one (after a Redis restart that is every queued job, however many).
    now, published = utcnow(), 0
    while True:
        with session_scope(url) as session:
            pending = jobs_to_publish(
                session,
                republish_after=0 if republish_all else settings.republish_after_seconds,
                limit=PAGE,
                now=now,
            )
            messages = [(get_kind(job.kind).task_name, str(job.id), job.queue) for job in pending]
        if messages:
            publisher.publish_many(messages)
            with session_scope(url) as session:
                mark_published(session, [job.id for job in pending])
            published += len(messages)
        if len(messages) < PAGE:
            break
    if published:
        log.info("published %d pending jobs", published)
    return len(reaped.requeued) + len(final), published


class Sweeper:
    def __init__(self, settings: Settings, publisher: Publisher) -> None:
        self.settings = settings
        self.publisher = publisher
        self.events = EventPublisher(settings.redis_url)
        self.active_jobs = ActiveJobCounter(settings.redis_url)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="sweeper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        broker_run: str | None = None
        while not self._stop.wait(self.settings.sweep_interval_seconds):
            try:
                run_id: str | None = self.publisher.broker_run_id()
            except Exception:
                run_id = None  # Redis away: the reaper still runs; publishing will wait
            restarted = None not in (run_id, broker_run) and run_id != broker_run
            if restarted:
                log.warning("Redis restarted (run_id changed): republishing every queued job")
            try:
                sweep_once(
                    self.settings,
                    self.publisher,
                    republish_all=restarted,
                    events=self.events,
                    active_jobs=self.active_jobs,
                )
                broker_run = run_id or broker_run
            except Exception as exc:
                # Broker or database away: try again next interval.
                log.warning("sweep failed: %s", exc)
