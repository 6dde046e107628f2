"""Dynamic micro-batching across independently submitted jobs, on a real worker."""

from __future__ import annotations

import os
import signal

import httpx
import pytest
import redis
import torch

from tasks.context import JobContext
from tasks.embed import EmbedParams, run
from tensorq.core.broker import Publisher
from tensorq.core.settings import Settings
from tests.conftest import Service
from tests.helpers import insert_queued_embed_row, tenant_of, wait_job, wait_until
from worker.model_cache import ModelCache

pytestmark = pytest.mark.integration


def test_queued_jobs_share_a_forward_pass_and_each_gets_its_own_result(
    client: httpx.Client, service: Service
) -> None:
    texts = [f"sentence number {i} about {'cats' if i % 2 else 'finance'}" for i in range(40)]
    # Pause the worker so all 40 jobs are waiting when it wakes up.
    broker = redis.Redis.from_url(service.env["TENSORQ_REDIS_URL"])
    os.killpg(service.worker.popen.pid, signal.SIGSTOP)
    try:
        pushes = broker.info("commandstats").get("cmdstat_lpush", {}).get("calls", 0)
        body = {"jobs": [{"kind": "embed", "input": {"texts": [t]}} for t in texts]}
        r = client.post("/v1/jobs:batch", json=body)
        assert r.status_code == 202, r.text
        # Submitted together and batchable together: one message names all 40 (40 <= 64 texts).
        assert broker.info("commandstats")["cmdstat_lpush"]["calls"] - pushes == 1
    finally:
        os.killpg(service.worker.popen.pid, signal.SIGCONT)
        broker.close()
    ids = r.json()["ids"]
    jobs = [wait_job(client, i) for i in ids]
    assert all(j["status"] == "succeeded" for j in jobs)
    # Each job records how many jobs shared its forward pass; 1/batch_size summed is the pass count.
    passes = sum(1 / j["metrics"]["batch_size"] for j in jobs)
    assert round(passes) < len(jobs) / 2, [j["metrics"] for j in jobs]
    # One transaction per batch: jobs of a batch share finished_at.
    assert len({j["finished_at"] for j in jobs}) == round(passes)
    # A batch of more than two texts runs on every core's thread; a text or two on one thread.
    for job in jobs:
        threads = 1 if job["metrics"]["batch_size"] <= 2 else os.cpu_count()
        assert job["metrics"]["cpu_threads"] == threads, job["metrics"]
    ctx = JobContext(models=ModelCache(budget_bytes=2**32))  # load the model once for all 40
    for job, text in zip(jobs, texts, strict=True):
        alone = run(EmbedParams(texts=[text]), ctx).embeddings[0]
        assert len(job["result"]["embeddings"]) == 1
        cos = torch.nn.functional.cosine_similarity(
            torch.tensor(job["result"]["embeddings"][0]), torch.tensor(alone), dim=0
        )
        assert float(cos) > 0.999


def test_a_worker_claims_queued_jobs_only_while_their_texts_fit_one_batch(
    client: httpx.Client, service: Service
) -> None:
    """Jobs of many texts: a claim takes what fits `batch_max_texts` (128), not 128 jobs, so the
    rest stay queued for whichever worker is free."""
    os.killpg(service.worker.popen.pid, signal.SIGSTOP)
    try:
        body = {
            "jobs": [
                {"kind": "embed", "input": {"texts": [f"job {j} text {i}" for i in range(50)]}}
                for j in range(5)
            ]
        }
        r = client.post("/v1/jobs:batch", json=body)
        assert r.status_code == 202, r.text
    finally:
        os.killpg(service.worker.popen.pid, signal.SIGCONT)
    jobs = [wait_job(client, i) for i in r.json()["ids"]]
    assert all(j["status"] == "succeeded" and len(j["result"]["embeddings"]) == 50 for j in jobs)
    # A claim stamps started_at once for every job it takes.
    claims: dict[str, int] = {}
    for job in jobs:
        claims[job["started_at"]] = claims.get(job["started_at"], 0) + 50
    assert max(claims.values()) <= 128, claims


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


