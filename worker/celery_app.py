"""The Celery app the worker runs: one task per job kind, each named tensorq.<kind>."""

from __future__ import annotations

import logging
import os
from functools import lru_cache
from typing import Any

# Nothing may be downloaded at run time; set before transformers is imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from celery import Celery, Task
from celery.signals import worker_init, worker_process_init

from tasks.registry import JobKind, all_kinds
from tensorq.broker import make_celery
from tensorq.settings import get_settings
from worker.runner import Runner

log = logging.getLogger(__name__)

app: Celery = make_celery(get_settings())

# Celery logs two INFO lines per task; at hundreds of jobs/s that is real CPU. Flower has them.
for _name in ("celery.worker.strategy", "celery.app.trace"):
    logging.getLogger(_name).setLevel(logging.WARNING)


@lru_cache(maxsize=1)
def get_runner() -> Runner:
    return Runner(get_settings())


def _register(kind: JobKind[Any, Any]) -> None:
    @app.task(name=kind.task_name, bind=True)
    def run_job(self: Task, job_id: str) -> str | None:
        status = get_runner().run(kind.name, job_id, worker_name=self.request.hostname or "unknown")
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
    for kind in all_kinds().values():
        if kind.warmup is not None:
            kind.warmup(runner.context())
    log.info("worker process ready on %s with %d torch threads", runner.device, threads)


worker_process_init.connect(_prepare_process)


@worker_init.connect
def _prepare_inline_pool(sender: Any = None, **_: Any) -> None:
    # solo/threads pools run jobs in the main process and never send worker_process_init.
    if get_settings().worker_pool in ("solo", "threads"):
        _prepare_process()
