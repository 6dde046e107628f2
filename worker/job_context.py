"""The job context kinds see in a worker: device, model cache, the tenant's datasets and models,
progress reports and cancellation, all backed by the database and the artifact store. The
tenant's files (datasets, model directories, checkpoints) are sealed with its data key."""

from __future__ import annotations

import dataclasses
import functools
import time
import uuid
from collections.abc import Callable
from typing import Any

from db import registry
from db.jobs import update_progress
from db.keys import Keyring, keyring_for
from db.models import Job
from db.queries import is_cancel_requested
from db.registry import get_dataset
from db.session import get_engine, session_scope
from tasks.context import JobContext, JobError, ResolvedModel
from tasks.datasets import DatasetError, parse_jsonl
from tensorq.core.artifacts import ArtifactStore, UnsafePath
from tensorq.core.crypto import TenantCipher
from tensorq.core.events import EventPublisher
from tensorq.core.sealed_files import SealedFiles
from tensorq.core.settings import Settings
from worker.leases import LeaseKeeper
from worker.model_cache import ModelCache
from worker.retry import skip_if_transient, with_retries


def torch_device(recorded_device: str) -> str:
    """The device inside a pinned process: CUDA_VISIBLE_DEVICES leaves it one GPU, always cuda:0."""
    return "cuda:0" if recorded_device.startswith("cuda") else "cpu"


class ProgressWriter:
    """Keeps the latest progress and writes it at most every `interval` seconds."""

    def __init__(
        self,
        database_url: str,
        job_id: uuid.UUID,
        claim_token: uuid.UUID,
        interval: float,
        events: EventPublisher | None = None,
    ) -> None:
        self.database_url = database_url
        self.events = events
        self.job_id = job_id
        self.claim_token = claim_token
        self.interval = interval
        self._last_write = 0.0
        self._pending: dict[str, Any] | None = None

    def __call__(self, progress: dict[str, Any], force: bool = False) -> None:
        self._pending = progress
        if force or time.monotonic() - self._last_write >= self.interval:
            self.flush()

    def flush(self, final: bool = False) -> None:
        """Write the pending progress. A transient database error skips the write, keeping the
        progress for the next one; the `final` write, with no next one, is retried instead."""
        if self._pending is None:
            return
        if final:
            with_retries(self._write, what=f"progress of job {self.job_id}")
            return
        with skip_if_transient("progress write (kept for the next one)", self.job_id):
            self._write()
        self._last_write = time.monotonic()  # written or not, the next try waits an interval

    def _write(self) -> None:
        assert self._pending is not None
        with session_scope(self.database_url) as session:
            update_progress(session, self.job_id, self.claim_token, self._pending)
        if self.events is not None:
            self.events.changed([self.job_id], running=True)
        self._pending = None
        self._last_write = time.monotonic()


def pins_of(job: Job, version: int | None = None) -> dict[str, int]:
    """The job's model reference pinned to its assigned version (or to `version`, for a shadow
    run); none when the job was assigned none (the reference is resolved as it stands)."""
    version = job.model_version if version is None else version
    return {} if job.model is None or version is None else {job.model: version}


