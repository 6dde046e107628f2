"""The Celery app the worker runs: one task per job kind, each named tensorq.<kind>."""

from __future__ import annotations

import logging
import os
import uuid
from functools import lru_cache
from typing import Any

# Nothing may be downloaded at run time; set before transformers is imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from celery import Celery, Task
from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded
from celery.signals import (
    setup_logging,
    task_failure,
    worker_init,
    worker_process_init,
    worker_ready,
    worker_shutdown,
)

from db.jobs import fail_held_job
from db.models import Job
from db.session import session_scope
from tasks.registry import JobKind, all_kinds, get_kind
from tensorq.core.broker import make_celery
from tensorq.core.logs import configure_logging, job_context
from tensorq.core.presence import Announcer
from tensorq.core.settings import get_settings
from worker.finished import FinishedJobs, skipping_strategy
from worker.job_context import torch_device
from worker.runner import Runner

log = logging.getLogger(__name__)

app: Celery = make_celery(get_settings())


@setup_logging.connect
def _use_tensorq_logging(**_: Any) -> None:
    # Connected, this stops Celery installing its own handlers: its lines come out in our format.
    settings = get_settings()
    configure_logging(settings.log_level, settings.log_format)


# Celery logs two INFO lines per task; at hundreds of jobs/s that is real CPU. Flower has them.
for _name in ("celery.worker.strategy", "celery.app.trace"):
    logging.getLogger(_name).setLevel(logging.WARNING)


def republish(job: Job, delay: float) -> None:
    kind = get_kind(job.kind)
    app.send_task(kind.task_name, args=[str(job.id)], task_id=str(job.id), queue=job.queue, countdown=delay)


@lru_cache(maxsize=1)
def get_runner() -> Runner:
    # Celery raises SoftTimeLimitExceeded inside a job at its soft limit; the runner knows it only as a timeout.
    return Runner(get_settings(), republish=republish, timeout_errors=(SoftTimeLimitExceeded,))


# Messages whose jobs another message's batch (or another worker) already finished are
# acknowledged in this main process, without a trip through the pool (see worker/finished.py).
finished_jobs = FinishedJobs(get_settings().redis_url)


def _register(kind: JobKind[Any, Any]) -> None:
    soft, hard = get_settings().time_limits.get(kind.name, (kind.soft_time_limit, kind.time_limit))

    @app.task(
        name=kind.task_name,
        bind=True,
        soft_time_limit=soft,
        time_limit=hard,
        Strategy=staticmethod(skipping_strategy(finished_jobs)),  # a class attribute: not bound
    )
    def run_job(self: Task, job_id: str, *more_job_ids: str) -> str | None:
        # A message names one job, or a group submitted together (see api.routes.jobs.message_groups).
        with job_context(job_id):
            status = get_runner().run(
                kind.name, job_id, worker_name=self.request.hostname or "unknown", also=more_job_ids
            )
        return status.value if status else None


for _kind in all_kinds().values():
    _register(_kind)


def _prepare_process(**_: Any) -> None:
    """In the process that runs jobs: thread count, then load models before the first job."""
    import torch

    settings = get_settings()
    threads = settings.torch_threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    runner = get_runner()
    if settings.worker_metrics_port:
        from worker import metrics

        port = settings.worker_metrics_port
        if runner.device.startswith("cuda:"):
            port += 1 + int(runner.device.split(":")[1])
        metrics.serve(
            settings.worker_metrics_host,
            port,
            cache=lambda: runner.models,
            device=torch_device(runner.device),
        )
    for kind in all_kinds().values():
        if kind.warmup is not None:
            kind.warmup(runner.context(None))
    if settings.benchmark_skip_forward_pass:
        log.warning("BENCHMARK MODE: embed jobs skip the forward pass; their results are not embeddings")
    # What libgomp itself read (set by `tensorq worker` from TENSORQ_OMP_SPIN_COUNT), not a setting.
    spin = os.environ.get("GOMP_SPINCOUNT", "libgomp default")
    log.info(
        "worker process ready on %s with %d torch threads, GOMP_SPINCOUNT=%s", runner.device, threads, spin
    )


worker_process_init.connect(_prepare_process)


@worker_init.connect
def _prepare_main_process(sender: Any = None, **_: Any) -> None:
    if get_settings().worker_pool in ("solo", "threads"):
        # These pools run jobs in the main process and never send worker_process_init.
        _prepare_process()
        return
    # Importing (not initialising CUDA) before the fork makes every pool child start in a
    # fraction of the time, which matters when one is replaced after a hard time limit.
    import torch  # noqa: F401
    import transformers.models.bert.modeling_bert  # noqa: F401


_node: dict[str, str] = {}


_announcer: list[Announcer] = []


@worker_ready.connect
def _remember_node(sender: Any = None, **_: Any) -> None:
    _node["name"] = sender.hostname
    # From the main process: the queues this worker consumes, so the API can tell a job that
    # requires a device no worker has (tensorq/core/presence.py).
    queues = [q.name for q in sender.task_consumer.queues]
    announcer = Announcer(get_settings().redis_url, sender.hostname, queues)
    announcer.start()
    _announcer.append(announcer)


@worker_shutdown.connect
def _stop_announcing(**_: Any) -> None:
    while _announcer:
        _announcer.pop().stop()


@task_failure.connect
def _fail_on_hard_time_limit(
    sender: Any = None, exception: BaseException | None = None, args: Any = None, **_: Any
) -> None:
    """Celery killed the pool child at the hard limit: its claim token died with it, so the parent
    fails the job it held (and only if this node still holds it)."""
    if not isinstance(exception, TimeLimitExceeded) or not args or "name" not in _node:
        return
    for arg in args:  # every job the message named (jobs it batched in from elsewhere: leases)
        job_id = uuid.UUID(str(arg))
        with job_context(job_id), session_scope(get_settings().sqlalchemy_url) as session:
            failed = fail_held_job(
                session,
                job_id,
                worker=_node["name"],
                error_type="Timeout",
                message=f"hard time limit exceeded ({exception}); the job's process was killed",
            )
        if failed:
            log.error("job %s: hard time limit exceeded, failed", job_id, extra={"job_id": str(job_id)})
            get_runner().events.changed([job_id], final=True)
