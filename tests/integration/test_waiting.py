"""Long-polling (`?wait=`) driven by Redis notifications, and cancelling a queued job."""

from __future__ import annotations

import json
import time
import uuid

import httpx
import pytest

from tests.helpers import insert_queued_embed_row, tenant_of

pytestmark = pytest.mark.integration


def insert_unpublished_job(pg_url: str, tenant: str) -> str:
    """A queued job whose message is 'in flight' (published_at = now): nothing will run it soon."""
    return insert_queued_embed_row(pg_url, tenant, {"texts": ["x"]}, published=True)


def test_wait_returns_on_each_change_without_polling(client: httpx.Client) -> None:
    job = client.post("/v1/jobs", json={"kind": "embed", "input": {"texts": ["wait for me"]}}).json()
    seen = [job["status"]]
    requests = 0
    start = time.monotonic()
    while seen[-1] not in ("succeeded", "failed"):
        requests += 1
        seen.append(client.get(f"/v1/jobs/{job['id']}", params={"wait": 30}).json()["status"])
    assert seen[-1] == "succeeded"
    assert requests <= 3, seen  # queued -> (running ->) succeeded, one answer per change
    assert time.monotonic() - start < 20


def test_wait_times_out_with_the_unchanged_job(client: httpx.Client, pg_url: str) -> None:
    job_id = insert_unpublished_job(pg_url, tenant_of(client))
    start = time.monotonic()
    job = client.get(f"/v1/jobs/{job_id}", params={"wait": 1}).json()
    elapsed = time.monotonic() - start
    assert job["status"] == "queued" and 0.9 <= elapsed < 5
    # A finished job answers at once, whatever the wait.
    assert client.post(f"/v1/jobs/{job_id}/cancel").json()["status"] == "cancelled"
    start = time.monotonic()
    assert client.get(f"/v1/jobs/{job_id}", params={"wait": 30}).json()["status"] == "cancelled"
    assert time.monotonic() - start < 2
    assert client.get(f"/v1/jobs/{job_id}", params={"wait": 61}).status_code == 422


def test_cancel_rules(client: httpx.Client) -> None:
    done = client.post("/v1/jobs", json={"kind": "embed", "input": {"texts": ["x"]}}).json()
    while client.get(f"/v1/jobs/{done['id']}", params={"wait": 10}).json()["status"] != "succeeded":
        pass
    r = client.post(f"/v1/jobs/{done['id']}/cancel")
    assert r.status_code == 409 and "succeeded" in r.json()["detail"]
    assert client.post(f"/v1/jobs/{uuid.uuid4()}/cancel").status_code == 404


def test_wait_until_finished_answers_once(client: httpx.Client) -> None:
    job = client.post("/v1/jobs", json={"kind": "embed", "input": {"texts": ["one answer"]}}).json()
    done = client.get(f"/v1/jobs/{job['id']}", params={"wait": 30, "until": "finished"}).json()
    assert done["status"] == "succeeded" and done["result"]["dim"] == 384


def test_events_stream_each_change_and_end_with_the_final_state(client: httpx.Client, pg_url: str) -> None:
    # A job that waits until we let it go, so the stream must show it queued first.
    job_id = insert_unpublished_job(pg_url, tenant_of(client))
    statuses: list[str] = []
    with client.stream("GET", f"/v1/jobs/{job_id}/events", timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                statuses.append(json.loads(line[len("data: ") :])["status"])
                if statuses == ["queued"]:
                    assert client.post(f"/v1/jobs/{job_id}/cancel").json()["status"] == "cancelled"
    assert statuses == ["queued", "cancelled"]  # and the server closed the stream after the final state

    job = client.post("/v1/jobs", json={"kind": "embed", "input": {"texts": ["streamed"]}}).json()
    with client.stream("GET", f"/v1/jobs/{job['id']}/events", timeout=60) as response:
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1]["status"] == "succeeded" and events[-1]["result"]["dim"] == 384
    assert client.get(f"/v1/jobs/{uuid.uuid4()}/events").status_code == 404
