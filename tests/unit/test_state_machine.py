"""The job state machine on a migrated SQLite database."""

from __future__ import annotations

import time
import uuid

import pytest
from sqlalchemy.orm import Session

from db.jobs import (
    Claimant,
    Fill,
    Outcome,
    cancel_job,
    claim_job,
    claim_jobs,
    create_job,
    extend_leases,
    finish_jobs,
    mark_unpublished,
    reap_expired_leases,
    release_job,
    update_progress,
)
from db.models import JobStatus
from db.queries import get_job, jobs_to_publish, list_jobs
from db.session import get_sessionmaker
from worker.leases import LeaseKeeper


@pytest.fixture
def session(sqlite_url: str) -> Session:
    return get_sessionmaker(sqlite_url)()


def new_job(session: Session, max_attempts: int = 3, kind: str = "embed") -> uuid.UUID:
    job = create_job(
        session, tenant="t", kind=kind, params={"texts": ["a"]}, queue="inference", max_attempts=max_attempts
    )
    session.commit()
    return job.id


def claim(session: Session, job_id: uuid.UUID, lease: float = 60) -> uuid.UUID | None:
    job = claim_job(session, job_id, worker="w@host", device="cpu", lease_seconds=lease)
    session.commit()
    return job.claim_token if job else None


def test_claim_is_exclusive_and_records_worker(session: Session) -> None:
    job_id = new_job(session)
    token = claim(session, job_id)
    assert token is not None
    assert claim(session, job_id) is None  # a redelivered message while the holder is alive
    job = get_job(session, job_id)
    assert job is not None
    assert (job.status, job.attempts, job.worker, job.device) == (JobStatus.RUNNING, 1, "w@host", "cpu")
    assert job.started_at is not None


def test_only_the_claim_holder_can_finish(session: Session) -> None:
    job_id = new_job(session)
    token = claim(session, job_id)
    assert token is not None
    stranger = Outcome(job_id, uuid.uuid4(), JobStatus.SUCCEEDED, result={"x": 1})
    assert finish_jobs(session, [stranger]) == set()
    assert finish_jobs(session, [Outcome(job_id, token, JobStatus.SUCCEEDED, result={"x": 2})]) == {job_id}
    # The same final write again (a duplicate execution) changes nothing.
    assert finish_jobs(session, [Outcome(job_id, token, JobStatus.SUCCEEDED, result={"x": 3})]) == set()
    session.commit()
    job = get_job(session, job_id)
    assert job is not None and job.status == JobStatus.SUCCEEDED and job.result == {"x": 2}
    assert job.finished_at is not None and job.finished_at >= job.started_at  # type: ignore[operator]
    assert claim(session, job_id) is None


def test_failed_job_keeps_typed_error(session: Session) -> None:
    job_id = new_job(session)
    token = claim(session, job_id)
    assert token is not None
    finish_jobs(
        session, [Outcome(job_id, token, JobStatus.FAILED, error_type="InvalidParams", error_message="m")]
    )
    session.commit()
    job = get_job(session, job_id)
    assert job is not None and (job.status, job.error_type, job.error_message) == (
        JobStatus.FAILED,
        "InvalidParams",
        "m",
    )


def test_expired_lease_can_be_reclaimed_and_old_holder_loses(session: Session) -> None:
    job_id = new_job(session)
    old = claim(session, job_id, lease=0.05)
    time.sleep(0.1)
    new = claim(session, job_id)
    assert old and new and old != new
    assert finish_jobs(session, [Outcome(job_id, old, JobStatus.SUCCEEDED, result={})]) == set()
    assert update_progress(session, job_id, old, {"step": 1}) is False
    assert update_progress(session, job_id, new, {"step": 1}) is True
    session.commit()
    job = get_job(session, job_id)
    assert job is not None and job.attempts == 2


def test_heartbeat_extends_lease_and_reports_cancel(session: Session) -> None:
    job_id = new_job(session)
    token = claim(session, job_id, lease=0.2)
    assert token is not None
    assert extend_leases(session, [(job_id, token)], lease_seconds=60) == {job_id: False}
    session.commit()
    time.sleep(0.3)
    assert claim(session, job_id) is None  # lease was extended
    cancel_job(session, job_id, "t")
    session.commit()
    assert extend_leases(session, [(job_id, token)], lease_seconds=60) == {job_id: True}


