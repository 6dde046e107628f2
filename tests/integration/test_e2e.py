"""Submit over HTTP -> PostgreSQL row -> Redis -> real `tensorq worker` -> poll the result."""

from __future__ import annotations

import json
import uuid

import httpx
import psycopg
import pytest
import redis
import torch

from tasks.context import JobContext
from tasks.embed import EmbedParams, run
from tests.conftest import Service
from tests.helpers import insert_queued_embed_row, tenant_of, wait_job

pytestmark = pytest.mark.integration

TEXTS = ["A man is playing a guitar.", "Someone is playing an instrument.", "The invoice is overdue."]


def test_embed_job_end_to_end_matches_the_model_in_process(client: httpx.Client) -> None:
    r = client.post("/v1/jobs", json={"kind": "embed", "input": {"texts": TEXTS}})
    assert r.status_code == 202, r.text
    submitted = r.json()
    assert submitted["status"] == "queued" and submitted["result"] is None
    assert r.headers["location"] == f"/v1/jobs/{submitted['id']}"

    job = wait_job(client, submitted["id"])
    assert job["status"] == "succeeded", job
    assert job["error"] is None and job["attempts"] == 1
    assert job["worker"].startswith("cpu@") and job["device"] == "cpu"
    assert job["created_at"] <= job["started_at"] <= job["finished_at"]
    result = job["result"]
    assert (result["model"], result["dim"]) == ("all-MiniLM-L6-v2", 384)

    served = torch.tensor(result["embeddings"])
    local = torch.tensor(run(EmbedParams(texts=TEXTS), JobContext()).embeddings)
    cosines = torch.nn.functional.cosine_similarity(served, local, dim=1)
    assert bool((cosines > 0.999).all()), cosines
    assert float(served[0] @ served[1]) > float(served[0] @ served[2])


def test_model_is_loaded_once_per_worker_process(client: httpx.Client, service: Service) -> None:
    ids = [
        client.post("/v1/jobs", json={"kind": "embed", "input": {"texts": [f"t{i}"]}}).json()["id"]
        for i in range(5)
    ]
    for job_id in ids:
        assert wait_job(client, job_id)["status"] == "succeeded"
    assert service.worker.log().count("loaded model all-MiniLM-L6-v2@cpu") == 1


def test_listing_filters_and_pages(client: httpx.Client) -> None:
    ids = [
        client.post("/v1/jobs", json={"kind": "embed", "input": {"texts": ["x"]}}).json()["id"]
        for _ in range(3)
    ]
    for job_id in ids:
        wait_job(client, job_id)
    page = client.get("/v1/jobs", params={"kind": "embed", "status": "succeeded", "limit": 2}).json()
    assert len(page["items"]) == 2 and page["next_cursor"]
    assert [j["id"] for j in page["items"]] == list(reversed(ids))[:2]
    rest = client.get(
        "/v1/jobs", params={"kind": "embed", "limit": 200, "cursor": page["next_cursor"]}
    ).json()
    assert ids[0] in [j["id"] for j in rest["items"]]
    assert all(
        j["status"] == "queued" for j in client.get("/v1/jobs", params={"status": "queued"}).json()["items"]
    )


def test_health_and_readiness(client: httpx.Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok", "checks": {}}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"] == {"database": "ok", "redis": "ok"}


def publish_again(service: Service, job_id: str) -> None:
    from tensorq.core.broker import Publisher
    from tensorq.core.settings import Settings

    publisher = Publisher(Settings(redis_url=service.env["TENSORQ_REDIS_URL"]))
    publisher.publish("tensorq.embed", job_id, "inference")
    publisher.close()


def finished_behind_the_workers_back(client: httpx.Client, pg_url: str) -> str:
    """A succeeded job whose finish no worker announced: its message must reach a pool child."""
    job_id = insert_queued_embed_row(pg_url, tenant_of(client), {"texts": ["elsewhere"]}, published=True)
    with psycopg.connect(pg_url) as conn:
        conn.execute(
            "UPDATE jobs SET status = 'succeeded', attempts = 1, started_at = now(), finished_at = now()"
            " WHERE id = %s",
            (job_id,),
        )
    return job_id


