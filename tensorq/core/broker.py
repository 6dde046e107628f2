"""Celery configuration and publishing, shared by the API (producer) and the worker (consumer).

Routing: a job goes to the queue of its kind's category, `inference` or `training`, or, when it
asks for a device, `gpu.<category>` / `cpu.<category>`. GPU workers consume `inference`,
`training`, `gpu.inference`, `gpu.training`; CPU workers `inference`, `training`, `cpu.inference`,
`cpu.training`. A message
carries only job ids (the database row holds params and secrets stay out of Flower): one job's, or,
for jobs submitted together that the worker would batch anyway, a group's. Its Celery task id is
the (first) job's id, so Flower shows which job a task is.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

from celery import Celery

from tensorq.core.settings import Settings

log = logging.getLogger(__name__)

CATEGORIES = ("inference", "training")
DEVICE_CHOICES = ("any", "gpu", "cpu")


def queue_for(category: str, device: str = "any") -> str:
    """The queue of a job of this category that requires `device` (gpu, cpu) or accepts any."""
    return category if device == "any" else f"{device}.{category}"


def all_queues() -> list[str]:
    return [*CATEGORIES, *(queue_for(c, d) for c in CATEGORIES for d in ("gpu", "cpu"))]


def queues_for_worker(on_gpu: bool) -> list[str]:
    own = "gpu" if on_gpu else "cpu"
    return [*CATEGORIES, *(queue_for(c, own) for c in CATEGORIES)]


def celery_config(settings: Settings) -> dict[str, Any]:
    return {
        "broker_url": settings.redis_url,
        # JSON only: a worker that accepts pickle runs whatever a broker client sends.
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "event_serializer": "json",
        "result_accept_content": ["json"],
        # The database holds results; Celery keeps none.
        "task_ignore_result": True,
        "result_backend": None,
        # At-least-once: ack after the job's final state is committed, requeue if the child dies.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        # Must be set on the app the worker uses (celery/celery#7651); leases guard what it cannot.
        # kombu sweeps for expired unacked messages only every interval x throttle seconds (100 s by
        # default); tie the sweep to the visibility timeout so redelivery happens when it says.
        "broker_transport_options": {
            "visibility_timeout": settings.visibility_timeout_seconds,
            "unacked_restore_interval": max(1, min(10, settings.visibility_timeout_seconds // 4)),
            "unacked_restore_throttle": 1,
        },
        "broker_connection_retry_on_startup": True,
        # Flower needs events.
        "worker_send_task_events": True,
        "task_send_sent_event": settings.task_sent_events,
        "task_default_queue": "inference",
        # Pool children load their models in worker_process_init, which takes seconds; Celery's
        # 4 s default would kill a replacement child (after a hard time limit) before it is up.
        "worker_proc_alive_timeout": 180,
        "worker_hijack_root_logger": False,
        "enable_utc": True,
    }


def make_celery(settings: Settings, name: str = "tensorq") -> Celery:
    app = Celery(name)
    app.conf.update(celery_config(settings))
    return app


# The API publishes after the job's row is committed, and the sweeper publishes whatever that
# missed, so a publish must fail fast rather than retry: with kombu's defaults every submission
# took 6 s while Redis was down (one quick retry, then give up: 0.1-0.2 s refused, ~2 s black-holed).
FAIL_FAST_TRANSPORT_OPTIONS = {
    "max_retries": 1,
    "interval_start": 0.1,
    "interval_step": 0.1,
    "interval_max": 0.1,
    "socket_connect_timeout": 1.0,
    "socket_timeout": 2.0,
}
# After a failure, publishing is not tried again for this long (the sweeper catches up).
BROKER_RETRY_AFTER_SECONDS = 1.0


class BrokerUnavailable(ConnectionError):
    """Publishing failed moments ago; not tried again yet."""


class Publisher:
    """Sends job messages by task name, without importing the job kinds."""

    def __init__(self, settings: Settings) -> None:
        self.app = make_celery(settings, name="tensorq-producer")
        self.app.conf.broker_transport_options = {
            **self.app.conf.broker_transport_options,
            **FAIL_FAST_TRANSPORT_OPTIONS,
        }
        self._down_until = 0.0

    def publish(self, task_name: str, job_id: str, queue: str) -> None:
        self.app.send_task(task_name, args=[job_id], task_id=job_id, queue=queue, retry=False)

    def publish_many(self, messages: Iterable[tuple[str, str, str]]) -> None:
        self.publish_groups((task_name, [job_id], queue) for task_name, job_id, queue in messages)

    def publish_groups(self, groups: Iterable[tuple[str, list[str], str]]) -> None:
        """One message per group of job ids; its task id is the first job's id."""
        if time.monotonic() < self._down_until:
            raise BrokerUnavailable("the broker was unreachable moments ago")
        try:
            with self.app.producer_or_acquire() as producer:
                for task_name, job_ids, queue in groups:
                    self.app.send_task(
                        task_name,
                        args=job_ids,
                        task_id=job_ids[0],
                        queue=queue,
                        producer=producer,
                        retry=False,
                    )
        except Exception:
            self._down_until = time.monotonic() + BROKER_RETRY_AFTER_SECONDS
            raise

    def ping(self) -> None:
        with self.app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
            conn.default_channel.client.ping()

    def queue_depths(self, queues: list[str]) -> dict[str, int]:
        with self.app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
            client = conn.default_channel.client
            return {queue: int(client.llen(queue)) for queue in queues}

    def broker_run_id(self) -> str:
        """Changes when Redis restarts; a restarted Redis without persistence has lost its queues."""
        with self.app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
            return str(conn.default_channel.client.info("server")["run_id"])

    def close(self) -> None:
        self.app.close()
