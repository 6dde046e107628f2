"""Prometheus metrics of the API process, served at /metrics.

Counts by kind and status and queue depths are read from the database and Redis at scrape time,
so every API replica reports the same totals. The submit-to-start and run-time histograms are
observed from the workers' job events, which every replica receives: scrape one replica for them
(or aggregate with max, not sum).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from db.queries import count_jobs
from db.session import session_scope
from tensorq.core.broker import Publisher, all_queues
from tensorq.core.settings import Settings

SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 3600, 6 * 3600)


class StateCollector(Collector):
    def __init__(self, settings: Settings, publisher: Publisher) -> None:
        self.settings = settings
        self.publisher = publisher

    def collect(self) -> Iterator[Metric]:
        jobs = GaugeMetricFamily(
            "tensorq_jobs", "Jobs in the database by kind and status", labels=["kind", "status"]
        )
        finished = CounterMetricFamily(
            "tensorq_jobs_finished",
            "Jobs that reached a final status, by kind and status",
            labels=["kind", "status"],
        )
        with session_scope(self.settings.sqlalchemy_url) as session:
            for kind, status, n in count_jobs(session):
                jobs.add_metric([kind, status.value], n)
                if status.terminal:
                    finished.add_metric([kind, status.value], n)
        yield jobs
        yield finished
        depth = GaugeMetricFamily(
            "tensorq_queue_depth", "Messages waiting in each Redis queue", labels=["queue"]
        )
        try:
            for queue, n in self.publisher.queue_depths(all_queues()).items():
                depth.add_metric([queue], n)
        except Exception:  # Redis away: the metric is absent rather than the scrape failing
            return
        yield depth


class ApiMetrics:
    def __init__(self, settings: Settings, publisher: Publisher) -> None:
        self.registry = CollectorRegistry()
        self.submitted = Counter(
            "tensorq_jobs_submitted",
            "Jobs accepted by POST /v1/jobs and /v1/jobs:batch",
            ["kind"],
            registry=self.registry,
        )
        self.queue_wait = Histogram(
            "tensorq_job_queue_wait_seconds",
            "From submission to the start of the job's final attempt",
            ["kind"],
            buckets=SECONDS,
            registry=self.registry,
        )
        self.run_time = Histogram(
            "tensorq_job_run_seconds",
            "From start to final status",
            ["kind", "status"],
            buckets=SECONDS,
            registry=self.registry,
        )
        self.registry.register(StateCollector(settings, publisher))

    def observe_finished(self, info: dict[str, Any]) -> None:
        try:
            kind, status = str(info["kind"]), str(info["status"])
            self.queue_wait.labels(kind).observe(float(info["queue_s"]))
            self.run_time.labels(kind, status).observe(float(info["run_s"]))
        except (KeyError, TypeError, ValueError):
            pass
