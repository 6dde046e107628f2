"""Dynamic micro-batching across independently submitted jobs, on a real worker."""

from __future__ import annotations

import os
import signal

import httpx
import pytest
import torch

from tasks.context import JobContext
from tasks.embed import EmbedParams, run
from tensorq.broker import Publisher
from tensorq.settings import Settings
from tests.conftest import Service
from tests.helpers import insert_queued_embed_row, tenant_of, wait_job
from worker.model_cache import ModelCache

pytestmark = pytest.mark.integration


def test_queued_jobs_share_a_forward_pass_and_each_gets_its_own_result(
    client: httpx.Client, service: Service
) -> None:
    texts = [f"sentence number {i} about {'cats' if i % 2 else 'finance'}" for i in range(40)]
    # Pause the worker so all 40 jobs are waiting when it wakes up.
    os.killpg(service.worker.popen.pid, signal.SIGSTOP)
    try:
        body = {"jobs": [{"kind": "embed", "input": {"texts": [t]}} for t in texts]}
        r = client.post("/v1/jobs:batch", json=body)
        assert r.status_code == 202, r.text
    finally:
        os.killpg(service.worker.popen.pid, signal.SIGCONT)
    ids = r.json()["ids"]
    jobs = [wait_job(client, i) for i in ids]
    assert all(j["status"] == "succeeded" for j in jobs)
    # Each job records how many jobs shared its forward pass; 1/batch_size summed is the pass count.
    passes = sum(1 / j["metrics"]["batch_size"] for j in jobs)
    assert round(passes) < len(jobs) / 2, [j["metrics"] for j in jobs]
    # One transaction per batch: jobs of a batch share finished_at.
    assert len({j["finished_at"] for j in jobs}) == round(passes)
    ctx = JobContext(models=ModelCache(budget_bytes=2**32))  # load the model once for all 40
    for job, text in zip(jobs, texts, strict=True):
        alone = run(EmbedParams(texts=[text]), ctx).embeddings[0]
        assert len(job["result"]["embeddings"]) == 1
        cos = torch.nn.functional.cosine_similarity(
            torch.tensor(job["result"]["embeddings"][0]), torch.tensor(alone), dim=0
        )
        assert float(cos) > 0.999


def test_a_bad_job_in_a_batch_fails_alone(client: httpx.Client, service: Service, pg_url: str) -> None:
    # Params that pass no schema can only come from the database (e.g. written by an older version):
    # insert such a row beside good jobs, publish it, and let them batch together.
    bad_id = insert_queued_embed_row(pg_url, tenant_of(client), {"texts": "not a list"}, published=False)
    good = [{"kind": "embed", "input": {"texts": [f"good {i}"]}} for i in range(10)]
    ids = client.post("/v1/jobs:batch", json={"jobs": good}).json()["ids"]
    publisher = Publisher(Settings(redis_url=service.env["TENSORQ_REDIS_URL"]))
    publisher.publish("tensorq.embed", bad_id, "inference")
    publisher.close()
    bad = wait_job(client, bad_id)
    assert bad["status"] == "failed" and bad["error"]["type"] == "InvalidParams"
    assert all(wait_job(client, i)["status"] == "succeeded" for i in ids)
