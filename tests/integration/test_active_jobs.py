"""The per-tenant active-job count in Redis (tensorq.core.active_jobs): admitted with the rate limit
in one script, taken off by the transitions to a final state, and corrected from the database when
it is missing or drifted; the quota it enforces is the database's."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import redis

from tests.conftest import POSTGRES_ADMIN_URL
from tests.helpers import (
    RedisServer,
    Service,
    create_database,
    drop_database,
    service_env,
    start_service,
    tenant_of,
    wait_job,
)

pytestmark = pytest.mark.integration

QUOTA = 3


@pytest.fixture(scope="module")
def quota_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    tmp: Path = tmp_path_factory.mktemp("quota")
    # A Redis server of its own: the session's shared service has a worker consuming the same
    # queues on the shared one, which took (and dropped, its database lacking the job) this
    # deployment's messages now and then, and a `Prefer: wait` then ran out.
    server = RedisServer(tmp)
    server.start()
    pg_url = create_database(POSTGRES_ADMIN_URL)
    svc = start_service(service_env(pg_url, server.url, tmp, TENSORQ_TENANT_MAX_ACTIVE_JOBS=str(QUOTA)), tmp)
    yield svc
    svc.api.stop()
    svc.worker.stop()
    server.stop()
    drop_database(POSTGRES_ADMIN_URL, pg_url)


def embed(text: str) -> dict[str, object]:
    return {"kind": "embed", "input": {"texts": [text]}}


def counted(svc: Service, tenant: str) -> int | None:
    value = redis.Redis.from_url(svc.env["TENSORQ_REDIS_URL"]).get(f"tensorq:active:{tenant}")
    return None if value is None else int(value)


def active_in_db(svc: Service, tenant: str) -> int:
    with psycopg.connect(svc.env["TENSORQ_DATABASE_URL"]) as conn:
        row = conn.execute(
            "SELECT count(*) FROM jobs WHERE tenant = %s AND status IN ('queued', 'running')", (tenant,)
        ).fetchone()
    return int(row[0]) if row else 0


def test_the_count_follows_submissions_cancellations_and_finishes(quota_service: Service) -> None:
    svc = quota_service
    with svc.client(svc.new_key("counted")) as client:
        tenant = tenant_of(client)
        done = client.post("/v1/jobs", json=embed("one"), headers={"Prefer": "wait=30"})
        assert done.status_code == 201 and counted(svc, tenant) == 0 == active_in_db(svc, tenant)
        os.killpg(svc.worker.popen.pid, signal.SIGSTOP)
        try:
            ids = [client.post("/v1/jobs", json=embed(f"held {i}")).json()["id"] for i in range(QUOTA)]
            assert counted(svc, tenant) == QUOTA == active_in_db(svc, tenant)
            over = client.post("/v1/jobs", json=embed("over"))
            assert over.status_code == 429 and over.headers["retry-after"] == "5"
            assert f"has {QUOTA} jobs queued or running" in over.json()["detail"]
            assert client.post(f"/v1/jobs/{ids[0]}/cancel").status_code == 200
            assert counted(svc, tenant) == QUOTA - 1 == active_in_db(svc, tenant)
        finally:
            os.killpg(svc.worker.popen.pid, signal.SIGCONT)
        for job_id in ids[1:]:
            assert wait_job(client, job_id)["status"] == "succeeded"
        # The worker takes its jobs off after its commit, before it announces them.
        assert counted(svc, tenant) == 0 == active_in_db(svc, tenant)


def test_a_missing_or_drifted_count_is_read_again_from_the_database(quota_service: Service) -> None:
    svc = quota_service
    with svc.client(svc.new_key("drifted")) as client:
        tenant = tenant_of(client)
        broker = redis.Redis.from_url(svc.env["TENSORQ_REDIS_URL"])
        os.killpg(svc.worker.popen.pid, signal.SIGSTOP)
        try:
            first = client.post("/v1/jobs", json=embed("first"))
            assert first.status_code == 202 and counted(svc, tenant) == 1
            broker.delete(f"tensorq:active:{tenant}")  # lost (a Redis restart without its data)
            assert client.post("/v1/jobs", json=embed("second")).status_code == 202
            assert counted(svc, tenant) == 2 == active_in_db(svc, tenant)
            broker.set(f"tensorq:active:{tenant}", 1000)  # drifted high (decrements lost)
            r = client.post("/v1/jobs", json=embed("third"))
            assert r.status_code == 202, r.text  # the database says it fits: admitted, count corrected
            assert counted(svc, tenant) == 3 == active_in_db(svc, tenant)
        finally:
            os.killpg(svc.worker.popen.pid, signal.SIGCONT)
        wait_job(client, r.json()["id"])


def test_tenants_have_counts_of_their_own(quota_service: Service) -> None:
    svc = quota_service
    with svc.client(svc.new_key("tenant-a")) as a, svc.client(svc.new_key("tenant-b")) as b:
        os.killpg(svc.worker.popen.pid, signal.SIGSTOP)
        try:
            held = [a.post("/v1/jobs", json=embed(f"a {i}")).json()["id"] for i in range(QUOTA)]
            assert a.post("/v1/jobs", json=embed("a over")).status_code == 429
            assert b.post("/v1/jobs", json=embed("b")).status_code == 202  # a's quota is not b's
        finally:
            os.killpg(svc.worker.popen.pid, signal.SIGCONT)
        for job_id in held:
            wait_job(a, job_id)
