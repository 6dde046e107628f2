"""The worker's runner through database faults and lost leases: real job kinds (a small training
run, embeddings) on SQLite, with Redis for its job events."""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.exc import OperationalError

import worker.claiming
import worker.job_context
import worker.retry
from db import registry
from db.jobs import claim_job, create_job
from db.models import JobStatus, utcnow
from db.queries import get_job
from db.session import session_scope
from tasks import classifier as clf
from tensorq.core.artifacts import ArtifactStore
from tensorq.core.settings import Settings
from worker.job_context import ProgressWriter
from worker.runner import Runner

pytestmark = pytest.mark.integration

TRAIN = "train-text-classifier"
# 12 training rows in batches of 4: 3 steps an epoch, each a progress report and a cancel check.
ROWS = [{"text": f"good thing number {i}", "label": "pos"} for i in range(8)] + [
    {"text": f"bad thing number {i}", "label": "neg"} for i in range(8)
]


@pytest.fixture
def settings(sqlite_url: str, redis_url: str, tmp_path: Path) -> Settings:
    # A long lease: the heartbeat thread (every third of it) stays out of these tests.
    return Settings(
        database_url=sqlite_url,
        redis_url=redis_url,
        artifact_dir=tmp_path / "artifacts",
        lease_seconds=600,
        worker_metrics_port=0,
    )


def training_job(settings: Settings, epochs: int = 2) -> uuid.UUID:
    params = {"data": ROWS, "epochs": epochs, "batch_size": 4, "max_seq_length": 16, "model_name": "m"}
    with session_scope(settings.sqlalchemy_url) as session:
        return create_job(
            session, tenant="t", kind=TRAIN, params=params, queue="training", max_attempts=3, model="m"
        ).id


def read_job(settings: Settings, job_id: uuid.UUID) -> Any:
    with session_scope(settings.sqlalchemy_url) as session:
        return get_job(session, job_id)


def dropped_connection() -> OperationalError:
    return OperationalError("UPDATE jobs", {}, Exception("server closed the connection unexpectedly"))


def failing(real: Callable[..., Any], times: int | None = 1) -> Callable[..., Any]:
    """`real`, counting its calls (`.calls`), the first `times` of which (all: None) lose the connection."""

    def call(*args: Any, **kwargs: Any) -> Any:
        call.calls += 1  # type: ignore[attr-defined]
        if times is None or call.calls <= times:
            raise dropped_connection()
        return real(*args, **kwargs)

    call.calls = 0  # type: ignore[attr-defined]
    return call


def lapse_lease(settings: Settings, job_id: uuid.UUID) -> None:
    """What a holder's missed heartbeats leave behind: a lease in the past."""
    with session_scope(settings.sqlalchemy_url) as session:
        job = get_job(session, job_id)
        assert job is not None
        job.lease_expires_at = utcnow() - timedelta(seconds=1)


@pytest.mark.parametrize("db_call", ["update_progress", "is_cancel_requested"])
def test_a_database_blip_in_a_progress_write_or_cancel_check_costs_the_job_nothing(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, db_call: str
) -> None:
    """The connection drops under the first progress write or cancel check of a training run: the
    run goes on (progress waits for the next write) instead of giving the job back."""
    job_id = training_job(settings)
    flaky = failing(getattr(worker.job_context, db_call))
    monkeypatch.setattr(worker.job_context, db_call, flaky)
    assert Runner(settings).run(TRAIN, str(job_id), worker_name="w@host") == JobStatus.SUCCEEDED
    assert flaky.calls > 1  # type: ignore[attr-defined]  # failed, and was called again
    job = read_job(settings, job_id)
    assert (job.status, job.attempts, job.error_type) == (JobStatus.SUCCEEDED, 1, None)
    assert job.result["resumed_from_step"] is None
    assert job.progress["step"] == job.result["steps"] == 6


