"""Leases against Redis redelivery and worker death, on real workers."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests.conftest import POSTGRES_ADMIN_URL
from tests.faults.conftest import RedisServer
from tests.helpers import (
    Proc,
    create_database,
    drop_database,
    service_env,
    start_service,
    training_job,
    wait_job,
    wait_until,
)

pytestmark = pytest.mark.integration


def test_job_longer_than_the_visibility_timeout_runs_once(redis_server: RedisServer, tmp_path: Path) -> None:
    """Redis hands the unacknowledged message to the second worker after 2 s; the live lease wins."""
    pg = create_database(POSTGRES_ADMIN_URL)
    env = service_env(pg, redis_server.url, tmp_path, TENSORQ_VISIBILITY_TIMEOUT_SECONDS="2")
    svc = start_service(env, tmp_path)
    other = Proc("worker-b", ["worker", "--gpus", "none"], env, tmp_path)
    try:
        wait_until(lambda: "worker process ready" in other.log(), timeout=120, what="second worker")
        with svc.client() as client:
            job = client.post("/v1/jobs", json=training_job("long", epochs=6)).json()
            done = wait_job(client, job["id"], timeout=300)
        assert done["status"] == "succeeded", done
        assert done["attempts"] == 1
        logs = svc.worker.log() + other.log()
        started = done["started_at"]
        assert f"job {job['id']}: not claimable" in logs, (
            "the message was not redelivered; nothing was tested"
        )
        assert done["started_at"] == started and done["result"]["resumed_from_step"] is None
    finally:
        other.stop()
        svc.api.stop()
        svc.worker.stop()
        drop_database(POSTGRES_ADMIN_URL, pg)


def test_job_whose_worker_dies_with_no_attempts_left_fails_with_a_reason(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    pg = create_database(POSTGRES_ADMIN_URL)
    env = service_env(
        pg,
        redis_server.url,
        tmp_path,
        TENSORQ_MAX_ATTEMPTS="1",
        TENSORQ_LEASE_SECONDS="2",
        TENSORQ_SWEEP_INTERVAL_SECONDS="0.5",
    )
    svc = start_service(env, tmp_path)
    try:
        with svc.client() as client:
            job = client.post("/v1/jobs", json=training_job("doomed", epochs=20)).json()
            wait_until(
                lambda: client.get(f"/v1/jobs/{job['id']}").json()["status"] == "running",
                timeout=120,
                what="running",
            )
            svc.worker.stop(signal.SIGKILL)
            done = wait_job(client, job["id"], timeout=60)
        assert done["status"] == "failed"
        assert done["error"]["type"] == "WorkerLost" and "no attempts are left" in done["error"]["message"]
        assert done["attempts"] == 1
    finally:
        svc.api.stop()
        svc.worker.stop()
        drop_database(POSTGRES_ADMIN_URL, pg)
