"""Group commit of POST /v1/jobs (api/submitting.py): concurrent submissions share one INSERT and
one commit, a lone one goes at once, and a group whose commit fails fails as a whole."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import httpx
import psycopg
import pytest

from tests.helpers import Service, wait_job, wait_until
from tests.integration.test_metrics import samples

pytestmark = pytest.mark.integration

GROUP = 12


def embed(text: str) -> dict[str, object]:
    return {"kind": "embed", "input": {"texts": [text]}}


def metric(client: httpx.Client, name: str, labels: tuple[tuple[str, str], ...] = ()) -> float:
    return samples(client.get("/metrics").text).get((name, labels), 0.0)


def stored(pg_url: str, ids: list[str]) -> int:
    with psycopg.connect(pg_url) as conn:
        row = conn.execute("SELECT count(*) FROM jobs WHERE id = ANY(%s::uuid[])", (ids,)).fetchone()
    return int(row[0]) if row else 0


@contextlib.contextmanager
def jobs_locked(pg_url: str) -> Iterator[None]:
    """INSERTs into jobs wait while this holds the table (reads go on)."""
    with psycopg.connect(pg_url) as conn:
        conn.execute("LOCK TABLE jobs IN SHARE MODE")
        yield
        conn.rollback()


def insert_waiting(pg_url: str) -> bool:
    with psycopg.connect(pg_url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE 'INSERT INTO jobs%'"
        ).fetchone()
    return bool(row and row[0])


def post_group(
    service: Service, pg_url: str, bodies: list[dict[str, object]]
) -> tuple[httpx.Response, list[httpx.Response]]:
    """A first POST whose commit is held up by a table lock, then `bodies` posted while it waits
    (so they queue for the next group commit), then the lock released."""
    clients = [service.client() for _ in range(len(bodies) + 1)]
    try:
        with ThreadPoolExecutor(len(clients)) as pool, clients[0] as probe:
            waiting_before = metric(probe, "tensorq_submit_waiting_requests")
            assert waiting_before == 0
            with jobs_locked(pg_url):
                first: Future[httpx.Response] = pool.submit(clients[0].post, "/v1/jobs", json=embed("first"))
                wait_until(
                    lambda: insert_waiting(pg_url), timeout=30, interval=0.05, what="the first INSERT to wait"
                )
                rest = [
                    pool.submit(c.post, "/v1/jobs", json=b) for c, b in zip(clients[1:], bodies, strict=True)
                ]
                wait_until(
                    lambda: metric(probe, "tensorq_submit_waiting_requests") == len(bodies),
                    timeout=30,
                    interval=0.05,
                    what="the other requests to queue",
                )
            return first.result(timeout=60), [f.result(timeout=60) for f in rest]
    finally:
        for c in clients:
            c.close()


def test_concurrent_submissions_share_one_commit_and_each_gets_its_own_answer(
    client: httpx.Client, service: Service, pg_url: str
) -> None:
    groups_before = metric(client, "tensorq_submit_group_jobs_count")
    jobs_before = metric(client, "tensorq_submit_group_jobs_sum")
    first, rest = post_group(service, pg_url, [embed(f"together {i}") for i in range(GROUP)])
    assert first.status_code == 202
    assert [r.status_code for r in rest] == [202] * GROUP
    ids = [r.json()["id"] for r in rest]
    assert len(set(ids)) == GROUP and [r.json()["input"]["texts"] for r in rest] == [
        [f"together {i}"] for i in range(GROUP)
    ]
    # 202 means committed: every row is there as soon as its answer is.
    assert stored(pg_url, [first.json()["id"], *ids]) == GROUP + 1
    # Two commits: the first alone, then the twelve that queued behind it, together.
    assert metric(client, "tensorq_submit_group_jobs_count") - groups_before == 2
    assert metric(client, "tensorq_submit_group_jobs_sum") - jobs_before == GROUP + 1
    for job_id in ids:
        assert wait_job(client, job_id)["status"] == "succeeded"


def test_a_lone_submission_is_committed_in_a_group_of_its_own(client: httpx.Client, pg_url: str) -> None:
    alone_before = metric(client, "tensorq_submit_group_jobs_bucket", (("le", "1.0"),))
    r = client.post("/v1/jobs", json=embed("alone"))
    assert r.status_code == 202 and stored(pg_url, [r.json()["id"]]) == 1
    assert metric(client, "tensorq_submit_group_jobs_bucket", (("le", "1.0"),)) == alone_before + 1


@contextlib.contextmanager
def commits_fail_for(pg_url: str, marker: str) -> Iterator[None]:
    """A deferred constraint trigger: a transaction that inserted a job whose webhook URL mentions
    `marker` fails at COMMIT (after every INSERT of it succeeded). Not the params: those are
    sealed (docs/security.md)."""
    fn, trigger = f"fail_{uuid.uuid4().hex[:8]}", f"trg_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(
            f"CREATE FUNCTION {fn}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            f"IF NEW.webhook_url LIKE '%{marker}%' THEN RAISE EXCEPTION 'commit refused by the test'; END IF; "
            "RETURN NEW; END $$"
        )
        conn.execute(
            f"CREATE CONSTRAINT TRIGGER {trigger} AFTER INSERT ON jobs DEFERRABLE INITIALLY DEFERRED "
            f"FOR EACH ROW EXECUTE FUNCTION {fn}()"
        )
        try:
            yield
        finally:
            conn.execute(f"DROP TRIGGER {trigger} ON jobs")
            conn.execute(f"DROP FUNCTION {fn}()")


def test_a_group_whose_commit_fails_fails_every_request_and_stores_none(
    client: httpx.Client, service: Service, pg_url: str
) -> None:
    tag = uuid.uuid4().hex[:8]
    marker = f"poison-{tag}"
    hook = "https://hooks.example.com"
    bodies = [{**embed("fine"), "webhook": f"{hook}/{tag}/fine-{i}"} for i in range(GROUP - 1)]
    bodies.append({**embed("poisoned"), "webhook": f"{hook}/{marker}"})
    with commits_fail_for(pg_url, marker):
        first, rest = post_group(service, pg_url, bodies)
    assert first.status_code == 202  # its own group, committed before
    assert [r.status_code for r in rest] == [503] * GROUP
    assert all(r.headers["retry-after"] for r in rest)
    with psycopg.connect(pg_url) as conn:
        row = conn.execute("SELECT count(*) FROM jobs WHERE webhook_url LIKE %s", (f"%{tag}%",)).fetchone()
    assert row is not None and row[0] == 0
    # The service goes on: the next submission is stored and runs.
    r = client.post("/v1/jobs", json=embed("after the failed group"))
    assert r.status_code == 202 and wait_job(client, r.json()["id"])["status"] == "succeeded"