def test_a_heartbeat_tells_a_holder_that_lost_its_claim_to_stop(sqlite_url: str) -> None:
    """The holder's heartbeats missed the lease (a pause, a database outage): the job was reaped
    and claimed again. Its next heartbeat must stop it, or two copies run side by side."""
    session = get_sessionmaker(sqlite_url)()
    job_id, other = new_job(session), new_job(session)
    stale = claim(session, job_id, lease=0.05)
    kept = claim(session, other)
    assert stale is not None and kept is not None
    keeper = LeaseKeeper(sqlite_url, lease_seconds=600)  # its own thread beats in 200 s: this test beats
    keeper.hold(job_id, stale)
    keeper.hold(other, kept)
    time.sleep(0.1)
    assert reap_expired_leases(session).requeued == [job_id]
    session.commit()
    assert claim(session, job_id) not in (None, stale)  # another worker has it now
    assert extend_leases(session, [(job_id, stale), (other, kept)], lease_seconds=60) == {other: False}
    session.commit()
    keeper.beat()
    assert keeper.cancel_requested(job_id) and keeper.lost(job_id)
    assert not keeper.cancel_requested(other) and not keeper.lost(other)
    keeper.release(job_id)
    assert not keeper.cancel_requested(job_id)


def test_reaper_requeues_then_fails_after_max_attempts(session: Session) -> None:
    job_id = new_job(session, max_attempts=2)
    claim(session, job_id, lease=0.01)
    time.sleep(0.05)
    reaped = reap_expired_leases(session)
    session.commit()
    assert reaped == ([job_id], [], [])
    job = get_job(session, job_id)
    assert job is not None and job.status == JobStatus.QUEUED and job.published_at is None
    assert [j.id for j in jobs_to_publish(session, republish_after=600)] == [job_id]
    claim(session, job_id, lease=0.01)
    time.sleep(0.05)
    reaped = reap_expired_leases(session)
    session.commit()
    assert reaped == ([], [job_id], [])
    job = get_job(session, job_id)
    assert job is not None and job.status == JobStatus.FAILED and job.error_type == "WorkerLost"
    assert claim(session, job_id) is None


def test_cancel_queued_at_once_running_on_request(session: Session) -> None:
    queued = new_job(session)
    job, cancelled = cancel_job(session, queued, "t")
    session.commit()
    assert job is not None and job.status == JobStatus.CANCELLED and job.finished_at is not None
    assert cancelled
    assert claim(session, queued) is None
    # Already final: left alone, and said so.
    job, cancelled = cancel_job(session, queued, "t")
    assert job is not None and job.status == JobStatus.CANCELLED and not cancelled

    running = new_job(session)
    token = claim(session, running)
    job, cancelled = cancel_job(session, running, "t")
    session.commit()
    assert job is not None and job.status == JobStatus.RUNNING and job.cancel_requested
    assert not cancelled
    assert token is not None
    finish_jobs(session, [Outcome(running, token, JobStatus.CANCELLED)])
    session.commit()
    assert get_job(session, running).status == JobStatus.CANCELLED  # type: ignore[union-attr]


def test_unpublished_jobs_are_found_for_the_sweeper(session: Session) -> None:
    published = new_job(session)
    lost = new_job(session)
    mark_unpublished(session, [lost])
    session.commit()
    assert [j.id for j in jobs_to_publish(session, republish_after=600)] == [lost]
    # A message published long ago may be lost with the broker: republish it too.
    assert {j.id for j in jobs_to_publish(session, republish_after=0.0001)} == {published, lost}


def test_keyset_pagination_walks_every_job_once_newest_first(session: Session) -> None:
    ids = [new_job(session, kind="embed" if i % 2 else "other") for i in range(25)]
    seen: list[uuid.UUID] = []
    cursor = None
    while True:
        page, cursor = list_jobs(session, tenant="t", limit=7, cursor=cursor)
        seen += [j.id for j in page]
        if cursor is None:
            break
    assert seen == list(reversed(ids))
    embeds, _ = list_jobs(session, tenant="t", kind="embed", limit=100)
    assert [j.id for j in embeds] == [i for n, i in reversed(list(enumerate(ids))) if n % 2]
    claim(session, ids[0])
    running, _ = list_jobs(session, tenant="t", status=JobStatus.RUNNING)
    assert [j.id for j in running] == [ids[0]]


def test_malformed_cursor_is_a_value_error(session: Session) -> None:
    with pytest.raises(ValueError):
        list_jobs(session, tenant="t", cursor="not-a-cursor")


