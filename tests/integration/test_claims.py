"""Claims on real PostgreSQL take exactly as many rows as asked, whatever plan the planner picks.

Each test uses a database created moments before, whose table has no statistics yet: there the
planner rescans an `IN (SELECT ... LIMIT n FOR UPDATE SKIP LOCKED)` subquery for each candidate
row, which once let a batch top-up for 11 jobs claim all 483 queued ones.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, event, func, select

from api.submitting import insert_committed
from db.batching import BatchKey
from db.jobs import Claimant, Fill, Outcome, claim_jobs, create_job, finish_jobs, new_job
from db.models import Job, JobStatus, TenantKey
from db.session import AsyncSessions, get_engine, session_scope
from db.webhooks import claim_due_webhooks
from tasks.registry import get_kind
from tensorq.core.artifacts import ArtifactStore
from tensorq.core.settings import Settings
from tests.conftest import POSTGRES_ADMIN_URL
from tests.helpers import create_database, drop_database
from worker.claiming import Claimer
from worker.committing import Committer

pytestmark = pytest.mark.integration

CLAIM = Claimant("w", "cpu", 60)
TOP_UP = BatchKey("embed", "inference", None, "t")  # the batch the top-ups fill


@pytest.fixture
def fresh_url() -> Iterator[str]:
    url = create_database(POSTGRES_ADMIN_URL, prefix="tensorq_claims")
    yield Settings(database_url=url).sqlalchemy_url
    drop_database(POSTGRES_ADMIN_URL, url)


def queue_jobs(url: str, n: int, webhook_url: str | None = None) -> list[object]:
    with session_scope(url) as session:
        return [
            create_job(
                session,
                tenant="t",
                kind="embed",
                params={"texts": [str(i)]},
                queue="inference",
                max_attempts=3,
                webhook_url=webhook_url,
            ).id
            for i in range(n)
        ]


def test_a_batch_top_up_claims_at_most_what_it_asks_for_oldest_first(fresh_url: str) -> None:
    ids = queue_jobs(fresh_url, 120)
    with session_scope(fresh_url) as session:
        jobs = claim_jobs(session, [], CLAIM, Fill(11, like=TOP_UP))
    assert [j.id for j in jobs] == ids[:11]
    with session_scope(fresh_url) as session:
        named = claim_jobs(session, [ids[50], ids[51]], CLAIM, Fill(7))
    # The named jobs (one text each), and the five oldest still queued; the message's own job first.
    assert named[0].id == ids[50]
    assert {j.id for j in named} == {ids[50], ids[51], *ids[11:16]}
    with session_scope(fresh_url) as session:
        oldest = claim_jobs(session, [ids[16]], CLAIM, Fill(4))
    # The named job, the oldest queued, is counted once: itself and the three next.
    assert [j.id for j in oldest] == ids[16:20]
    with session_scope(fresh_url) as session:
        running = session.scalar(select(func.count()).where(Job.status == JobStatus.RUNNING))
    assert running == 22


def test_a_batch_is_filled_by_its_texts_not_by_its_number_of_jobs(fresh_url: str) -> None:
    sizes = [50, 40, 30, 20, 100, 1, 200, 5]
    with session_scope(fresh_url) as session:
        ids = [
            create_job(
                session,
                tenant="t",
                kind="embed",
                params={"texts": ["x"] * n},
                queue="inference",
                max_attempts=3,
                batch_cost=n,
            ).id
            for n in sizes
        ]
    with session_scope(fresh_url) as session:
        first = claim_jobs(session, [ids[0]], CLAIM, Fill(128))
    # 50 + 40 + 30 = 120 texts; the next job (20) would make 140.
    assert [j.id for j in first] == ids[:3]
    with session_scope(fresh_url) as session:
        top_up = claim_jobs(session, [], CLAIM, Fill(128, like=TOP_UP))
    # Oldest first and none skipped: 20 + 100 + 1; the 200-text job does not fit, nor anything after it.
    assert [j.id for j in top_up] == ids[3:6]
    with session_scope(fresh_url) as session:
        alone = claim_jobs(session, [ids[6]], CLAIM, Fill(128))
    # A named job over the limit is still claimed, alone.
    assert [j.id for j in alone] == [ids[6]]
    with session_scope(fresh_url) as session:
        left = session.scalars(select(Job.id).where(Job.status == JobStatus.QUEUED)).all()
    assert left == [ids[7]]


def test_due_webhooks_are_claimed_up_to_the_limit(fresh_url: str) -> None:
    ids = queue_jobs(fresh_url, 40, webhook_url="https://example.com/hook")
    with session_scope(fresh_url) as session:
        jobs = claim_jobs(session, [], CLAIM, Fill(40, like=TOP_UP))
    assert len(jobs) == 40
    with session_scope(fresh_url) as session:
        written = finish_jobs(session, [Outcome(j.id, j.claim_token, JobStatus.SUCCEEDED) for j in jobs])
    assert written == set(ids)
    with session_scope(fresh_url) as session:
        assert len(claim_due_webhooks(session, limit=3, lease_seconds=30)) == 3
    with session_scope(fresh_url) as session:
        assert len(claim_due_webhooks(session, limit=100, lease_seconds=30)) == 37


def test_a_result_with_nan_and_integer_keys_is_stored_as_valid_json(fresh_url: str) -> None:
    """A training metric can be NaN, and a label map can have integer keys: json.dumps wrote
    `NaN`, which PostgreSQL's jsonb rejects, so such a job could not be finished at all."""
    [job_id] = queue_jobs(fresh_url, 1)
    with session_scope(fresh_url) as session:
        [job] = claim_jobs(session, [job_id], CLAIM)
        result = {"loss": float("nan"), "labels": {0: "neg", 1: "pos"}}
        assert finish_jobs(session, [Outcome(job.id, job.claim_token, JobStatus.SUCCEEDED, result=result)])
    with session_scope(fresh_url) as session:
        stored = session.get(Job, job_id)
        assert stored is not None and stored.status == JobStatus.SUCCEEDED
        assert stored.result == {"loss": None, "labels": {"0": "neg", "1": "pos"}}