def test_a_batch_finishes_in_one_statement_and_only_where_the_claim_still_holds(pg_url: str) -> None:
    """PostgreSQL takes a batch's final states as one UPDATE; each row gets its own outcome."""
    import uuid

    from db.jobs import Claimant, Fill, Outcome, claim_jobs, create_job, finish_jobs
    from db.models import JobStatus
    from db.queries import get_job
    from db.session import session_scope

    url = Settings(database_url=pg_url).sqlalchemy_url
    tenant = f"finish-{uuid.uuid4().hex[:8]}"
    with session_scope(url) as session:
        ids = [
            create_job(
                session,
                tenant=tenant,
                kind="embed",
                params={"texts": [str(i)]},
                queue="q-" + tenant,
                max_attempts=3,
                model="m",
            ).id
            for i in range(4)
        ]
    with session_scope(url) as session:
        jobs = claim_jobs(session, [ids[0]], Claimant("w", "cpu", 60), Fill(4))
    assert sorted(j.id for j in jobs) == sorted(ids)
    ok, failed, stale, cancelled = jobs
    outcomes = [
        Outcome(
            ok.id, ok.claim_token, JobStatus.SUCCEEDED, result={"v": [0.5, -1e-9]}, metrics={"batch_size": 4}
        ),
        Outcome(
            failed.id, failed.claim_token, JobStatus.FAILED, error_type="Bad", error_message="it's \\ bad"
        ),
        Outcome(stale.id, uuid.uuid4(), JobStatus.SUCCEEDED, result={"v": [1.0]}),  # its claim was lost
        Outcome(cancelled.id, cancelled.claim_token, JobStatus.CANCELLED),
    ]
    with session_scope(url) as session:
        assert finish_jobs(session, outcomes) == {ok.id, failed.id, cancelled.id}
    with session_scope(url) as session:
        rows = {i: get_job(session, i) for i in ids}
    assert rows[ok.id].status == JobStatus.SUCCEEDED and rows[ok.id].result == {"v": [0.5, -1e-9]}
    assert rows[ok.id].metrics == {"batch_size": 4} and rows[ok.id].lease_expires_at is None
    assert (rows[failed.id].status, rows[failed.id].error_type) == (JobStatus.FAILED, "Bad")
    assert rows[failed.id].error_message == "it's \\ bad" and rows[failed.id].result is None
    assert rows[stale.id].status == JobStatus.RUNNING and rows[stale.id].result is None
    assert rows[cancelled.id].status == JobStatus.CANCELLED and rows[cancelled.id].finished_at is not None


def test_messages_of_jobs_another_batch_finished_never_reach_the_pool(
    client: httpx.Client, service: Service
) -> None:
    """With a POST per job each job has its own message; once a batch has finished the others'
    jobs, the worker's main process acknowledges their messages without running a task."""
    from tensorq.core.broker import make_celery

    control = make_celery(Settings(redis_url=service.env["TENSORQ_REDIS_URL"]))

    def tasks_run() -> int:
        stats = control.control.inspect(timeout=5, limit=1).stats() or {}  # one worker: its reply
        return sum(node["total"].get("tensorq.embed", 0) for node in stats.values())

    before = tasks_run()
    broker = redis.Redis.from_url(service.env["TENSORQ_REDIS_URL"])
    os.killpg(service.worker.popen.pid, signal.SIGSTOP)
    try:
        ids = [
            client.post("/v1/jobs", json={"kind": "embed", "input": {"texts": [f"own message {i}"]}}).json()[
                "id"
            ]
            for i in range(20)
        ]
    finally:
        os.killpg(service.worker.popen.pid, signal.SIGCONT)
    jobs = [wait_job(client, i) for i in ids]
    assert all(j["status"] == "succeeded" for j in jobs)
    # Every message is consumed and acknowledged (kombu's Redis layout), none left for later.
    wait_until(lambda: not broker.llen("inference") and not broker.hlen("unacked"), timeout=30)
    broker.close()
    # A task per batch ran them; the other messages were acknowledged without one (slack of two
    # for a message fetched before its batch's finish event reached the main process).
    batches = round(sum(1 / j["metrics"]["batch_size"] for j in jobs))
    assert batches <= tasks_run() - before <= batches + 2 < 20


def test_the_workers_torch_threads_spin_only_briefly(service: Service) -> None:
    """TENSORQ_OMP_SPIN_COUNT (default 10000) is in libgomp's environment in the process that runs
    the model, set before torch was imported there."""
    assert "worker process ready on cpu with" in service.worker.log()
    assert "GOMP_SPINCOUNT=10000" in service.worker.log()


def test_a_lone_small_job_runs_on_one_thread(client: httpx.Client) -> None:
    """Waking torch's second OpenMP thread after an idle spell cost a lone job more than its
    forward pass on one thread (docs/performance.md): one or two texts run on one thread."""
    job = client.post(
        "/v1/jobs", json={"kind": "embed", "input": {"texts": ["alone"]}}, headers={"Prefer": "wait=30"}
    )
    assert job.status_code == 201, job.text
    metrics = job.json()["metrics"]
    assert metrics["batch_size"] == 1 and metrics["cpu_threads"] == 1