def test_transient_failure_releases_the_job_then_fails_when_out_of_attempts(session: Session) -> None:
    job_id = new_job(session, max_attempts=2)
    token = claim(session, job_id)
    assert token is not None
    state = release_job(session, job_id, token, error_type="OperationalError", message="connection lost")
    assert state == JobStatus.QUEUED
    session.commit()
    job = get_job(session, job_id)
    assert job is not None and job.status == JobStatus.QUEUED and job.claim_token is None
    assert job.published_at is not None  # the worker republishes it with a delay, not the sweeper
    token = claim(session, job_id)
    assert token is not None
    finish_jobs(session, [Outcome(job_id, token, JobStatus.SUCCEEDED, result={"ok": True})])
    session.commit()
    job = get_job(session, job_id)
    assert job is not None and job.status == JobStatus.SUCCEEDED and job.error_type is None

    spent = new_job(session, max_attempts=1)
    token = claim(session, spent)
    assert token is not None
    state = release_job(session, spent, token, error_type="OutOfMemoryError", message="CUDA out of memory")
    assert state == JobStatus.FAILED
    session.commit()
    job = get_job(session, spent)
    assert job is not None and job.status == JobStatus.FAILED and job.error_type == "OutOfMemoryError"
    assert "no attempts are left" in (job.error_message or "")


def test_transient_errors_are_told_from_permanent_ones() -> None:
    from sqlalchemy.exc import OperationalError

    from worker.retry import backoff_delay, is_transient

    oom = type("OutOfMemoryError", (RuntimeError,), {"__module__": "torch.cuda"})
    assert is_transient(OperationalError("SELECT 1", {}, Exception("server closed the connection")))
    assert is_transient(oom("CUDA out of memory"))
    assert not is_transient(ValueError("bad input"))
    assert not is_transient(KeyError("no such model"))
    delays = [backoff_delay(n, base=1, cap=60) for n in range(12)]
    assert all(0 <= d <= min(60, 2**n) for n, d in enumerate(delays))


def test_batch_claim_takes_only_jobs_of_the_same_kind_model_and_queue(session: Session) -> None:
    def job(queue: str, kind: str = "embed", model: str = "m") -> uuid.UUID:
        row = create_job(session, tenant="t", kind=kind, params={}, queue=queue, max_attempts=3, model=model)
        session.commit()
        return row.id

    first = job("inference")
    mate = job("inference")
    gpu_only = job("gpu.inference")
    other_model = job("inference", model="other")
    other_kind = job("inference", kind="classify")
    claimed = claim_jobs(session, [first], Claimant("w", "cpu", 60), Fill(10))
    session.commit()
    assert [j.id for j in claimed] == [first, mate]
    for left in (gpu_only, other_model, other_kind):
        assert get_job(session, left).status == JobStatus.QUEUED  # type: ignore[union-attr]


def test_a_batch_claim_adds_jobs_while_their_texts_fit(session: Session) -> None:
    def job(texts: int) -> uuid.UUID:
        row = create_job(
            session,
            tenant="t",
            kind="embed",
            params={"texts": ["x"] * texts},
            queue="inference",
            max_attempts=3,
            model="m",
            batch_cost=texts,
        )
        session.commit()
        return row.id

    ids = [job(n) for n in (100, 20, 10, 1)]
    claimed = claim_jobs(session, [ids[0]], Claimant("w", "cpu", 60), Fill(128))
    session.commit()
    # 100 + 20 = 120 texts; 10 more would make 130.
    assert [j.id for j in claimed] == ids[:2]
    assert [get_job(session, i).status for i in ids[2:]] == [JobStatus.QUEUED] * 2  # type: ignore[union-attr]


def test_a_finished_row_sent_as_json_reads_back_as_the_stored_job(session: Session) -> None:
    """A lone job's committed row travels with its finished event (db.snapshots); the job built
    from it must be the one a read gives, every column and type included."""
    import orjson

    from db.jobs import finish_job
    from db.snapshots import job_from_snapshot, job_snapshot

    job_id = new_job(session)
    token = claim(session, job_id)
    assert token is not None
    result = {"embeddings": [[0.12345678, -1e-08]], "dim": 2}
    stranger = Outcome(job_id, uuid.uuid4(), JobStatus.SUCCEEDED, result=result)
    assert finish_job(session, stranger) is None  # not held: nothing written, no row
    row = finish_job(
        session, Outcome(job_id, token, JobStatus.SUCCEEDED, result=result, metrics={"run_ms": 1.5})
    )
    session.commit()
    assert row is not None
    as_json = orjson.loads(orjson.dumps(job_snapshot(row)))
    sent = job_from_snapshot(as_json, session.get_bind().engine)
    stored = get_job(session, job_id)
    assert stored is not None
    for column in stored.__table__.columns:
        assert getattr(sent, column.key) == getattr(stored, column.key), column.key
    assert sent.status is JobStatus.SUCCEEDED and sent.finished_at is not None
    with pytest.raises(KeyError):
        job_from_snapshot({k: v for k, v in as_json.items() if k != "finished_at"}, session.get_bind().engine)
