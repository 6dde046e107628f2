"""Retention: prune what finished jobs and old uploads leave behind, keeping the job history.

For finished jobs (succeeded, failed, cancelled) whose `finished_at` is before a cutoff:

* their stored `result` is cleared (SQL NULL); the row itself, with status, error, metrics,
  params and timestamps, stays, so the job history is never deleted;
* their artifact directory `jobs/<job_id>` is deleted, unless a registered model version's
  `artifact_path` lies inside it (a trained model lives in its training job's directory).

With `datasets=True`, uploaded datasets created before the cutoff go too, row and file, unless a
queued or running job names them. A finished job never needs its dataset again; only a rerun
would, and that is the price of asking for datasets.

A dry run (`apply=False`) reads exactly what an applied run would change and changes nothing, so
both give the same report. Applying commits as it goes: results in batches (no long transaction
over a big jobs table), and dataset rows before their files are removed, so a failure in between
leaves a stray file rather than a row naming a missing file. `status` is never written here.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import ColumnElement, LargeBinary, Text, and_, cast, delete, func, null, select, update
from sqlalchemy.orm import Session

from db.models import Dataset, Job, JobStatus, Model, ModelVersion, utcnow
from db.sealing import open_column
from tensorq.core.artifacts import ArtifactStore, UnsafePath

FINISHED = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)
UNFINISHED = (JobStatus.QUEUED, JobStatus.RUNNING)
# Ids per statement: well under SQLite's bound-parameter limit, small enough for short transactions.
BATCH = 500


@dataclass(frozen=True)
class Skipped:
    """Something old enough to prune that was kept (or could not be removed), and why."""

    path: str  # relative to the artifact store, e.g. "jobs/<id>" or "datasets/<id>.jsonl"
    reason: str


@dataclass
class PruneReport:
    """What a prune would free (dry run) or freed (applied); the same numbers for the same state."""

    cutoff: datetime
    applied: bool
    datasets_included: bool
    results: int = 0  # finished jobs whose stored result is cleared
    result_bytes: int = 0  # size of those results as JSON text
    job_dirs: int = 0
    job_dir_bytes: int = 0
    datasets: int = 0
    dataset_bytes: int = 0
    removed: list[str] = field(default_factory=list)  # job directories and dataset files
    skipped: list[Skipped] = field(default_factory=list)  # kept on purpose
    errors: list[Skipped] = field(default_factory=list)  # meant to go, but removing failed

    @property
    def total_bytes(self) -> int:
        return self.result_bytes + self.job_dir_bytes + self.dataset_bytes

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["cutoff"] = self.cutoff.isoformat()
        data["total_bytes"] = self.total_bytes
        return data


def prune(
    session: Session,
    store: ArtifactStore,
    *,
    cutoff: datetime,
    datasets: bool = False,
    apply: bool = False,
) -> PruneReport:
    """Prune (or, by default, only report) everything older than `cutoff`; see the module doc."""
    report = PruneReport(cutoff=cutoff, applied=apply, datasets_included=datasets)
    report.results, report.result_bytes = prune_results(session, cutoff=cutoff, apply=apply)
    prune_job_dirs(session, store, report, apply=apply)
    if datasets:
        prune_datasets(session, store, report, apply=apply)
    return report


# Results


def _old_result(cutoff: datetime) -> ColumnElement[bool]:
    """A finished job's non-empty result older than the cutoff; the condition of the clearing UPDATE."""
    return and_(
        Job.status.in_(FINISHED),
        Job.finished_at < cutoff,
        Job.result.is_not(None),
        # finish_jobs stores a missing result as JSON null: nothing to free there.
        cast(Job.result, Text) != "null",
    )


def _result_size(session: Session) -> ColumnElement[int]:
    text = cast(Job.result, Text)
    if session.get_bind().dialect.name == "postgresql":
        return func.octet_length(text)
    # SQLite's length() counts characters of TEXT but bytes of a BLOB.
    return func.length(cast(text, LargeBinary))


