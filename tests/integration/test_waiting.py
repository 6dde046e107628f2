"""Long-polling (`?wait=`) driven by Redis notifications, and cancelling a queued job."""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import psycopg
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


def test_cancelling_a_cancelled_job_is_409(client: httpx.Client, pg_url: str) -> None:
    job_id = insert_unpublished_job(pg_url, tenant_of(client))
    assert client.post(f"/v1/jobs/{job_id}/cancel").json()["status"] == "cancelled"
    r = client.post(f"/v1/jobs/{job_id}/cancel")
    assert r.status_code == 409 and r.json() == {"detail": "job already cancelled"}


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


def test_prefer_wait_answers_the_submit_with_the_finished_job(client: httpx.Client) -> None:
    r = client.post(
        "/v1/jobs", json={"kind": "embed", "input": {"texts": ["one request"]}}, headers={"Prefer": "wait=30"}
    )
    assert r.status_code == 201, r.text
    assert r.headers["Preference-Applied"] == "wait=30"
    job = r.json()
    assert job["status"] == "succeeded" and job["result"]["dim"] == 384
    assert r.headers["Location"] == f"/v1/jobs/{job['id']}"
    # The stored job: the answer is built from the row the worker committed, sent with its event.
    assert client.get(r.headers["Location"]).json() == job


def test_prefer_wait_gives_back_the_job_so_far_when_time_runs_out(client: httpx.Client) -> None:
    # A failed job is final too; an unparseable wait is refused before anything is stored.
    before = client.get("/v1/jobs", params={"limit": 200}).json()["items"]
    bad = client.post(
        "/v1/jobs", json={"kind": "embed", "input": {"texts": ["x"]}}, headers={"Prefer": "wait=soon"}
    )
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["header", "prefer"]
    assert client.get("/v1/jobs", params={"limit": 200}).json()["items"] == before
    # Other preferences are ignored, as RFC 7240 asks; without wait the answer is the usual 202.
    plain = client.post(
        "/v1/jobs", json={"kind": "embed", "input": {"texts": ["x"]}}, headers={"Prefer": "return=minimal"}
    )
    assert plain.status_code == 202 and "Preference-Applied" not in plain.headers
    # wait=0 answers at once with the job as stored.
    start = time.monotonic()
    now = client.post(
        "/v1/jobs", json={"kind": "embed", "input": {"texts": ["x"]}}, headers={"Prefer": "wait=0"}
    )
    assert now.status_code == 202 and now.json()["status"] == "queued" and time.monotonic() - start < 2
    assert now.headers["Preference-Applied"] == "wait=0"
    # Above the ceiling, the wait is cut to 60 s and says so.
    long = client.post(
        "/v1/jobs", json={"kind": "embed", "input": {"texts": ["x"]}}, headers={"Prefer": "wait=600"}
    )
    assert long.status_code == 201 and long.headers["Preference-Applied"] == "wait=60"


def test_waiting_requests_hold_no_database_connection(client: httpx.Client, pg_url: str) -> None:
    """A long-poll sleeps on a Redis notification, not on a pooled connection: a connection held
    'idle in transaction' through every wait would cap concurrent waiters at the pool's size and
    hold back vacuum for up to a minute each."""
    job_id = insert_unpublished_job(pg_url, tenant_of(client))
    database = pg_url.rpartition("/")[2]
    waiters = 12
    with ThreadPoolExecutor(waiters) as pool:
        polls = [pool.submit(client.get, f"/v1/jobs/{job_id}", params={"wait": 4}) for _ in range(waiters)]
        time.sleep(2)  # every request is now inside its wait
        with psycopg.connect(pg_url, autocommit=True) as conn:
            idle_in_transaction = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND state LIKE 'idle in transaction%%'",
                (database,),
            ).fetchone()
        answers = [p.result() for p in polls]
    assert [a.json()["status"] for a in answers] == ["queued"] * waiters
    assert idle_in_transaction == (0,)


def test_event_streams_hold_no_database_connection(client: httpx.Client, pg_url: str) -> None:
    """An event stream may stay open for a whole training run: one that kept the request's
    session (the API-key lookup's transaction) would pin a pooled connection until it ended."""
    job_id = insert_unpublished_job(pg_url, tenant_of(client))
    database = pg_url.rpartition("/")[2]
    streams = 3
    with contextlib.ExitStack() as stack:
        lines = []
        for _ in range(streams):
            response = stack.enter_context(client.stream("GET", f"/v1/jobs/{job_id}/events", timeout=60))
            assert response.status_code == 200
            lines.append(response.iter_lines())
        # Each stream has sent the job as queued: its handler is past authentication, and waiting.
        first = [json.loads(next(line for line in it if line.startswith("data: "))[6:]) for it in lines]
        assert [job["status"] for job in first] == ["queued"] * streams
        with psycopg.connect(pg_url, autocommit=True) as conn:
            idle_in_transaction = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND state LIKE 'idle in transaction%%'",
                (database,),
            ).fetchone()
        assert client.post(f"/v1/jobs/{job_id}/cancel").json()["status"] == "cancelled"
        last = [json.loads(next(line for line in it if line.startswith("data: "))[6:]) for it in lines]
    assert [job["status"] for job in last] == ["cancelled"] * streams
    assert idle_in_transaction == (0,)


def test_a_finished_event_carries_a_lone_jobs_row_to_its_waiters(redis_url: str) -> None:
    """Through real Redis: the row rides along (a waiter needs no read) unless the event would be
    too big, and then the waiter is still woken, with no row."""
    import asyncio

    from tensorq.core.events import MAX_EVENT_BYTES_WITH_ROWS, EventListener, EventPublisher

    small, big = uuid.uuid4(), uuid.uuid4()
    rows = {
        small: {"id": small, "result": {"dim": 384}},
        big: {"id": big, "result": {"blob": "x" * MAX_EVENT_BYTES_WITH_ROWS}},
    }

    async def check() -> list[object]:
        listener = EventListener(redis_url)
        listener.start()
        try:
            seen = []
            for job_id, row in rows.items():
                with listener.watch(job_id, end_only=True) as finished:
                    for _ in range(50):  # until the subscription is live
                        EventPublisher(redis_url).changed([job_id], final=True, rows=[row])
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(finished.wait(), 0.1)
                            break
                    assert finished.is_set()
                    seen.append(finished.row)
            return seen
        finally:
            await listener.stop()

    small_row, big_row = asyncio.run(check())
    assert small_row == {"id": str(small), "result": {"dim": 384}}
    assert big_row is None
