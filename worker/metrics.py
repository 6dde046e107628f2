"""Prometheus metrics of a worker process (the pool child that runs jobs), served on
TENSORQ_WORKER_METRICS_PORT (+1 + GPU index for GPU workers)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from worker.model_cache import ModelCache

log = logging.getLogger(__name__)

registry = CollectorRegistry()
batch_size = Histogram(
    "tensorq_worker_batch_size",
    "Jobs per forward pass",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
    registry=registry,
)
in_flight = Gauge("tensorq_worker_jobs_in_flight", "Jobs this process holds right now", registry=registry)
jobs_finished = Counter(
    "tensorq_worker_jobs_finished",
    "Jobs this process finished, by kind and status",
    ["kind", "status"],
    registry=registry,
)


class CacheCollector(Collector):
    def __init__(self, cache: Callable[[], ModelCache]) -> None:
        self.cache = cache

    def collect(self) -> Iterator[Metric]:
        cache = self.cache()
        for name, value in (
            ("hits", cache.stats.hits),
            ("misses", cache.stats.misses),
            ("evictions", cache.stats.evictions),
        ):
            yield CounterMetricFamily(f"tensorq_model_cache_{name}", f"Model cache {name}", value=value)
        yield GaugeMetricFamily(
            "tensorq_model_cache_bytes", "Bytes held by cached models", value=cache.used_bytes
        )


class DeviceCollector(Collector):
    def __init__(self, device: str) -> None:
        self.device = device

    def collect(self) -> Iterator[Metric]:
        if not self.device.startswith("cuda"):
            return
        import torch

        g = GaugeMetricFamily("tensorq_device_memory_bytes", "CUDA memory of this process", labels=["kind"])
        g.add_metric(["allocated"], torch.cuda.memory_allocated())
        g.add_metric(["reserved"], torch.cuda.memory_reserved())
        yield g


def serve(host: str, port: int, cache: Callable[[], ModelCache], device: str) -> None:
    registry.register(CacheCollector(cache))
    registry.register(DeviceCollector(device))
    try:
        start_http_server(port, addr=host, registry=registry)
        log.info("worker metrics on http://%s:%d/metrics", host, port)
    except OSError as exc:  # a replaced pool child may find the old one's port still bound
        log.warning("worker metrics not served on port %d: %s", port, exc)