def prune_results(session: Session, *, cutoff: datetime, apply: bool, batch: int = BATCH) -> tuple[int, int]:
    """Clear the results of finished jobs older than `cutoff`; (jobs, bytes) cleared or clearable."""
    old, size = _old_result(cutoff), _result_size(session)
    if not apply:
        count, total = session.execute(
            select(func.count(), func.coalesce(func.sum(size), 0)).where(old)
        ).one()
        return int(count), int(total)
    count = total = 0
    last: uuid.UUID | None = None
    while True:
        # Keyset over ids, so a row that stops matching in between cannot stall the loop.
        stmt = select(Job.id, size).where(old).order_by(Job.id).limit(batch)
        if last is not None:
            stmt = stmt.where(Job.id > last)
        sizes: dict[uuid.UUID, int] = {job_id: int(n or 0) for job_id, n in session.execute(stmt)}
        if not sizes:
            return count, total
        last = max(sizes)
        # Conditional: only rows still finished, old and holding a result; never `status`.
        cleared = session.scalars(
            update(Job)
            .where(Job.id.in_(sizes), old)
            .values(result=null(), updated_at=utcnow())
            .returning(Job.id)
            .execution_options(synchronize_session=False)
        ).all()
        session.commit()
        count += len(cleared)
        total += sum(sizes[job_id] for job_id in cleared)


# Job directories


def _tree_bytes(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):  # vanished meanwhile: nothing to count
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def _model_artifacts(session: Session, store: ArtifactStore) -> list[tuple[Path, str]]:
    """(absolute artifact path, "name:version") of every registered model version."""
    rows = session.execute(
        select(ModelVersion.artifact_path, Model.name, ModelVersion.version)
        .join(Model, Model.id == ModelVersion.model_id)
        .order_by(Model.name, ModelVersion.version)
    )
    artifacts = []
    for artifact_path, name, version in rows:
        with contextlib.suppress(UnsafePath):  # such a path cannot point into the store at all
            artifacts.append((store.path(artifact_path), f"{name}:{version}"))
    return artifacts


def _job_dir_entries(store: ArtifactStore) -> list[tuple[uuid.UUID, Path]]:
    """The store's `jobs/<uuid>` entries, by the canonical name `ArtifactStore.job_dir` gives them."""
    jobs_root = store.path("jobs")
    if not jobs_root.is_dir():
        return []
    entries = []
    for entry in sorted(jobs_root.iterdir()):
        try:
            job_id = uuid.UUID(entry.name)
        except ValueError:
            continue  # not a job's directory; not ours to judge
        if str(job_id) == entry.name:
            entries.append((job_id, entry))
    return entries


