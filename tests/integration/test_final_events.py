"""Every way a job reaches a final state announces it on the job-events channel (real Redis), so
waiting requests answer then and not when their wait runs out; and the sweeper publishes every
job that is due in one pass, however many."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from sqlalchemy.exc import OperationalError

from api.background.sweeper import sweep_once
from db.jobs import claim_job, create_job, mark_published, mark_unpublished
from db.models import JobStatus
from db.queries import get_job
from db.session import session_scope
from tensorq.core.broker import Publisher
from tensorq.core.events import EventPublisher, channel
from tensorq.core.settings import Settings
from worker.executing import Executor, outcome_of_error
from worker.runner import Runner

pytestmark = pytest.mark.integration


@pytest.fixture
def settings(sqlite_url: str, redis_url: str) -> Settings:
    return Settings(database_url=sqlite_url, redis_url=redis_url, lease_seconds=60)


def new_job(settings: Settings, max_attempts: int = 1) -> uuid.UUID:
    with session_scope(settings.sqlalchemy_url) as session:
        return create_job(
            session,
            tenant="t",
            kind="embed",
            params={"texts": ["a"]},
            queue="inference",
            max_attempts=max_attempts,
        ).id


def read_final(pubsub: Any, timeout: float = 5) -> list[str]:
    """Ids the events that arrive within `timeout` announce as final."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        message = pubsub.get_message(timeout=0.2)
        if message is None:
            if seen:
                break
            continue
        event = json.loads(message["data"])
        if event["final"]:
            seen.extend(event["ids"])
    return seen


@pytest.fixture
def events(redis_url: str) -> Iterator[Any]:
    """A live subscription to the deployment's job-events channel."""
    client = redis.Redis.from_url(redis_url)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(channel(redis_url))
    while pubsub.get_message(timeout=1) is None and not pubsub.subscribed:
        pass
    yield pubsub
    pubsub.close()
    client.close()


def test_a_job_out_of_attempts_after_a_transient_error_is_announced_failed(
    settings: Settings, events: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = new_job(settings, max_attempts=1)

    def transient(self: Executor, kind: Any, job: Any) -> Any:
        return outcome_of_error(job, OperationalError("UPDATE", {}, Exception("connection lost")))

    monkeypatch.setattr(Executor, "execute", transient)
    runner = Runner(settings)
    assert runner.run("embed", str(job_id), worker_name="w@host") == JobStatus.FAILED
    assert read_final(events) == [str(job_id)]
    with session_scope(settings.sqlalchemy_url) as session:
        job = get_job(session, job_id)
    assert job is not None and job.status == JobStatus.FAILED and job.error_type == "OperationalError"
    assert "no attempts are left" in (job.error_message or "")


def test_jobs_the_sweeper_fails_or_cancels_are_announced(settings: Settings, events: Any) -> None:
    lost, cancelled, requeued = new_job(settings), new_job(settings), new_job(settings, max_attempts=2)
    with session_scope(settings.sqlalchemy_url) as session:
        for job_id in (lost, cancelled, requeued):
            claim_job(session, job_id, worker="gone@host", device="cpu", lease_seconds=0.01)
        get_job(session, cancelled).cancel_requested = True  # type: ignore[union-attr]
    time.sleep(0.05)  # every lease has run out
    publisher = Publisher(settings)
    try:
        reaped, _ = sweep_once(settings, publisher, events=EventPublisher(settings.redis_url))
    finally:
        publisher.close()
    assert reaped == 3
    assert sorted(read_final(events)) == sorted([str(lost), str(cancelled)])
    with session_scope(settings.sqlalchemy_url) as session:
        states = {i: get_job(session, i).status for i in (lost, cancelled, requeued)}  # type: ignore[union-attr]
    assert states == {lost: JobStatus.FAILED, cancelled: JobStatus.CANCELLED, requeued: JobStatus.QUEUED}


@pytest.mark.parametrize("republish_all", [False, True])
def test_the_sweeper_publishes_every_due_job_in_one_pass(settings: Settings, republish_all: bool) -> None:
    """1200 due jobs, more than a page: never published (Redis was away when they came), or, after
    a Redis restart, every queued one."""
    queue = f"sweep-{uuid.uuid4().hex[:8]}"
    with session_scope(settings.sqlalchemy_url) as session:
        ids = [
            create_job(
                session, tenant="t", kind="embed", params={"texts": [str(i)]}, queue=queue, max_attempts=3
            ).id
            for i in range(1200)
        ]
    with session_scope(settings.sqlalchemy_url) as session:
        if republish_all:
            mark_published(session, ids)  # their messages were in the Redis that restarted
        else:
            mark_unpublished(session, ids)
    broker = redis.Redis.from_url(settings.redis_url)
    publisher = Publisher(settings)
    try:
        assert sweep_once(settings, publisher, republish_all=republish_all) == (0, 1200)
        assert broker.llen(queue) == 1200
        assert sweep_once(settings, publisher) == (0, 0)  # none twice
    finally:
        publisher.close()
        broker.close()


def test_events_stay_within_their_redis_database(redis_url: str, events: Any) -> None:
    """Pub/sub ignores the database number: deployments sharing a Redis server on different
    databases must still not hear each other's jobs (their rows ride along)."""
    base, _, db = redis_url.rpartition("/")
    elsewhere = f"{base}/{(int(db or 0) + 1) % 16}"
    theirs, ours = uuid.uuid4(), uuid.uuid4()
    EventPublisher(elsewhere).changed([theirs], final=True, rows=[{"id": theirs, "result": {"secret": 1}}])
    EventPublisher(redis_url).changed([ours], final=True)
    assert read_final(events) == [str(ours)]
