"""claim -> run the job kind -> commit the final state. Celery acks the message after this returns.

Inference kinds that can batch are run with dynamic micro-batching: the job a message names is
claimed together with other queued jobs of the same kind and model (see `claim_jobs`), up to
`batch_max_texts` texts; if the queue is flowing but the batch is not full, the runner waits up to
`batch_max_wait_ms` once for more. A lone job (nothing else queued) is never held. All final states
of a batch are written in one transaction. Messages for jobs that joined another message's batch
find them finished (or held by a live lease) and are acknowledged as duplicates.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import shutil
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded
from pydantic import BaseModel, ValidationError

from db import registry
from db.jobs import (
    Outcome,
    claim_jobs,
    finish_job,
    finish_jobs,
    get_job,
    is_cancel_requested,
    no_attempts_left,
    release_job,
    update_progress,
)
from db.models import Job, JobStatus, utcnow
from db.session import session_scope
from db.snapshots import job_snapshot
from tasks.context import JobCancelled, JobContext, JobError, ResolvedModel
from tasks.registry import JobKind, get_kind
from tensorq.artifacts import ArtifactStore, UnsafePath
from tensorq.datasets import DatasetError, parse_jsonl
from tensorq.events import EventPublisher
from tensorq.settings import Settings
from worker import metrics
from worker.leases import LeaseKeeper
from worker.model_cache import ModelCache
from worker.retry import backoff_delay, is_transient, skip_if_transient, with_retries

log = logging.getLogger(__name__)

MAX_ERROR_CHARS = 2000


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


class RecentlyFinished:
    """Ids of jobs this process finished as part of another message's batch (bounded)."""

    def __init__(self, size: int = 50_000) -> None:
        self._order: deque[uuid.UUID] = deque()
        self._ids: set[uuid.UUID] = set()
        self.size = size

    def add(self, job_id: uuid.UUID) -> None:
        self._order.append(job_id)
        self._ids.add(job_id)
        while len(self._order) > self.size:
            self._ids.discard(self._order.popleft())

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._ids


def finished_info(jobs: list[Job], outcomes: list[Outcome], written: set[uuid.UUID]) -> list[dict[str, Any]]:
    """What the API needs about each finished job (sent with the job-change event): figures for
    its histograms, and whether a webhook is due."""
    by_id = {job.id: job for job in jobs}
    now = utcnow()
    info = []
    for o in outcomes:
        job = by_id.get(o.job_id)
        if job is None or o.job_id not in written or job.started_at is None:
            continue
        info.append({
            "kind": job.kind, "status": o.status.value,
            "queue_s": (job.started_at - job.created_at).total_seconds(),
            "run_s": (now - job.started_at).total_seconds(),
            "webhook": job.webhook_url is not None,
        })  # fmt: skip
    return info


def run_metrics(batch_size: int, started: float, cpu_threads: int | None) -> dict[str, Any]:
    """Recorded on the job: how many jobs shared its forward pass, how long that took, and on how
    many CPU threads (None on a GPU)."""
    metrics.batch_size.observe(batch_size)
    recorded = {"batch_size": batch_size, "run_ms": round((time.perf_counter() - started) * 1000, 3)}
    return recorded if cpu_threads is None else {**recorded, "cpu_threads": cpu_threads}


def torch_device(recorded_device: str) -> str:
    """The device inside a pinned process: CUDA_VISIBLE_DEVICES leaves it one GPU, always cuda:0."""
    return "cuda:0" if recorded_device.startswith("cuda") else "cpu"


@contextlib.contextmanager
def torch_threads(one: bool) -> Iterator[int]:
    """Torch's CPU threads for one run: one if `one` (see `Runner.small_forward`), else as set."""
    import torch

    threads = torch.get_num_threads()
    if not one:
        yield threads
        return
    torch.set_num_threads(1)
    try:
        yield 1
    finally:
        torch.set_num_threads(threads)


