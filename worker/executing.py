"""Running claimed jobs: one at a time, or a batch's params through one forward pass, each job's
outcome (success, a typed failure, a transient error to retry, a cancellation) as an `Outcome`."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel, ValidationError

from db.jobs import Outcome
from db.models import Job, JobStatus
from db.sealing import check_readable
from tasks.context import JobCancelled, JobContext, JobError, JobTimeout
from tasks.registry import JobKind
from tensorq.core.crypto import DataIntegrityError
from tensorq.core.settings import Settings
from worker import benchmark_mode, metrics
from worker.job_context import JobContexts, pins_of
from worker.retry import is_transient

log = logging.getLogger(__name__)

MAX_ERROR_CHARS = 2000


def run_metrics(batch_size: int, started: float, cpu_threads: int | None) -> dict[str, Any]:
    """Recorded on the job: how many jobs shared its forward pass, how long that took, and on how
    many CPU threads (None on a GPU)."""
    metrics.batch_size.observe(batch_size)
    recorded = {"batch_size": batch_size, "run_ms": round((time.perf_counter() - started) * 1000, 3)}
    return recorded if cpu_threads is None else {**recorded, "cpu_threads": cpu_threads}


@contextlib.contextmanager
def torch_threads(one: bool) -> Iterator[int]:
    """Torch's CPU threads for one run: one if `one` (see `Executor.small_forward`), else as set."""
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
        tenant=job.tenant,
    )


def outcome_of_error(job: Job, exc: Exception) -> Outcome:
    assert job.claim_token is not None
    if isinstance(exc, JobTimeout):
        return failed(job, "Timeout", str(exc) or "soft time limit exceeded")
    if is_transient(exc):
        log.warning(
            "job %s: transient %s, will retry: %s",
            job.id,
            type(exc).__name__,
            exc,
            extra={"job_id": str(job.id)},
        )
        return Outcome(
            job.id,
            job.claim_token,
            JobStatus.QUEUED,
            error_type=type(exc).__name__,
            error_message=(str(exc) or repr(exc))[:MAX_ERROR_CHARS],
            tenant=job.tenant,
        )
    if isinstance(exc, JobCancelled):
        return Outcome(job.id, job.claim_token, JobStatus.CANCELLED, tenant=job.tenant)
    if isinstance(exc, JobError):
        return failed(job, exc.error_type, exc.message)
    if isinstance(exc, ValidationError):
        return failed(job, "InvalidParams", str(exc))
    if isinstance(exc, DataIntegrityError):
        # A sealed file or value of the tenant's that did not open (tampered with, moved, or its
        # data key destroyed): permanent, typed, never run on, and one log line naming the object.
        log.error("job %s: %s", job.id, exc, extra={"job_id": str(job.id)})
        return failed(job, DataIntegrityError.error_type, str(exc))
    log.error("job %s: unexpected error", job.id, exc_info=exc, extra={"job_id": str(job.id)})
    return failed(job, type(exc).__name__, str(exc) or repr(exc))