def _chunks(items: Sequence[uuid.UUID], size: int) -> Iterable[Sequence[uuid.UUID]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def prune_job_dirs(session: Session, store: ArtifactStore, report: PruneReport, *, apply: bool) -> None:
    """Delete `jobs/<id>` of finished jobs older than the report's cutoff, keeping model artifacts.

    The store is listed rather than the jobs table: a handful of directories outlive their jobs,
    while the table holds the whole history.
    """
    entries = _job_dir_entries(store)
    jobs: dict[uuid.UUID, tuple[JobStatus, datetime | None]] = {}
    for chunk in _chunks([job_id for job_id, _ in entries], BATCH):
        rows = session.execute(select(Job.id, Job.status, Job.finished_at).where(Job.id.in_(chunk)))
        jobs.update({job_id: (status, finished) for job_id, status, finished in rows})
    artifacts = _model_artifacts(session, store)
    for job_id, entry in entries:
        rel = f"jobs/{job_id}"
        if job_id not in jobs:
            # Without its row nothing says how old or finished it is.
            report.skipped.append(Skipped(rel, "no job with this id"))
            continue
        status, finished = jobs[job_id]
        if status not in FINISHED or finished is None or finished >= report.cutoff:
            continue  # in use or recent: not a candidate at all
        if entry.is_symlink() or not entry.is_dir():
            # rmtree on a link would empty whatever it points at; the store never makes one.
            report.skipped.append(Skipped(rel, "not a plain directory"))
            continue
        work_dir = store.job_dir(job_id)
        # Either way round: a version pointing at the directory's parent would lose part of itself too.
        refs = [
            ref for path, ref in artifacts if path.is_relative_to(work_dir) or work_dir.is_relative_to(path)
        ]
        if refs:
            report.skipped.append(Skipped(rel, f"referenced by model {', '.join(refs)}"))
            continue
        size = _tree_bytes(work_dir)
        if apply:
            try:
                shutil.rmtree(work_dir)
            except OSError as exc:
                report.errors.append(Skipped(rel, f"could not delete: {exc}"))
                continue
        report.job_dirs += 1
        report.job_dir_bytes += size
        report.removed.append(rel)


# Datasets


def _datasets_in_use(session: Session) -> dict[uuid.UUID, list[uuid.UUID]]:
    """Dataset id -> queued or running jobs naming it in their params (they load it when they run)."""
    # The params are sealed (db/sealing.py), so they are opened here rather than read in SQL;
    # unfinished jobs are bounded by the tenants' active-job quotas.
    rows = session.execute(select(Job.id, Job.tenant, Job.params).where(Job.status.in_(UNFINISHED)))
    bind = session.get_bind()
    in_use: dict[uuid.UUID, list[uuid.UUID]] = {}
    for job_id, tenant, sealed in rows:
        params = open_column(bind, Job, tenant, job_id, "params", sealed)
        # An unreadable job still protects nothing: it fails on its own (DataIntegrityError).
        dataset_id = params.get("dataset_id") if isinstance(params, dict) else None
        if isinstance(dataset_id, str):
            with contextlib.suppress(ValueError):  # such a job fails on its own: DatasetNotFound
                in_use.setdefault(uuid.UUID(dataset_id), []).append(job_id)
    return in_use


def prune_datasets(session: Session, store: ArtifactStore, report: PruneReport, *, apply: bool) -> None:
    """Delete datasets created before the report's cutoff, rows and files, unless a job still needs them.

    A job queued right after the check may still name a dataset deleted here; it then fails with
    DatasetNotFound, as it would for any unknown id.
    """
    in_use = _datasets_in_use(session)
    datasets_root = store.path("datasets")
    old = session.execute(
        select(Dataset.id, Dataset.path)
        .where(Dataset.created_at < report.cutoff)
        .order_by(Dataset.created_at)
    ).all()
    doomed: list[tuple[uuid.UUID, str, Path, int]] = []
    for dataset_id, relpath in old:
        if dataset_id in in_use:
            users = ", ".join(str(j) for j in sorted(in_use[dataset_id]))
            report.skipped.append(Skipped(relpath, f"used by unfinished job {users}"))
            continue
        try:
            file = store.path(relpath)
        except UnsafePath:
            report.skipped.append(Skipped(relpath, "not a safe artifact path"))
            continue
        if not file.is_relative_to(datasets_root):
            # Uploads live under datasets/; anything else was put there by hand.
            report.skipped.append(Skipped(relpath, "file is outside datasets/"))
            continue
        size = file.stat().st_size if file.is_file() else 0
        doomed.append((dataset_id, relpath, file, size))
    if apply:
        for chunk in _chunks([d[0] for d in doomed], BATCH):
            session.execute(
                delete(Dataset)
                .where(Dataset.id.in_(chunk), Dataset.created_at < report.cutoff)
                .execution_options(synchronize_session=False)
            )
        # Rows first: once committed, no new job can find the dataset, and a file left behind is
        # only litter, never a dataset whose file is missing.
        session.commit()
    for _dataset_id, relpath, file, size in doomed:
        if apply:
            try:
                file.unlink(missing_ok=True)
            except OSError as exc:
                report.errors.append(Skipped(relpath, f"row deleted, file not: {exc}"))
                size = 0
        report.datasets += 1
        report.dataset_bytes += size
        report.removed.append(relpath)