def chunks_by_cost(
    items: list[tuple[Job, BaseModel]], kind: JobKind[Any, Any], max_cost: int
) -> Iterator[tuple[list[tuple[Job, BaseModel]], int]]:
    """Consecutive chunks of at most `max_cost` (a lone item may exceed it), each with its cost."""
    chunk: list[tuple[Job, BaseModel]] = []
    cost = 0
    for job, params in items:
        c = kind.batch_cost(params)
        if chunk and cost + c > max_cost:
            yield chunk, cost
            chunk, cost = [], 0
        chunk.append((job, params))
        cost += c
    if chunk:
        yield chunk, cost


def failed(job: Job, error_type: str, message: str) -> Outcome:
    assert job.claim_token is not None
    return Outcome(
        job.id,
        job.claim_token,
        JobStatus.FAILED,
        error_type=error_type,
        error_message=message[:MAX_ERROR_CHARS],
    )


def outcome_of_error(job: Job, exc: Exception) -> Outcome:
    assert job.claim_token is not None
    if isinstance(exc, SoftTimeLimitExceeded):
        return failed(job, "Timeout", "soft time limit exceeded")
    if is_transient(exc):
        log.warning(
            "job %s: transient %s, will retry: %s",
            job.id,
            type(exc).__name__,
            exc,
            extra={"job_id": str(job.id)},
        )
        return Outcome(
            job.id, job.claim_token, JobStatus.QUEUED, error_type=type(exc).__name__,
            error_message=(str(exc) or repr(exc))[:MAX_ERROR_CHARS],
        )  # fmt: skip
    if isinstance(exc, JobCancelled):
        return Outcome(job.id, job.claim_token, JobStatus.CANCELLED)
    if isinstance(exc, JobError):
        return failed(job, exc.error_type, exc.message)
    if isinstance(exc, ValidationError):
        return failed(job, "InvalidParams", str(exc))
    log.error("job %s: unexpected error", job.id, exc_info=exc, extra={"job_id": str(job.id)})
    return failed(job, type(exc).__name__, str(exc) or repr(exc))


Republish = Callable[[Job, float], None]