class Executor:
    """`timeout_errors` are what the transport raises inside a job at its soft time limit (Celery's
    SoftTimeLimitExceeded, given by worker/celery_app.py); they become `JobTimeout` here, so this
    core knows no transport."""

    def __init__(
        self,
        settings: Settings,
        contexts: JobContexts,
        timeout_errors: tuple[type[BaseException], ...] = (),
    ) -> None:
        self.settings = settings
        self.contexts = contexts
        self.timeout_errors = timeout_errors

    def as_timeout(self, exc: Exception) -> Exception:
        if self.timeout_errors and isinstance(exc, self.timeout_errors):
            return JobTimeout("soft time limit exceeded")
        return exc

    def on_cpu(self) -> bool:
        return self.contexts.device == "cpu"

    def cpu_threads(self, threads: int | None) -> int | None:
        return threads if self.on_cpu() else None

    def batches(self, kind: JobKind[Any, Any]) -> bool:
        s = self.settings
        return s.batching and kind.run_batch is not None and s.batch_max_texts > 1

    def small_forward(self, kind: JobKind[Any, Any], work: dict[str, Any] | int) -> bool:
        """Whether an inference forward pass is small enough for one CPU thread.

        Waking the second OpenMP thread after an idle spell cost a lone one-text job 12-24 ms of
        model time on a 2-vCPU VM, against 9 on one thread (docs/performance.md)."""
        limit = self.settings.one_thread_max_texts
        if limit <= 0 or kind.run_batch is None or not self.on_cpu():
            return False
        if isinstance(work, dict):
            try:
                work = kind.batch_cost(kind.params.model_construct(**work))
            except Exception:
                return False
        return work <= limit

    def execute(self, kind: JobKind[Any, Any], job: Job) -> Outcome:
        assert job.claim_token is not None
        ctx, progress = self.contexts.for_job(job)
        started, threads = time.perf_counter(), None
        try:
            check_readable(job.params)
            with torch_threads(self.small_forward(kind, job.params)) as threads:
                if self.settings.benchmark_skip_forward_pass and benchmark_mode.skips(kind):
                    params = kind.params.model_validate(job.params)
                    result = benchmark_mode.embed_results([params])[0].model_dump(mode="json")
                else:
                    result = kind.run_json(job.params, ctx)
            progress.flush(final=True)
            outcome = Outcome(job.id, job.claim_token, JobStatus.SUCCEEDED, result=result, tenant=job.tenant)
        except Exception as exc:
            outcome = outcome_of_error(job, self.as_timeout(exc))
        return dataclasses.replace(outcome, metrics=run_metrics(1, started, self.cpu_threads(threads)))

    def execute_batch(self, kind: JobKind[Any, Any], jobs: list[Job]) -> list[Outcome]:
        assert kind.run_batch is not None
        outcomes: list[Outcome] = []
        valid: list[tuple[Job, BaseModel]] = []
        for job in jobs:
            try:
                check_readable(job.params)
                valid.append((job, kind.params.model_validate(job.params)))
            except (ValidationError, DataIntegrityError) as exc:
                outcomes.append(outcome_of_error(job, exc))
        # Claims batch one tenant's jobs together unless the kind reads no tenant data, and jobs of
        # one model version (db.batching); a group named by an older message may still mix them.
        tenant = jobs[0].tenant if kind.reads_tenant_data else None
        for pinned in dict.fromkeys((job.model, job.model_version) for job, _ in valid):
            group = [(job, params) for job, params in valid if (job.model, job.model_version) == pinned]
            outcomes += self.run_group(kind, group, self.contexts.shared(tenant, pins_of(group[0][0])))
        return outcomes

    def run_group(
        self, kind: JobKind[Any, Any], valid: list[tuple[Job, BaseModel]], ctx: JobContext
    ) -> list[Outcome]:
        """Jobs that may share a forward pass, through it in chunks of at most batch_max_texts."""
        assert kind.run_batch is not None
        outcomes: list[Outcome] = []
        for chunk, texts in chunks_by_cost(valid, kind, self.settings.batch_max_texts):
            started = time.perf_counter()
            try:
                with torch_threads(self.small_forward(kind, texts)) as threads:
                    if self.settings.benchmark_skip_forward_pass and benchmark_mode.skips(kind):
                        results = benchmark_mode.embed_results([params for _, params in chunk])
                    else:
                        results = kind.run_batch([params for _, params in chunk], ctx)
            except Exception as exc:
                exc = self.as_timeout(exc)
                if len(chunk) == 1 or isinstance(exc, JobTimeout):
                    outcomes += [outcome_of_error(job, exc) for job, _ in chunk]
                    continue
                # One bad job must not fail its neighbours: find it by running them one by one.
                log.warning(
                    "batch of %d %s jobs failed (%s); running them one by one", len(chunk), kind.name, exc
                )
                outcomes += [self.execute(kind, job) for job, _ in chunk]
                continue
            recorded = run_metrics(len(chunk), started, self.cpu_threads(threads))
            for (job, _), result in zip(chunk, results, strict=True):
                assert job.claim_token is not None
                outcomes.append(
                    Outcome(
                        job.id,
                        job.claim_token,
                        JobStatus.SUCCEEDED,
                        result=result.model_dump(mode="json"),
                        metrics=recorded,
                        tenant=job.tenant,
                    )
                )
        return outcomes
