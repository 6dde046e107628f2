"""The worker's runner through database faults: a real job kind (a small training run) on SQLite,
with Redis for its job events."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.exc import OperationalError

import worker.runner
from db.jobs import create_job, get_job
from db.models import JobStatus
from db.session import session_scope
from tensorq.settings import Settings
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
        database_url=sqlite_url, redis_url=redis_url, artifact_dir=tmp_path / "artifacts", lease_seconds=600,
        worker_metrics_port=0,
    )  # fmt: skip


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


@pytest.mark.parametrize("db_call", ["update_progress", "is_cancel_requested"])
def test_a_database_blip_in_a_progress_write_or_cancel_check_costs_the_job_nothing(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, db_call: str
) -> None:
    """The connection drops under the first progress write or cancel check of a training run: the
    run goes on (progress waits for the next write) instead of giving the job back."""
    job_id = training_job(settings)
    flaky = failing(getattr(worker.runner, db_call))
    monkeypatch.setattr(worker.runner, db_call, flaky)
    assert Runner(settings).run(TRAIN, str(job_id), worker_name="w@host") == JobStatus.SUCCEEDED
    assert flaky.calls > 1  # type: ignore[attr-defined]  # failed, and was called again
    job = read_job(settings, job_id)
    assert (job.status, job.attempts, job.error_type) == (JobStatus.SUCCEEDED, 1, None)
    assert job.result["resumed_from_step"] is None
    assert job.progress["step"] == job.result["steps"] == 6
