"""A pretrain-mlm worker SIGKILLed mid-epoch: the lease runs out, the job is claimed again and another
worker process resumes it from the last checkpoint (the end of the first epoch)."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import redis

from tasks.data import make_domain_corpus as corpus
from tests.conftest import POSTGRES_ADMIN_URL
from tests.helpers import (
    Proc,
    create_database,
    drop_database,
    service_env,
    start_service,
    wait_job,
    wait_until,
)

pytestmark = pytest.mark.integration

TEXTS = 120  # 108 to train on: 7 steps an epoch at batch 16
STEPS_PER_EPOCH = 7


def test_pretraining_resumes_on_another_worker_after_sigkill_mid_epoch(
    redis_url: str, tmp_path: Path
) -> None:
    # Its own database and Redis database, so the shared service's worker and sweeper stay out of it.
    pg = create_database(POSTGRES_ADMIN_URL)
    env = service_env(
        pg,
        redis_url.rpartition("/")[0] + "/13",
        tmp_path,
        TENSORQ_LEASE_SECONDS="3",
        TENSORQ_SWEEP_INTERVAL_SECONDS="1",
    )
    redis.Redis.from_url(env["TENSORQ_REDIS_URL"]).flushdb()
    svc = start_service(env, tmp_path)
    try:
        with svc.client() as client:
            data = "\n".join(json.dumps(row) for row in corpus.domain_rows(TEXTS)).encode()
            ds = client.post("/v1/datasets", content=data, headers={"content-type": "application/x-ndjson"})
            assert ds.status_code == 201 and ds.json()["labelled"] is False
            r = client.post(
                "/v1/jobs",
                json={
                    "kind": "pretrain-mlm",
                    "input": {
                        "dataset_id": ds.json()["id"],
                        "model_name": "resumed-mlm",
                        "epochs": 2,
                        "batch_size": 16,
                        "max_length": 16,
                        "learning_rate": 5e-4,
                    },
                },
            )
            assert r.status_code == 202, r.text
            job_id = r.json()["id"]

            # Past the first epoch's checkpoint, mid-way through the second epoch: kill the worker.
            def mid_second_epoch() -> bool:
                progress = client.get(f"/v1/jobs/{job_id}").json()["progress"] or {}
                return STEPS_PER_EPOCH < progress.get("step", 0) < 2 * STEPS_PER_EPOCH

            wait_until(mid_second_epoch, timeout=400, interval=0.2, what="mid second epoch")
            svc.worker.stop(signal.SIGKILL)
            assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "running"
            second = Proc("worker2", ["worker", "--gpus", "none"], env, tmp_path)
            try:
                done = wait_job(client, job_id, timeout=400)
            finally:
                second.stop()
            assert done["status"] == "succeeded", (done, second.log()[-3000:])
            result = done["result"]
            assert done["attempts"] == 2
            assert result["resumed_from_step"] == STEPS_PER_EPOCH  # the end-of-epoch checkpoint
            assert result["steps"] == 2 * STEPS_PER_EPOCH
            assert result["metrics"]["perplexity_after"] < result["metrics"]["perplexity_before"]
            model = client.get("/v1/models/resumed-mlm").json()
            assert model["latest_version"] == 1 and model["versions"][0]["task"] == "masked-lm"
    finally:
        svc.api.stop()
        svc.worker.stop()
        drop_database(POSTGRES_ADMIN_URL, pg)
