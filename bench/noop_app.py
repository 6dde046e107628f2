"""A bare Celery app with one no-op task: the round trip tensorq's overhead is compared with."""

from __future__ import annotations

import os

from celery import Celery

# The benchmark passes its Redis URL in; this module is a script's helper, not part of tensorq.
BROKER = os.environ["BENCH_REDIS_URL"]

app = Celery("bench-noop", broker=BROKER, backend=BROKER)
app.conf.update(
    task_serializer="json", result_serializer="json", accept_content=["json"], worker_prefetch_multiplier=1
)


@app.task(name="bench.noop")
def noop() -> None:
    return None
