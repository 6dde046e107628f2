"""Retention (`db/retention.py`, `tensorq prune`) on a migrated SQLite database and a temporary store."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import typer
from sqlalchemy import select, text, update
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from db.jobs import Outcome, cancel_job, claim_job, create_job, finish_jobs
from db.models import Dataset, Job, JobStatus, utcnow
from db.registry import create_dataset, register_version
from db.retention import PruneReport, Skipped, prune, prune_results
from db.session import dumps_json, get_sessionmaker
from tensorq.cli.retention import parse_duration, register
from tensorq.core.artifacts import ArtifactStore
from tensorq.core.settings import get_settings

OLD = timedelta(days=60)
RECENT = timedelta(hours=1)
CUTOFF_AGE = timedelta(days=30)
BIG_RESULT = {"embeddings": [[0.125] * 384] * 4, "dim": 384}


@pytest.fixture
def session(sqlite_url: str) -> Iterator[Session]:
    s = get_sessionmaker(sqlite_url)()
    yield s
    s.close()


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(tmp_path / "artifacts")


def finished_job(
    session: Session,
    *,
    age: timedelta,
    status: JobStatus = JobStatus.SUCCEEDED,
    result: dict[str, Any] | None = None,
    kind: str = "embed",
    params: dict[str, Any] | None = None,
) -> uuid.UUID:
    """A job taken through the state machine to `status`, its finished_at moved `age` into the past."""
    job = create_job(
        session, tenant="t", kind=kind, params=params or {"texts": ["a"]}, queue="inference", max_attempts=3
    )
    session.commit()
    if status == JobStatus.CANCELLED:
        cancel_job(session, job.id, "t")
    else:
        claimed = claim_job(session, job.id, worker="w@host", device="cpu", lease_seconds=60)
        assert claimed is not None and claimed.claim_token is not None
        error = "Boom" if status == JobStatus.FAILED else None
        outcome = Outcome(
            job.id, claimed.claim_token, status, result=result, error_type=error, error_message=error
        )
        assert finish_jobs(session, [outcome]) == {job.id}
    session.execute(update(Job).where(Job.id == job.id).values(finished_at=utcnow() - age))
    session.commit()
    return job.id


def unfinished_job(session: Session, *, running: bool, params: dict[str, Any] | None = None) -> uuid.UUID:
    job = create_job(
        session,
        tenant="t",
        kind="train-text-classifier",
        params=params or {},
        queue="training",
        max_attempts=3,
    )
    session.commit()
    if running:
        assert claim_job(session, job.id, worker="w@host", device="cpu", lease_seconds=60) is not None
        session.commit()
    return job.id


def job_files(store: ArtifactStore, job_id: uuid.UUID, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        store.write_atomic(f"jobs/{job_id}/{name}", data)
    return store.job_dir(job_id)


def dataset(session: Session, store: ArtifactStore, *, age: timedelta, data: bytes = b"") -> uuid.UUID:
    dataset_id = uuid.uuid4()
    data = data or b'{"text": "good", "label": "pos"}\n{"text": "bad", "label": "neg"}\n'
    relpath = store.dataset_relpath(dataset_id)
    store.write_atomic(relpath, data)
    create_dataset(
        session,
        tenant="t",
        dataset_id=dataset_id,
        name=None,
        path=relpath,
        rows=2,
        labels=["neg", "pos"],
        sha256="0" * 64,
        size_bytes=len(data),
    )
    session.flush()
    session.execute(update(Dataset).where(Dataset.id == dataset_id).values(created_at=utcnow() - age))
    session.commit()
    return dataset_id


@dataclass
class World:
    old_ok: uuid.UUID  # succeeded 60 days ago, big result, checkpoint directory
    old_failed: uuid.UUID  # failed 60 days ago, no result (JSON null), directory
    old_cancelled: uuid.UUID
    old_trained: uuid.UUID  # its directory holds sentiment:2
    recent_ok: uuid.UUID
    queued: uuid.UUID
    running: uuid.UUID
    old_dataset: uuid.UUID
    recent_dataset: uuid.UUID
    used_dataset: uuid.UUID  # old, but the queued training job names it


def build_world(session: Session, store: ArtifactStore, model: str = "sentiment") -> World:
    old_ok = finished_job(session, age=OLD, result=BIG_RESULT)
    job_files(store, old_ok, {"checkpoint/state.pt": b"x" * 5000})
    old_failed = finished_job(session, age=OLD, status=JobStatus.FAILED)
    job_files(store, old_failed, {"checkpoint/state.pt": b"y" * 3000})
    old_cancelled = finished_job(session, age=OLD, status=JobStatus.CANCELLED)
    recent_ok = finished_job(session, age=RECENT, result=BIG_RESULT)
    job_files(store, recent_ok, {"checkpoint/state.pt": b"z" * 100})

    # Version 1 lives in a recent job's directory; version 2 in an old one's, which must stay.
    job_files(store, recent_ok, {"model/model.safetensors": b"m" * 10})
    register_version(
        session,
        tenant="t",
        name=model,
        artifact_path=f"jobs/{recent_ok}/model",
        labels=["neg", "pos"],
        metrics={},
        job_id=recent_ok,
    )
    session.commit()
    old_trained = finished_job(
        session, age=OLD, kind="train-text-classifier", result={"model": model, "version": 2}
    )
    job_files(store, old_trained, {"model/model.safetensors": b"w" * 2000})
    version = register_version(
        session,
        tenant="t",
        name=model,
        artifact_path=f"jobs/{old_trained}/model",
        labels=["neg", "pos"],
        metrics={},
        job_id=old_trained,
    )
    session.commit()
    assert version.version == 2

    used_dataset = dataset(session, store, age=OLD)
    queued = unfinished_job(session, running=False, params={"dataset_id": str(used_dataset)})
    running = unfinished_job(session, running=True)
    job_files(store, running, {"checkpoint/state.pt": b"r" * 10})
    return World(
        old_ok=old_ok,
        old_failed=old_failed,
        old_cancelled=old_cancelled,
        old_trained=old_trained,
        recent_ok=recent_ok,
        queued=queued,
        running=running,
        old_dataset=dataset(session, store, age=OLD),
        recent_dataset=dataset(session, store, age=RECENT),
        used_dataset=used_dataset,
    )


def snapshot(session: Session, store: ArtifactStore) -> tuple[list[Any], list[Any], list[tuple[str, int]]]:
    session.commit()
    jobs = [tuple(r) for r in session.execute(text("SELECT * FROM jobs ORDER BY id"))]
    datasets = [tuple(r) for r in session.execute(text("SELECT * FROM datasets ORDER BY id"))]
    files = sorted((p.relative_to(store.root).as_posix(), p.stat().st_size) for p in store.root.rglob("*"))
    return jobs, datasets, files


def result_of(session: Session, job_id: uuid.UUID) -> Any:
    return session.scalar(text("SELECT result FROM jobs WHERE id = :id"), {"id": job_id.hex})


def cutoff() -> Any:
    return utcnow() - CUTOFF_AGE


def test_dry_run_changes_nothing_and_reports_what_apply_then_does(
    session: Session, store: ArtifactStore
) -> None:
    build_world(session, store)
    before = snapshot(session, store)
    at = cutoff()
    dry = prune(session, store, cutoff=at, datasets=True)
    assert snapshot(session, store) == before
    assert not dry.applied and dry.results == 2 and dry.job_dirs == 2 and dry.datasets == 1
    assert dry.total_bytes > 5000 + 3000

    applied = prune(session, store, cutoff=at, datasets=True, apply=True)
    assert applied.applied
    assert {**applied.as_dict(), "applied": False} == dry.as_dict()
    # Nothing is left to prune, and what was kept is kept again for the same reasons.
    again = prune(session, store, cutoff=at, datasets=True)
    assert (again.results, again.job_dirs, again.datasets, again.total_bytes) == (0, 0, 0, 0)
    assert again.skipped == dry.skipped


def test_apply_clears_old_finished_results_and_keeps_history(session: Session, store: ArtifactStore) -> None:
    w = build_world(session, store)
    report = prune(session, store, cutoff=cutoff(), apply=True)
    assert report.results == 2  # old_ok and old_trained; the failed one's JSON null frees nothing
    rows = {j.id: j for j in session.scalars(select(Job).execution_options(populate_existing=True))}
    for job_id in (w.old_ok, w.old_trained, w.old_cancelled):
        assert rows[job_id].result is None
        assert result_of(session, job_id) is None  # SQL NULL, not JSON null
    assert rows[w.old_ok].status == JobStatus.SUCCEEDED
    assert rows[w.old_failed].status == JobStatus.FAILED and rows[w.old_failed].error_type == "Boom"
    assert rows[w.old_ok].finished_at is not None and rows[w.old_ok].metrics is None
    assert rows[w.old_ok].params == {"texts": ["a"]}
    assert rows[w.recent_ok].result == BIG_RESULT
    assert rows[w.queued].status == JobStatus.QUEUED and rows[w.running].status == JobStatus.RUNNING
    assert len(rows) == 7  # no job row is deleted


def test_apply_deletes_old_job_dirs_but_keeps_model_artifacts(session: Session, store: ArtifactStore) -> None:
    w = build_world(session, store)
    orphan = store.job_dir(uuid.uuid4())
    orphan.mkdir(parents=True)
    report = prune(session, store, cutoff=cutoff(), apply=True)
    assert not store.job_dir(w.old_ok).exists() and not store.job_dir(w.old_failed).exists()
    assert sorted(report.removed) == sorted([f"jobs/{w.old_ok}", f"jobs/{w.old_failed}"])
    assert report.job_dir_bytes == 5000 + 3000
    assert (store.job_dir(w.old_trained) / "model" / "model.safetensors").read_bytes() == b"w" * 2000
    assert store.job_dir(w.recent_ok).exists() and store.job_dir(w.running).exists()
    assert Skipped(f"jobs/{w.old_trained}", "referenced by model sentiment:2") in report.skipped
    assert Skipped(f"jobs/{orphan.name}", "no job with this id") in report.skipped
    assert orphan.exists() and report.errors == []
    # Datasets were not asked for.
    assert session.scalar(select(Dataset.id).where(Dataset.id == w.old_dataset)) == w.old_dataset
    assert store.path(store.dataset_relpath(w.old_dataset)).exists()
    assert not report.datasets_included and report.datasets == 0


def test_datasets_go_only_with_the_flag_and_not_while_a_job_needs_them(
    session: Session, store: ArtifactStore
) -> None:
    w = build_world(session, store)
    report = prune(session, store, cutoff=cutoff(), datasets=True, apply=True)
    present = set(session.scalars(select(Dataset.id)))
    assert present == {w.recent_dataset, w.used_dataset}
    assert not store.path(store.dataset_relpath(w.old_dataset)).exists()
    assert store.path(store.dataset_relpath(w.used_dataset)).exists()
    assert report.removed[-1] == store.dataset_relpath(w.old_dataset)
    assert (
        Skipped(store.dataset_relpath(w.used_dataset), f"used by unfinished job {w.queued}") in report.skipped
    )


def test_a_job_finished_after_the_cutoff_is_not_touched(session: Session, store: ArtifactStore) -> None:
    job_id = finished_job(session, age=timedelta(days=29), result={"x": 1})
    job_files(store, job_id, {"out": b"1"})
    report = prune(session, store, cutoff=cutoff(), datasets=True, apply=True)
    assert (report.results, report.job_dirs, report.skipped) == (0, 0, [])
    assert result_of(session, job_id) is not None and store.job_dir(job_id).exists()


def test_results_are_cleared_in_batches(session: Session) -> None:
    jobs = [finished_job(session, age=OLD, result={"i": i}) for i in range(5)]
    # What is stored is the sealed text (db/sealing.py), as SQLite keeps it.
    stored = sum(len(str(v)) for v in session.scalars(text("SELECT result FROM jobs")))
    assert stored > 5 * len(dumps_json({"i": 0}))
    assert prune_results(session, cutoff=cutoff(), apply=False) == (5, stored)
    assert prune_results(session, cutoff=cutoff(), apply=True, batch=2) == (5, stored)
    assert [result_of(session, j) for j in jobs] == [None] * 5


def test_results_of_unfinished_jobs_are_never_cleared(session: Session, store: ArtifactStore) -> None:
    """The clearing UPDATE is conditional on a final status, not on finished_at alone."""
    running = unfinished_job(session, running=True)
    # Not a state the machine makes; forced here to show the status guard holds on its own.
    session.execute(
        update(Job).where(Job.id == running).values(finished_at=utcnow() - OLD, result={"partial": [1, 2]})
    )
    session.commit()
    report = prune(session, store, cutoff=cutoff(), apply=True)
    assert report.results == 0
    assert result_of(session, running) is not None


def test_parse_duration() -> None:
    assert parse_duration("90m") == timedelta(minutes=90)
    assert parse_duration("12h") == timedelta(hours=12)
    assert parse_duration("30d") == timedelta(days=30)
    for bad in ("", "30", "d", "1.5h", "-1d", "0d", "3y"):
        with pytest.raises(ValueError):
            parse_duration(bad)


@pytest.fixture
def cli(sqlite_url: str, store: ArtifactStore, monkeypatch: pytest.MonkeyPatch) -> Iterator[typer.Typer]:
    monkeypatch.setenv("TENSORQ_DATABASE_URL", sqlite_url)
    monkeypatch.setenv("TENSORQ_ARTIFACT_DIR", str(store.root))
    monkeypatch.delenv("TENSORQ_RETENTION_DAYS", raising=False)
    get_settings.cache_clear()
    app = typer.Typer()

    @app.callback()
    def main() -> None:
        """A group, as in tensorq.cli, so `prune` is a subcommand."""

    register(app)
    yield app
    get_settings.cache_clear()


def test_cli_dry_run_then_apply(cli: typer.Typer, session: Session, store: ArtifactStore) -> None:
    w = build_world(session, store)
    before = snapshot(session, store)
    runner = CliRunner()

    dry = runner.invoke(cli, ["prune"])  # default age: 30 days
    assert dry.exit_code == 0, dry.output
    assert "dry run" in dry.output and f"jobs/{w.old_ok}" in dry.output
    assert f"jobs/{w.old_trained}: referenced by model sentiment:2" in dry.output
    assert "datasets kept" in dry.output
    assert snapshot(session, store) == before

    applied = runner.invoke(cli, ["prune", "--older-than", "45d", "--datasets", "--apply", "--json"])
    assert applied.exit_code == 0, applied.output
    report = json.loads(applied.output)
    assert report["applied"] and report["datasets_included"]
    assert (report["results"], report["job_dirs"], report["datasets"]) == (2, 2, 1)
    assert {"path": f"jobs/{w.old_trained}", "reason": "referenced by model sentiment:2"} in report["skipped"]
    assert result_of(session, w.old_ok) is None and not store.job_dir(w.old_ok).exists()
    assert result_of(session, w.recent_ok) is not None

    bad = runner.invoke(cli, ["prune", "--older-than", "soon"])
    assert bad.exit_code == 2 and "not a duration" in bad.output


def test_cli_older_than_keeps_younger_jobs(cli: typer.Typer, session: Session, store: ArtifactStore) -> None:
    job_id = finished_job(session, age=timedelta(hours=20), result={"x": 1})
    out = CliRunner().invoke(cli, ["prune", "--older-than", "1d", "--apply"])
    assert out.exit_code == 0 and "pruned results of 0 finished jobs" in out.output
    out = CliRunner().invoke(cli, ["prune", "--older-than", "12h", "--apply"])
    assert out.exit_code == 0 and "pruned results of 1 finished jobs" in out.output, out.output
    assert result_of(session, job_id) is None


@pytest.mark.integration
def test_apply_on_postgres(pg_url: str, tmp_path: Path) -> None:
    """The same statements on PostgreSQL (JSONB casts and ->>, UPDATE ... RETURNING), on a shared DB."""
    store = ArtifactStore(tmp_path / "pg-artifacts")
    model = f"retention-{uuid.uuid4().hex[:12]}"
    session = get_sessionmaker(pg_url.replace("postgresql://", "postgresql+psycopg://"))()
    try:
        w = build_world(session, store, model=model)
        at = cutoff()
        dry = prune(session, store, cutoff=at, datasets=True)
        report: PruneReport = prune(session, store, cutoff=at, datasets=True, apply=True)
        # Other tests' rows share this database: assert on ours only.
        assert report.results >= 2 and dry.results == report.results
        assert Skipped(f"jobs/{w.old_trained}", f"referenced by model {model}:2") in report.skipped
        assert (
            Skipped(store.dataset_relpath(w.used_dataset), f"used by unfinished job {w.queued}")
            in report.skipped
        )
        session.expire_all()
        # Read through the ORM, which opens the sealed results (db/sealing.py).
        results: dict[uuid.UUID, Any] = {
            job.id: job.result
            for job in session.scalars(select(Job).where(Job.id.in_([w.old_ok, w.recent_ok])))
        }
        assert results == {w.old_ok: None, w.recent_ok: BIG_RESULT}
        assert session.get(Job, w.old_ok) is not None
        statuses = dict(
            session.execute(select(Job.id, Job.status).where(Job.id.in_([w.queued, w.running]))).all()
        )
        assert statuses == {w.queued: JobStatus.QUEUED, w.running: JobStatus.RUNNING}
        assert not store.job_dir(w.old_ok).exists() and store.job_dir(w.old_trained).exists()
        ours = {w.old_dataset, w.recent_dataset, w.used_dataset}
        assert set(session.scalars(select(Dataset.id).where(Dataset.id.in_(ours)))) == ours - {w.old_dataset}
    finally:
        session.close()
