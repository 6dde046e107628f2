"""Prometheus metrics on the API (/metrics) and on the worker process."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Service
from tests.helpers import wait_job, wait_until

pytestmark = pytest.mark.integration


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_api_and_worker_metrics_follow_the_jobs(client: httpx.Client, service: Service) -> None:
    ids = client.post(
        "/v1/jobs:batch", json={"jobs": [{"kind": "embed", "input": {"texts": [f"m{i}"]}} for i in range(5)]}
    ).json()["ids"]
    for job_id in ids:
        assert wait_job(client, job_id)["status"] == "succeeded"

    def api_metrics() -> dict[tuple[str, tuple[tuple[str, str], ...]], float] | None:
        m = samples(client.get("/metrics").text)
        # The histograms are fed by the workers' job events; give the last one a moment to arrive.
        return m if m.get(("tensorq_job_queue_wait_seconds_count", (("kind", "embed"),)), 0) >= 5 else None

    m = wait_until(api_metrics, timeout=10, what="API histograms")
    assert m[("tensorq_jobs_submitted_total", (("kind", "embed"),))] >= 5
    assert m[("tensorq_jobs_finished_total", (("kind", "embed"), ("status", "succeeded")))] >= 5
    assert ("tensorq_queue_depth", (("queue", "inference"),)) in m
    assert m[("tensorq_job_run_seconds_count", (("kind", "embed"), ("status", "succeeded")))] >= 5

    port = service.env["TENSORQ_WORKER_METRICS_PORT"]
    w = samples(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text)
    assert w[("tensorq_worker_batch_size_count", ())] >= 1
    assert w[("tensorq_worker_jobs_finished_total", (("kind", "embed"), ("status", "succeeded")))] >= 5
    assert w[("tensorq_model_cache_hits_total", ())] >= 1 and w[("tensorq_model_cache_misses_total", ())] >= 1
    assert w[("tensorq_worker_jobs_in_flight", ())] == 0
    assert w[("tensorq_model_cache_bytes", ())] > 50e6