class RoundTrips:
    """What psycopg sends on the connections an engine checks out (libpq's protocol trace): each
    simple Query by its text, and each Sync that ends a statement's extended-protocol messages,
    i.e. one entry per round trip."""

    def __init__(self, engine: Engine, path: Path) -> None:
        self.engine = engine
        self.trace = path.open("w+")
        self.traced: list[Any] = []
        event.listen(engine, "checkout", self._start)

    def _start(self, dbapi_conn: Any, _record: Any, _proxy: Any) -> None:
        pgconn = getattr(dbapi_conn, "driver_connection", dbapi_conn).pgconn  # async: an adapter
        pgconn.trace(self.trace.fileno())
        self.traced.append(pgconn)

    def sent(self) -> list[str]:
        """Since the last call."""
        while self.traced:
            self.traced.pop().untrace()  # libpq's trace is buffered until then
        self.trace.seek(0)
        lines = [line.split("\t") for line in self.trace.read().splitlines()]
        self.trace.seek(0)
        self.trace.truncate()
        return [f[3] + (" " + f[4].strip() if f[3] == "Query" else "")
                for f in lines if len(f) > 3 and f[1] == "F" and f[3] in ("Query", "Sync")]  # fmt: skip

    def close(self) -> None:
        event.remove(self.engine, "checkout", self._start)
        self.trace.close()


def test_a_claim_and_a_finish_each_reach_postgresql_as_one_round_trip(fresh_url: str, tmp_path: Path) -> None:
    """The worker's claim and an inference job's finish are one statement each, sent in
    autocommit: one round trip apiece (a transaction around them added BEGIN and COMMIT, two more)."""
    warm_id, job_id = queue_jobs(fresh_url, 2)
    settings = Settings(database_url=fresh_url)
    kind = get_kind("embed")
    committer = Committer(fresh_url, ArtifactStore(tmp_path / "artifacts"), None)
    trips = RoundTrips(get_engine(fresh_url), tmp_path / "trace")

    def claim_and_finish(job_id: Any) -> tuple[list[str], list[str]]:
        (job,) = Claimer(settings).claim(kind, [job_id], "w", batches=False)
        assert job.status == JobStatus.RUNNING and job.params["texts"]
        claimed = trips.sent()
        outcome = Outcome(job.id, job.claim_token, JobStatus.SUCCEEDED, result={"ok": 1}, tenant="t")
        _, written, rows = committer.commit(kind, [outcome], {job.id: "t"})
        assert written == {job.id} and rows[0]["status"] == "succeeded"
        return claimed, trips.sent()

    try:
        claim_and_finish(warm_id)  # the tenant's data key is read, and cached, on the way
        assert claim_and_finish(job_id) == (["Sync"], ["Sync"])
    finally:
        trips.close()
    with session_scope(fresh_url) as session:
        stored = session.get(Job, job_id)
        assert stored is not None and stored.status == JobStatus.SUCCEEDED and stored.result == {"ok": 1}


def test_the_group_commit_insert_is_one_round_trip_and_creates_a_new_tenants_key(
    fresh_url: str, tmp_path: Path
) -> None:
    """The API's group commit stores its rows with one INSERT in autocommit. A tenant's first
    jobs need its data key, which is created (committed) apart from them by the keyring: autocommit
    leaves no transaction, nor a savepoint, to create it in (PostgreSQL refused the SAVEPOINT)."""

    def rows(n: int) -> list[Job]:
        return [
            new_job(tenant="newcomer", kind="embed", params={"texts": [f"first {i}"]}, queue="inference", max_attempts=3)
            for i in range(n)
        ]  # fmt: skip

    async def store() -> tuple[list[str], list[str]]:
        db = AsyncSessions(fresh_url)
        trips = RoundTrips(db.engine.sync_engine, tmp_path / "trace")
        try:
            await db.run_one_statement(insert_committed, rows(3))  # the tenant's first: its key too
            first = trips.sent()
            await db.run_one_statement(insert_committed, rows(5))
            return first, trips.sent()
        finally:
            trips.close()
            await db.close()

    first, second = asyncio.run(store())
    # The key was made by the keyring's own connection (not this engine's): the INSERT alone, each time.
    assert first == second == ["Sync"]
    with session_scope(fresh_url) as session:
        stored = session.scalars(select(Job).where(Job.tenant == "newcomer")).all()
        assert sorted(t for job in stored for t in job.params["texts"]) == sorted(
            [f"first {i}" for i in range(3)] + [f"first {i}" for i in range(5)]
        )
        assert (
            session.scalar(select(func.count()).select_from(TenantKey).where(TenantKey.tenant == "newcomer"))
            == 1
        )
