"""Datasets, training jobs, the model registry and classify, on PostgreSQL, Redis and real workers."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tasks.data import sample_dataset_path
from tests.conftest import POSTGRES_ADMIN_URL, Service
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

SAMPLE = sample_dataset_path().read_bytes()


def upload(client: httpx.Client, data: bytes, name: str | None = None) -> httpx.Response:
    params = {"name": name} if name else {}
    return client.post(
        "/v1/datasets", content=data, params=params, headers={"content-type": "application/x-ndjson"}
    )


def submit_training(client: httpx.Client, **input: Any) -> dict[str, Any]:
    r = client.post("/v1/jobs", json={"kind": "train-text-classifier", "input": input})
    assert r.status_code == 202, r.text
    job: dict[str, Any] = r.json()
    return job


def test_dataset_upload_validates_every_line_and_stores_nothing_when_bad(client: httpx.Client) -> None:
    before = len(client.get("/v1/datasets").json()["items"])
    lines = SAMPLE.splitlines()
    bad = b"\n".join([*lines[:5], b'{"text": "fine", "label": 3}', *lines[5:10]])
    r = upload(client, bad)
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["body", "line", 6]
    assert upload(client, b'{"text": "x", "label": "a"}\n{"text": "y", "label": "a"}').status_code == 422
    assert upload(client, b"\xff\xfe").json()["detail"][0]["loc"] == ["body", "line", 1]
    # PostgreSQL's JSONB cannot hold NUL: the labels' commit failed with a 500.
    nul_label = b"\n".join([*lines[:3], b'{"text": "fine", "label": "a\\u0000b"}'])
    r = upload(client, nul_label)
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"] == ["body", "line", 4]
    assert upload(client, SAMPLE, name="../etc").status_code == 422
    assert len(client.get("/v1/datasets").json()["items"]) == before

    r = upload(client, SAMPLE, name="reviews")
    assert r.status_code == 201, r.text
    ds = r.json()
    assert ds["rows"] == 240 and ds["labels"] == ["negative", "positive"] and len(ds["sha256"]) == 64
    assert client.get(f"/v1/datasets/{ds['id']}").json() == ds


def test_train_register_alias_and_classify(client: httpx.Client, service: Service) -> None:
    ds = upload(client, SAMPLE).json()
    job = submit_training(
        client,
        dataset_id=ds["id"],
        epochs=3,
        batch_size=16,
        max_seq_length=32,
        learning_rate=1e-4,
        validation_split=0.2,
        seed=1,
        model_name="sentiment",
    )
    assert job["model"] == "sentiment"

    progress_seen: list[dict[str, Any]] = []
    while job["status"] not in ("succeeded", "failed", "cancelled"):
        job = client.get(f"/v1/jobs/{job['id']}", params={"wait": 30}).json()
        if job["progress"]:
            progress_seen.append(job["progress"])
    assert job["status"] == "succeeded", job
    assert progress_seen and {"epoch", "step", "total_steps", "loss"} <= set(progress_seen[-1])
    assert any("val_accuracy" in p for p in progress_seen)
    result = job["result"]
    assert (result["model"], result["version"]) == ("sentiment", 1)
    # The shipped data is balanced (majority-class baseline 0.5): the model must clearly beat it.
    assert result["metrics"]["val_accuracy"] > 0.75
    assert "artifact_dir" not in result  # server paths stay on the server

    registered = client.get("/v1/models/sentiment").json()
    assert registered["latest_version"] == 1 and registered["versions"][0]["job_id"] == job["id"]
    artifact = Path(service.env["TENSORQ_ARTIFACT_DIR"]) / registered["versions"][0]["artifact"]
    assert any(p.suffix == ".safetensors" for p in artifact.iterdir())
    # The ~270 MB checkpoint is gone once the version is registered; only the model stays.
    wait_until(
        lambda: [p.name for p in artifact.parent.iterdir()] == [artifact.name], timeout=30, what="cleanup"
    )
    assert "sentiment" in [m["name"] for m in client.get("/v1/models").json()["items"]]

    r = client.put("/v1/models/sentiment/aliases/production", json={"version": 1})
    assert r.status_code == 200 and r.json() == {"model": "sentiment", "alias": "production", "version": 1}
    # An unregistered version is a bad assignment (422 naming the field), not a missing resource.
    missing = client.put("/v1/models/sentiment/aliases/production", json={"version": 9})
    assert missing.status_code == 422 and missing.json()["detail"][0]["loc"] == ["body", "version"]
    assert client.put("/v1/models/nope/aliases/production", json={"version": 1}).status_code == 404

    texts = ["I love it, it works perfectly and I would buy it again.", "Terrible. It broke after one day."]
    for ref in ("sentiment", "sentiment:1", "sentiment@production"):
        r = client.post("/v1/jobs", json={"kind": "classify", "input": {"model": ref, "texts": texts}})
        done = wait_job(client, r.json()["id"])
        assert done["status"] == "succeeded", done
        preds = done["result"]["predictions"]
        assert [p["label"] for p in preds] == ["positive", "negative"]
        assert all(abs(sum(p["scores"].values()) - 1) < 1e-4 for p in preds)
        assert done["result"]["version"] == 1
    # Loaded once for the three references (the cache key is the version's files).
    assert service.worker.log().count(f"{registered['versions'][0]['artifact']}@cpu (") == 1

    missing = client.post(
        "/v1/jobs", json={"kind": "classify", "input": {"model": "ghost@production", "texts": ["x"]}}
    )
    failed = wait_job(client, missing.json()["id"])
    assert failed["status"] == "failed" and failed["error"]["type"] == "ModelNotFound"


@pytest.mark.parametrize("name", ["../x", "/abs", "a/b", "%2e%2e", "UPPER", ""])
def test_unsafe_model_names_are_refused(client: httpx.Client, name: str) -> None:
    r = client.post(
        "/v1/jobs",
        json={
            "kind": "train-text-classifier",
            "input": {"data": [{"text": "a", "label": "x"}] * 2, "model_name": name},
        },
    )
    assert r.status_code == 422
    assert ["body", "input", "model_name"] in [e["loc"] for e in r.json()["detail"]]
    assert client.get(f"/v1/models/{name or 'x y'}").status_code in (404, 422)


def test_cancel_a_running_training_job_frees_the_worker(client: httpx.Client) -> None:
    ds = upload(client, SAMPLE).json()
    job = submit_training(
        client, dataset_id=ds["id"], epochs=50, batch_size=8, max_seq_length=32, model_name="long"
    )
    job = wait_until(
        lambda: (j := client.get(f"/v1/jobs/{job['id']}", params={"wait": 5}).json())["progress"] and j,
        timeout=120,
        what="training progress",
    )
    assert job["status"] == "running"
    r = client.post(f"/v1/jobs/{job['id']}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "running" and r.json()["cancel_requested"]
    done = wait_job(client, job["id"], timeout=30)
    assert done["status"] == "cancelled"
    follow = client.post("/v1/jobs", json={"kind": "embed", "input": {"texts": ["next"]}}).json()
    assert wait_job(client, follow["id"])["status"] == "succeeded"
    assert client.get("/v1/models/long").status_code == 404


def test_training_resumes_from_checkpoint_after_sigkill(redis_url: str, tmp_path: Path) -> None:
    """Kill the worker mid-training; the lease expires, the job is requeued, a new worker resumes it."""
    # Its own database and Redis database, so the shared service's worker and sweeper stay out of it.
    pg = create_database(POSTGRES_ADMIN_URL)
    env = service_env(
        pg,
        redis_url.rpartition("/")[0] + "/14",
        tmp_path,
        TENSORQ_LEASE_SECONDS="3",
        TENSORQ_SWEEP_INTERVAL_SECONDS="1",
    )
    redis.Redis.from_url(env["TENSORQ_REDIS_URL"]).flushdb()
    svc = start_service(env, tmp_path)
    try:
        with svc.client() as client:
            ds = upload(client, SAMPLE).json()
            job = submit_training(
                client,
                dataset_id=ds["id"],
                epochs=4,
                batch_size=16,
                max_seq_length=32,
                model_name="resumed",
            )
            # Wait until at least one epoch (and so one checkpoint) is done, then SIGKILL the worker.
            wait_until(
                lambda: (client.get(f"/v1/jobs/{job['id']}").json()["progress"] or {}).get("epoch", 0) >= 2,
                timeout=180,
                what="second epoch",
            )
            svc.worker.stop(signal.SIGKILL)
            assert client.get(f"/v1/jobs/{job['id']}").json()["status"] == "running"
            second = Proc("worker2", ["worker", "--gpus", "none"], env, tmp_path)
            try:
                done = wait_job(client, job["id"], timeout=240)
            finally:
                second.stop()
            assert done["status"] == "succeeded", (done, second.log())
            assert done["attempts"] == 2
            assert done["result"]["resumed_from_step"] > 0
            assert client.get("/v1/models/resumed").json()["latest_version"] == 1
    finally:
        svc.api.stop()
        svc.worker.stop()
        drop_database(POSTGRES_ADMIN_URL, pg)


def test_inline_training_data(client: httpx.Client) -> None:
    rows = [json.loads(line) for line in SAMPLE.splitlines()[:40]]
    job = submit_training(
        client, data=rows, epochs=1, max_seq_length=16, validation_split=0.0, model_name="inline"
    )
    done = wait_job(client, job["id"], timeout=180)
    assert done["status"] == "succeeded", done
    assert done["result"]["version"] >= 1
