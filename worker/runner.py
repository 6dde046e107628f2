"""claim -> run the job kind -> commit the final state. Celery acks the message after this returns."""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from pydantic import ValidationError

from db.jobs import Outcome, claim_job, finish_jobs, update_progress
from db.models import Job, JobStatus
from db.session import session_scope
from tasks.context import JobCancelled, JobContext, JobError
from tasks.registry import get_kind
from tensorq.settings import Settings
from worker.leases import LeaseKeeper
from worker.model_cache import ModelCache

log = logging.getLogger(__name__)

MAX_ERROR_CHARS = 2000


class ProgressWriter:
    """Keeps the latest progress and writes it at most every `interval` seconds."""

    def __init__(self, database_url: str, job_id: uuid.UUID, claim_token: uuid.UUID, interval: float) -> None:
        self.database_url = database_url
        self.job_id = job_id
        self.claim_token = claim_token
        self.interval = interval
        self._last_write = 0.0
        self._pending: dict[str, Any] | None = None

    def __call__(self, progress: dict[str, Any], force: bool = False) -> None:
        self._pending = progress
        if force or time.monotonic() - self._last_write >= self.interval:
            self.flush()

    def flush(self) -> None:
        if self._pending is None:
            return
        with session_scope(self.database_url) as session:
            update_progress(session, self.job_id, self.claim_token, self._pending)
        self._pending = None
        self._last_write = time.monotonic()


def torch_device(recorded_device: str) -> str:
    """The device inside a pinned process: CUDA_VISIBLE_DEVICES leaves it one GPU, always cuda:0."""
    return "cuda:0" if recorded_device.startswith("cuda") else "cpu"


class Runner:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.database_url = settings.sqlalchemy_url
        self.device = settings.worker_device
        self.models = ModelCache(settings.model_cache_bytes)
        self.leases = LeaseKeeper(self.database_url, settings.lease_seconds)

    def context(self, job_id: uuid.UUID | None = None) -> JobContext:
        return JobContext(device=torch_device(self.device), models=self.models, job_id=str(job_id))

    def run(self, job_id: str, worker_name: str) -> JobStatus | None:
        """Run one job if it can be claimed; returns its final status, or None if it was not ours."""
        jid = uuid.UUID(job_id)
        with session_scope(self.database_url) as session:
            job = claim_job(
                session,
                jid,
                worker=worker_name,
                device=self.device,
                lease_seconds=self.settings.lease_seconds,
            )
        if job is None:
            log.info("job %s: not claimable (finished, cancelled, or held by a live worker)", job_id)
            return None
        assert job.claim_token is not None
        log.info("job %s: claimed (attempt %d/%d) on %s", job_id, job.attempts, job.max_attempts, self.device)
        self.leases.hold(jid, job.claim_token)
        try:
            outcome = self.execute(job)
            with session_scope(self.database_url) as session:
                written = finish_jobs(session, [outcome])
        finally:
            self.leases.release(jid)
        if jid not in written:
            log.warning("job %s: lost its claim before finishing; result discarded", job_id)
            return None
        log.info("job %s: %s", job_id, outcome.status.value)
        return outcome.status

    def execute(self, job: Job) -> Outcome:
        assert job.claim_token is not None
        jid, token = job.id, job.claim_token
        progress = ProgressWriter(self.database_url, jid, token, interval=1.0)
        ctx = JobContext(
            device=torch_device(self.device),
            models=self.models,
            job_id=str(jid),
            report=progress,
            cancel_requested=lambda: self.leases.cancel_requested(jid),
        )

        def failed(error_type: str, message: str) -> Outcome:
            return Outcome(
                jid, token, JobStatus.FAILED, error_type=error_type, error_message=message[:MAX_ERROR_CHARS]
            )

        try:
            kind = get_kind(job.kind)
            result = kind.run_json(job.params, ctx)
            progress.flush()
            return Outcome(jid, token, JobStatus.SUCCEEDED, result=result)
        except JobCancelled:
            return Outcome(jid, token, JobStatus.CANCELLED)
        except JobError as exc:
            return failed(exc.error_type, exc.message)
        except KeyError as exc:
            return failed("UnknownKind", str(exc))
        except ValidationError as exc:
            return failed("InvalidParams", str(exc))
        except Exception as exc:
            log.exception("job %s: unexpected error", jid)
            return failed(type(exc).__name__, str(exc) or repr(exc))