def test_redelivered_message_for_a_finished_job_does_nothing(
    client: httpx.Client, service: Service, pg_url: str
) -> None:
    from tests.helpers import wait_until

    broker = redis.Redis.from_url(service.env["TENSORQ_REDIS_URL"])
    job = client.post("/v1/jobs", json={"kind": "embed", "input": {"texts": ["once"]}}).json()
    first = wait_job(client, job["id"])
    # This worker announced the finish: its main process acknowledges the duplicate itself.
    publish_again(service, job["id"])
    wait_until(lambda: not broker.llen("inference") and not broker.hlen("unacked"), timeout=30)
    again = client.get(f"/v1/jobs/{job['id']}").json()
    assert again["attempts"] == 1 and again["finished_at"] == first["finished_at"]
    assert f"job {job['id']}: not claimable" not in service.worker.log()
    # A job finished where this worker did not hear of it: the pool child's claim refuses it.
    other = finished_behind_the_workers_back(client, pg_url)
    before = client.get(f"/v1/jobs/{other}").json()
    publish_again(service, other)
    wait_until(lambda: f"job {other}: not claimable" in service.worker.log(), timeout=30)
    assert client.get(f"/v1/jobs/{other}").json() == before
    broker.close()


def test_rejected_input_stores_and_enqueues_nothing(
    client: httpx.Client, service: Service, pg_url: str
) -> None:
    def rows() -> int:
        with psycopg.connect(pg_url) as conn:
            return conn.execute("SELECT count(*) FROM jobs").fetchone()[0]  # type: ignore[index]

    broker = redis.Redis.from_url(service.env["TENSORQ_REDIS_URL"])
    before_rows, before_msgs = rows(), broker.llen("inference")
    bad = [
        {"kind": "nope", "input": {"texts": ["a"]}},
        {"kind": "embed", "input": {"texts": []}},
        {"kind": "embed", "input": {"texts": [None]}},
        {"kind": "embed", "input": {"texts": ["a"] * 10_000}},
    ]
    for body in bad:
        r = client.post("/v1/jobs", json=body)
        assert r.status_code in (413, 422), r.text
        assert "detail" in r.json()
    # NUL, which PostgreSQL's JSONB cannot hold, failed the commit with a 500; a lone surrogate,
    # which UTF-8 cannot encode, failed the 422 that echoed it. Both are a 422 naming the field.
    unstorable = [
        (rb'{"kind": "embed", "input": {"texts": ["a\u0000b"]}}', ["body", "input", "texts", 0]),
        (rb'{"kind": "embed", "input": {"texts": ["a\ud800b"]}}', ["body", "input", "texts", 0]),
        (
            rb'{"kind": "train-text-classifier", "input": {"model_name": "m", "data": [{"text": "a",'
            rb' "label": "x\u0000"}, {"text": "b", "label": "y"}]}}',
            ["body", "input", "data", 0, "label"],
        ),
        (rb'{"kind": "emb\ud800", "input": {"texts": ["a"]}}', ["body", "kind"]),
    ]
    for raw, loc in unstorable:
        r = client.post("/v1/jobs", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 422, r.text
        assert [e["loc"] for e in r.json()["detail"]] == [loc]
    assert client.get(f"/v1/jobs/{uuid.uuid4()}").status_code == 404
    assert rows() == before_rows
    assert broker.llen("inference") == before_msgs


def test_device_requirements_route_to_fitting_queues(client: httpx.Client) -> None:
    on_cpu = client.post(
        "/v1/jobs", json={"kind": "embed", "input": {"texts": ["x"]}, "device": "cpu"}
    ).json()
    assert on_cpu["queue"] == "cpu.inference"
    done = wait_job(client, on_cpu["id"])
    assert done["status"] == "succeeded" and done["device"] == "cpu"
    # No GPU worker here: a GPU job would wait forever, so it is refused at submission.
    on_gpu = client.post("/v1/jobs", json={"kind": "embed", "input": {"texts": ["x"]}, "device": "gpu"})
    assert on_gpu.status_code == 422 and on_gpu.json()["detail"][0]["loc"] == ["body", "device"]
    bad = client.post("/v1/jobs", json={"kind": "embed", "input": {"texts": ["x"]}, "device": "tpu"})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "device"]


def test_worker_log_lines_about_a_job_carry_its_id(
    client: httpx.Client, service: Service, pg_url: str
) -> None:
    from tests.helpers import wait_until

    # A message for a job finished elsewhere makes the worker log a line about it ("not claimable").
    job = {"id": finished_behind_the_workers_back(client, pg_url)}
    publish_again(service, job["id"])
    wait_until(lambda: f"job {job['id']}: not claimable" in service.worker.log(), timeout=30)
    lines = [json.loads(line) for line in service.worker.log().splitlines() if line.startswith("{")]
    assert lines, "the worker should log JSON lines when not on a terminal"
    about_jobs = [line for line in lines if "job " in line["message"] and line["message"].startswith("job ")]
    assert any(job["id"] in line["message"] for line in about_jobs)
    assert all(line.get("job_id") and line["job_id"] in line["message"] for line in about_jobs)
