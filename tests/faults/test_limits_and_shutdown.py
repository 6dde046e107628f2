"""Time limits end runaway jobs with `failed: Timeout`; SIGTERM lets a worker finish and the API drain."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import POSTGRES_ADMIN_URL
from tests.faults.conftest import RedisServer
from tests.helpers import (
    create_database,
    drop_database,
    service_env,
    start_service,
    training_job,
    wait_job,
    wait_until,
)

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    ("limits", "expected"),
    [((2, 120), "soft time limit"), ((None, 3), "hard time limit")],
    ids=["soft", "hard"],
)
def test_time_limits_fail_a_runaway_job_with_timeout(
    redis_server: RedisServer, tmp_path: Path, limits: tuple[int | None, int], expected: str
) -> None:
    pg = create_database(POSTGRES_ADMIN_URL)
    env = service_env(
        pg, redis_server.url, tmp_path, TENSORQ_TIME_LIMITS=json.dumps({"train-text-classifier": limits})
    )
    svc = start_service(env, tmp_path)
    try:
        with svc.client() as client:
            job = client.post("/v1/jobs", json=training_job("runaway", epochs=50)).json()
            done = wait_job(client, job["id"], timeout=120)
            assert done["status"] == "failed", done
            assert done["error"]["type"] == "Timeout" and expected in done["error"]["message"]
            # The worker is usable afterwards (after a hard kill Celery starts a new pool child).
            follow = client.post(
                "/v1/jobs", json={"kind": "embed", "input": {"texts": ["still alive"]}}
            ).json()
            assert wait_job(client, follow["id"], timeout=120)["status"] == "succeeded"
            assert client.get("/v1/models/runaway").status_code == 404
    finally:
        svc.api.stop()
        svc.worker.stop()
        drop_database(POSTGRES_ADMIN_URL, pg)


def test_sigterm_lets_the_worker_finish_its_job_and_the_api_drain(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    pg = create_database(POSTGRES_ADMIN_URL)
    svc = start_service(service_env(pg, redis_server.url, tmp_path), tmp_path)
    try:
        client = svc.client()
        job = client.post("/v1/jobs", json=training_job("graceful", epochs=2)).json()
        wait_until(lambda: client.get(f"/v1/jobs/{job['id']}").json()["status"] == "running", timeout=60)
        svc.worker.popen.send_signal(signal.SIGTERM)  # to the main process, as a container runtime does
        time.sleep(1)
        later = client.post("/v1/jobs", json={"kind": "embed", "input": {"texts": ["after SIGTERM"]}}).json()
        assert svc.worker.popen.wait(timeout=180) == 0
        assert client.get(f"/v1/jobs/{job['id']}").json()["status"] == "succeeded"
        # It stopped taking work: the job submitted after SIGTERM is still waiting for a worker.
        assert client.get(f"/v1/jobs/{later['id']}").json()["status"] == "queued"

        # The API answers the requests it is holding before it exits.
        answers: list[int] = []

        def long_poll() -> None:
            answers.append(
                httpx.get(
                    f"{svc.base_url}/v1/jobs/{later['id']}",
                    params={"wait": 3},
                    headers={"Authorization": f"Bearer {svc.api_key}"},
                    timeout=30,
                ).status_code
            )

        poller = threading.Thread(target=long_poll)
        poller.start()
        time.sleep(0.5)
        svc.api.popen.send_signal(signal.SIGTERM)
        poller.join(timeout=30)
        assert answers == [200]
        # uvicorn re-raises the signal after its graceful shutdown, so "killed by SIGTERM" is clean.
        assert svc.api.popen.wait(timeout=30) in (0, -signal.SIGTERM)
    finally:
        svc.api.stop()
        svc.worker.stop()
        drop_database(POSTGRES_ADMIN_URL, pg)