def test_a_worker_that_lost_its_lease_stops_and_writes_nothing(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The worker's heartbeats missed the lease while it trained; another worker claimed the job.
    At its next heartbeat the first worker must stop, before it trains on, saves or writes."""
    job_id = training_job(settings, epochs=3)
    stale = Runner(settings)
    taken: list[uuid.UUID] = []
    report = ProgressWriter.__call__

    def take_over(writer: ProgressWriter, progress: dict[str, Any], force: bool = False) -> None:
        if progress["step"] == 1 and not taken:
            lapse_lease(settings, job_id)
            with session_scope(settings.sqlalchemy_url) as session:
                job = claim_job(session, job_id, worker="other@host", device="cpu", lease_seconds=600)
                assert job is not None and job.claim_token is not None
                taken.append(job.claim_token)
            stale.leases.beat()
        report(writer, progress, force)

    monkeypatch.setattr(ProgressWriter, "__call__", take_over)
    caplog.set_level(logging.INFO, logger="worker")
    assert stale.run(TRAIN, str(job_id), worker_name="w@host") is None
    assert taken, "the lease was never taken over; nothing was tested"
    assert f"job {job_id}: lost its lease" in caplog.text
    job = read_job(settings, job_id)
    assert (job.status, job.claim_token, job.worker, job.attempts) == (
        JobStatus.RUNNING,
        taken[0],
        "other@host",
        2,
    )
    work_dir = ArtifactStore(settings.artifact_dir).job_dir(job_id)
    saved = list(work_dir.iterdir()) if work_dir.exists() else []
    assert [p.name for p in saved if p.name.startswith("model")] == []
    with session_scope(settings.sqlalchemy_url) as session:
        assert registry.list_models(session, "t") == []


def test_a_stale_attempt_cannot_replace_the_files_of_a_registered_version(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worst case: the stale worker saves its model after its last cancel check, just after the
    job's next attempt has finished and registered its own. The version's files must stay as they
    were registered."""
    job_id = training_job(settings, epochs=1)
    save = clf.save_classifier
    winner: list[Any] = []

    def save_late(classifier: Any, path: Path, *args: Any) -> Path:
        if not winner:  # the stale attempt, about to save: the job's next attempt runs first
            winner.append(None)
            lapse_lease(settings, job_id)
            assert Runner(settings).run(TRAIN, str(job_id), worker_name="other@host") == JobStatus.SUCCEEDED
            job = read_job(settings, job_id)
            files = settings.artifact_dir / job.result["artifact"]
            winner[0] = (job.result, {f.name: os.stat(f) for f in files.iterdir()})
        return save(classifier, path, *args)

    monkeypatch.setattr(clf, "save_classifier", save_late)
    assert Runner(settings).run(TRAIN, str(job_id), worker_name="w@host") is None
    result, stats = winner[0]
    job = read_job(settings, job_id)
    assert (job.status, job.attempts, job.result) == (JobStatus.SUCCEEDED, 2, result)
    files = settings.artifact_dir / result["artifact"]
    after = {f.name: os.stat(f) for f in files.iterdir()}
    assert {n: (s.st_ino, s.st_mtime_ns) for n, s in after.items()} == {
        n: (s.st_ino, s.st_mtime_ns) for n, s in stats.items()
    }
    with session_scope(settings.sqlalchemy_url) as session:
        [model] = registry.list_models(session, "t")
        assert [v.artifact_path for v in registry.versions_of(session, model)] == [result["artifact"]]


@pytest.mark.parametrize("failures", [1, None], ids=["once", "always"])
def test_a_dropped_connection_in_the_batch_top_up_still_runs_the_jobs_claimed(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, failures: int | None
) -> None:
    """The first claim took three embed jobs; the top-up claim after the short wait loses its
    connection (once, or on every retry): the three jobs run and succeed all the same."""
    with session_scope(settings.sqlalchemy_url) as session:
        ids = [
            create_job(
                session,
                tenant="t",
                kind="embed",
                params={"texts": [f"text {i}"]},
                queue="inference",
                max_attempts=3,
                model="all-MiniLM-L6-v2",
            ).id
            for i in range(3)
        ]
    claim = worker.claiming.claim_jobs
    top_up = failing(claim, failures)

    def claim_jobs(session: Any, named: list[uuid.UUID], *args: Any) -> Any:
        return claim(session, named, *args) if named else top_up(session, named, *args)

    monkeypatch.setattr(worker.claiming, "claim_jobs", claim_jobs)
    monkeypatch.setattr(worker.retry, "backoff_delay", lambda attempt: 0.0)
    runner = Runner(settings)
    assert runner.run("embed", str(ids[0]), worker_name="w@host") == JobStatus.SUCCEEDED
    assert top_up.calls > 1  # type: ignore[attr-defined]  # failed, and was tried again
    jobs = [read_job(settings, i) for i in ids]
    assert [(j.status, j.attempts) for j in jobs] == [(JobStatus.SUCCEEDED, 1)] * 3