class Runner:
    def __init__(self, settings: Settings, republish: Republish | None = None) -> None:
        self.settings = settings
        # Sends a released job's message again after a delay (wired to Celery by worker/celery_app).
        self.republish = republish
        self.database_url = settings.sqlalchemy_url
        self.device = settings.worker_device
        self.models = ModelCache(settings.model_cache_bytes)
        self.leases = LeaseKeeper(self.database_url, settings.lease_seconds)
        self.finished_in_batches = RecentlyFinished()
        self.events = EventPublisher(settings.redis_url)
        self.store = ArtifactStore(settings.artifact_dir)

    def context(self, tenant: str | None) -> JobContext:
        """For batches and warm-up: shared resources, no per-job progress or cancellation.

        Datasets and registered models are looked up in `tenant`'s namespace only (none without)."""
        if tenant is None:
            return JobContext(device=torch_device(self.device), models=self.models)
        return JobContext(
            device=torch_device(self.device),
            models=self.models,
            load_dataset=functools.partial(self.load_dataset, tenant),
            resolve_model=functools.partial(self.resolve_model, tenant),
        )

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
        jobs = self.claim(kind, named, worker_name)
        if not jobs or jobs[0].id != named[0]:
            log.info("job %s: not claimable (finished, cancelled, or held by a live worker)", named[0])
            if not jobs:
                return None
        self.hold(jobs)
        try:
            more = self.top_up(kind, jobs, worker_name)
            self.hold(more)
            jobs += more
            self.events.changed((job.id for job in jobs), running=True)
            if len(jobs) > 1 and self.batches(kind):
                outcomes = self.execute_batch(kind, jobs)
            else:  # one job, or a named group with batching switched off here
                outcomes = [self.execute(kind, job) for job in jobs]
            outcomes = self.drop_lost(outcomes)
            tenants = {job.id: job.tenant for job in jobs}
            outcomes, written, rows = with_retries(
                lambda: self.commit(kind, outcomes, tenants), what=f"finish job {jid}"
            )
            self.clean_work_dirs([o for o in outcomes if o.job_id in written])
            self.events.changed(
                written, finished=finished_info(jobs, outcomes, written), final=True, rows=rows
            )
            for o in outcomes:
                if o.job_id in written:
                    metrics.jobs_finished.labels(kind.name, o.status.value).inc()
        finally:
            metrics.in_flight.dec(len(jobs))
            for job in jobs:
                self.leases.release(job.id)
        for outcome in outcomes:
            if outcome.job_id not in written:
                log.warning(
                    "job %s: lost its claim before finishing; result discarded", outcome.job_id,
                    extra={"job_id": str(outcome.job_id)},
                )  # fmt: skip
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
                    "may run elsewhere, so this run stopped and writes nothing", o.job_id,
                    extra={"job_id": str(o.job_id)},
                )  # fmt: skip
            else:
                kept.append(o)
        return kept

    def cpu_threads(self, threads: int | None) -> int | None:
        return threads if torch_device(self.device) == "cpu" else None

    def small_forward(self, kind: JobKind[Any, Any], work: dict[str, Any] | int) -> bool:
        """Whether an inference forward pass is small enough for one CPU thread.

        Waking the second OpenMP thread after an idle spell cost a lone one-text job 12-24 ms of
        model time on a 2-vCPU VM, against 9 on one thread (docs/performance.md)."""
        limit = self.settings.one_thread_max_texts
        if limit <= 0 or kind.run_batch is None or torch_device(self.device) != "cpu":
            return False
        if isinstance(work, dict):
            try:
                work = kind.batch_cost(kind.params.model_construct(**work))
            except Exception:
                return False
        return work <= limit

    def batches(self, kind: JobKind[Any, Any]) -> bool:
        s = self.settings
        return s.batching and kind.run_batch is not None and s.batch_max_texts > 1

    def claim_args(self, kind: JobKind[Any, Any], worker_name: str) -> dict[str, Any]:
        return {
            "worker": worker_name,
            "device": self.device,
            "lease_seconds": self.settings.lease_seconds,
            "same_tenant": kind.reads_tenant_data,
        }

    def claim(self, kind: JobKind[Any, Any], named: list[uuid.UUID], worker_name: str) -> list[Job]:
        s = self.settings
        jid = named[0]

        def claim() -> list[Job]:
            with session_scope(self.database_url) as session:
                return claim_jobs(
                    session, jid, **self.claim_args(kind, worker_name), also_named=named[1:], kind=kind.name,
                    same_as_job=True, fill_to_cost=s.batch_max_texts if self.batches(kind) else 0,
                )  # fmt: skip

        return with_retries(claim, what=f"claim job {jid}")

    def top_up(self, kind: JobKind[Any, Any], jobs: list[Job], worker_name: str) -> list[Job]:
        """More jobs for a batch that is not full while the queue is flowing, after one short wait.

        An optimisation: when the claim fails even after its retries, the batch goes ahead with the
        jobs it has, which are held already and must not wait out their leases for it."""
        s = self.settings
        texts = sum(j.batch_cost for j in jobs)
        if not self.batches(kind) or len(jobs) == 1 or s.batch_max_wait_ms <= 0 or texts >= s.batch_max_texts:
            return []
        first = jobs[0]
        # The queue is flowing: give the batch one short wait to fill.
        time.sleep(s.batch_max_wait_ms / 1000)

        def claim() -> list[Job]:
            with session_scope(self.database_url) as session:
                return claim_jobs(
                    session, None, **self.claim_args(kind, worker_name), kind=kind.name, model=first.model,
                    queue=first.queue, tenant=first.tenant, fill_to_cost=s.batch_max_texts - texts,
                )  # fmt: skip

        try:
            return with_retries(claim, what=f"top up the batch of job {first.id}")
        except Exception as exc:
            log.warning(
                "job %s: batch top-up failed (%s: %s); going ahead with the %d jobs claimed", first.id,
                type(exc).__name__, exc, len(jobs), exc_info=not is_transient(exc),
            )  # fmt: skip
            return []

    def execute(self, kind: JobKind[Any, Any], job: Job) -> Outcome:
        assert job.claim_token is not None
        jid, token = job.id, job.claim_token
        progress = ProgressWriter(self.database_url, jid, token, interval=1.0, events=self.events)
        ctx = dataclasses.replace(
            self.context(job.tenant),
            job_id=str(jid),
            work_dir=self.store.job_dir(jid),
            attempt=job.attempts,
            report=progress,
            cancel_requested=self.cancel_check(jid),
        )
        started, threads = time.perf_counter(), None
        try:
            with torch_threads(self.small_forward(kind, job.params)) as threads:
                result = kind.run_json(job.params, ctx)
            progress.flush(final=True)
            outcome = Outcome(jid, token, JobStatus.SUCCEEDED, result=result)
        except Exception as exc:
            outcome = outcome_of_error(job, exc)
        return dataclasses.replace(outcome, metrics=run_metrics(1, started, self.cpu_threads(threads)))

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
            ds = registry.get_dataset(session, ds_id, tenant)
        if ds is None:
            raise JobError("DatasetNotFound", f"no dataset {dataset_id!r}")
        try:
            data = self.store.path(ds.path).read_bytes()
            return list(parse_jsonl(data, max_rows=self.settings.dataset_max_rows).rows)
        except (OSError, UnsafePath, DatasetError) as exc:
            raise JobError("DatasetUnreadable", f"dataset {dataset_id}: {exc}") from None

    def resolve_model(self, tenant: str, ref: str) -> ResolvedModel:
        try:
            with session_scope(self.database_url) as session:
                version = registry.resolve(session, tenant, ref)
                name = registry.parse_ref(ref).name
            return ResolvedModel(
                name=name, version=version.version, path=self.store.path(version.artifact_path)
            )
        except (registry.RegistryError, ValueError) as exc:
            raise JobError("ModelNotFound", str(exc)) from None

    def commit(
        self, kind: JobKind[Any, Any], outcomes: list[Outcome], tenants: dict[uuid.UUID, str]
    ) -> tuple[list[Outcome], set[uuid.UUID], list[dict[str, Any]]]:
        """Final states (and model versions) in one transaction: the outcomes as written, their ids,
        and a lone job's row as committed (a snapshot for its finished event; none for a batch)."""
        with session_scope(self.database_url) as session:
            requeued: list[uuid.UUID] = []
            gave_up: list[Outcome] = []  # released, but out of attempts: failed, final like the rest
            for o in (o for o in outcomes if o.status == JobStatus.QUEUED):
                state = release_job(
                    session, o.job_id, o.claim_token, error_type=o.error_type or "",
                    message=o.error_message or "",
                )  # fmt: skip
                if state == JobStatus.QUEUED:
                    requeued.append(o.job_id)
                elif state == JobStatus.FAILED:
                    message = no_attempts_left(o.error_message or "")
                    gave_up.append(dataclasses.replace(o, status=state, error_message=message))
            outcomes = [o for o in outcomes if o.status != JobStatus.QUEUED]
            if kind.registers_model:
                outcomes = [self.register_model(session, o, tenants[o.job_id]) for o in outcomes]
            rows: list[dict[str, Any]] = []
            if len(outcomes) == 1:
                row = finish_job(session, outcomes[0])
                written = set() if row is None else {outcomes[0].job_id}
                rows = [] if row is None else [job_snapshot(row)]
            else:
                written = finish_jobs(session, outcomes)
            if kind.registers_model and len(written) < len(outcomes):
                session.rollback()  # no model version for a job whose claim was lost
                return outcomes, set(), []
        self.publish_released(requeued)
        return outcomes + gave_up, written | {o.job_id for o in gave_up}, rows

    def publish_released(self, job_ids: list[uuid.UUID]) -> None:
        """Jobs given back after a transient error go out again after an exponential, jittered delay."""
        if not job_ids or self.republish is None:
            return
        with session_scope(self.database_url) as session:
            jobs = [
                j
                for j in (get_job(session, i) for i in job_ids)
                if j is not None and j.status == JobStatus.QUEUED
            ]
        for job in jobs:
            self.republish(job, backoff_delay(job.attempts, base=1.0, cap=60.0))

    def clean_work_dirs(self, outcomes: list[Outcome]) -> None:
        """A finished job's checkpoints go; only the model a registry version points at stays."""
        for outcome in outcomes:
            work_dir = self.store.job_dir(outcome.job_id)
            if not work_dir.exists():
                continue
            artifact = (outcome.result or {}).get("artifact")
            keep = self.store.path(artifact) if isinstance(artifact, str) else None
            for entry in work_dir.iterdir():
                if keep is None or not keep.is_relative_to(entry):
                    shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(
                        missing_ok=True
                    )
            if keep is None:
                shutil.rmtree(work_dir, ignore_errors=True)

    def register_model(self, session: Any, outcome: Outcome, tenant: str) -> Outcome:
        """Register a training job's output as the next version of its model, in the job's transaction."""
        if outcome.status != JobStatus.SUCCEEDED or outcome.result is None:
            return outcome
        result = dict(outcome.result)
        artifact = self.store.relative(Path(result.pop("artifact_dir")))
        version = registry.register_version(
            session, tenant=tenant, name=result["model"], artifact_path=artifact, labels=result["labels"],
            metrics=result["metrics"], job_id=outcome.job_id,
        )  # fmt: skip
        return dataclasses.replace(
            outcome, result={**result, "version": version.version, "artifact": artifact}
        )

    def execute_batch(self, kind: JobKind[Any, Any], jobs: list[Job]) -> list[Outcome]:
        assert kind.run_batch is not None
        outcomes: list[Outcome] = []
        valid: list[tuple[Job, BaseModel]] = []
        for job in jobs:
            try:
                valid.append((job, kind.params.model_validate(job.params)))
            except ValidationError as exc:
                outcomes.append(outcome_of_error(job, exc))
        # Claims batch one tenant's jobs together unless the kind reads no tenant data.
        ctx = self.context(jobs[0].tenant if kind.reads_tenant_data else None)
        for chunk, texts in chunks_by_cost(valid, kind, self.settings.batch_max_texts):
            started = time.perf_counter()
            try:
                with torch_threads(self.small_forward(kind, texts)) as threads:
                    results = kind.run_batch([params for _, params in chunk], ctx)
            except Exception as exc:
                if len(chunk) == 1 or isinstance(exc, SoftTimeLimitExceeded):
                    outcomes += [outcome_of_error(job, exc) for job, _ in chunk]
                    continue
                # One bad job must not fail its neighbours: find it by running them one by one.
                log.warning(
                    "batch of %d %s jobs failed (%s); running them one by one", len(chunk), kind.name, exc
                )
                outcomes += [self.execute(kind, job) for job, _ in chunk]
                continue
            metrics = run_metrics(len(chunk), started, self.cpu_threads(threads))
            for (job, _), result in zip(chunk, results, strict=True):
                assert job.claim_token is not None
                outcomes.append(
                    Outcome(
                        job.id,
                        job.claim_token,
                        JobStatus.SUCCEEDED,
                        result=result.model_dump(mode="json"),
                        metrics=metrics,
                    )
                )
        return outcomes