class JobContexts:
    """Makes the context for a batch, a warm-up, or one job of a tenant."""

    def __init__(
        self,
        settings: Settings,
        models: ModelCache,
        leases: LeaseKeeper,
        events: EventPublisher,
        store: ArtifactStore,
    ) -> None:
        self.settings = settings
        self.database_url = settings.sqlalchemy_url
        self.device = torch_device(settings.worker_device)
        self.models = models
        self.leases = leases
        self.events = events
        self.store = store

    def shared(self, tenant: str | None, pins: dict[str, int] | None = None) -> JobContext:
        """For batches and warm-up: shared resources, no per-job progress or cancellation.

        Datasets and registered models are looked up in `tenant`'s namespace only (none without).
        `pins` maps a model reference to the version it resolves to here (`pins_of`)."""
        if tenant is None:
            return JobContext(device=self.device, models=self.models)
        return JobContext(
            device=self.device,
            models=self.models,
            load_dataset=functools.partial(self.load_dataset, tenant),
            resolve_model=functools.partial(self.resolve_model, tenant, pins=pins or {}),
            files=self.files(tenant),
        )

    def files(self, tenant: str) -> SealedFiles:
        """The tenant's files in the artifact store, sealed with its data key. The keyring is
        found when a file is first read or written, inside the job's run (so an error there, a
        missing master key or the database down, is the job's outcome, not the worker's)."""

        def keyring() -> Keyring:
            return keyring_for(get_engine(self.database_url))

        return SealedFiles(
            self.store,
            TenantCipher(tenant, lambda: keyring().active(tenant), lambda v: keyring().key(tenant, v)),
        )

    def for_job(self, job: Job) -> tuple[JobContext, ProgressWriter]:
        """One job's context, with its progress writer (flushed by the caller when the run ends)."""
        assert job.claim_token is not None
        progress = ProgressWriter(
            self.database_url, job.id, job.claim_token, interval=1.0, events=self.events
        )
        ctx = dataclasses.replace(
            self.shared(job.tenant, pins_of(job)),
            job_id=str(job.id),
            work_dir=self.store.job_dir(job.id),
            attempt=job.attempts,
            report=progress,
            cancel_requested=self.cancel_check(job.id),
        )
        return ctx, progress

    def cancel_check(self, jid: uuid.UUID, every: float = 0.5) -> Callable[[], bool]:
        """A cheap check a kind may call every step: the database is asked at most every `every` s."""
        last = 0.0
        requested = False

        def check() -> bool:
            nonlocal last, requested
            if requested or self.leases.cancel_requested(jid):
                return True
            if time.monotonic() - last >= every:
                last = time.monotonic()
                # Skipped, it counts as not requested; the next check asks again.
                with skip_if_transient("cancel check", jid), session_scope(self.database_url) as session:
                    requested = is_cancel_requested(session, jid)
            return requested

        return check

    def load_dataset(self, tenant: str, dataset_id: str) -> list[dict[str, Any]]:
        try:
            ds_id = uuid.UUID(dataset_id)
        except ValueError:
            raise JobError("DatasetNotFound", f"no dataset {dataset_id!r}") from None
        with session_scope(self.database_url) as session:
            ds = get_dataset(session, ds_id, tenant)
        if ds is None:
            raise JobError("DatasetNotFound", f"no dataset {dataset_id!r}")
        try:
            # A sealed file that does not open raises DataIntegrityError, never DatasetUnreadable.
            data = self.files(tenant).read(self.store.path(ds.path))
            return list(parse_jsonl(data, max_rows=self.settings.dataset_max_rows).rows)
        except (OSError, UnsafePath, DatasetError) as exc:
            raise JobError("DatasetUnreadable", f"dataset {dataset_id}: {exc}") from None

    def resolve_model(self, tenant: str, ref: str, pins: dict[str, int] | None = None) -> ResolvedModel:
        """The version `ref` names in the tenant's registry; one pinned for the job (the version
        assigned to it at submission, or a shadow run's) whatever the alias says now."""
        try:
            name = registry.parse_ref(ref).name
            if pins and ref in pins:
                ref = f"{name}:{pins[ref]}"
            with session_scope(self.database_url) as session:
                version = registry.resolve(session, tenant, ref)
                parent = (
                    (version.parent_name, version.parent_version)
                    if version.parent_name is not None and version.parent_version is not None
                    else None
                )
            return ResolvedModel(
                name=name,
                version=version.version,
                path=self.store.path(version.artifact_path),
                task=version.task,
                parent=parent,
            )
        except (registry.RegistryError, ValueError) as exc:
            raise JobError("ModelNotFound", str(exc)) from None
