"""The connection pool replaces a pooled connection the server closed instead of handing it out,
without a pre-ping round trip per checkout."""

from __future__ import annotations

import httpx
import psycopg
import pytest
from sqlalchemy import text

from db.session import make_engine
from tensorq.core.settings import Settings
from tests.helpers import Service

pytestmark = pytest.mark.integration


def test_a_connection_killed_while_idle_is_replaced_not_handed_out(pg_url: str) -> None:
    engine = make_engine(Settings(database_url=pg_url).sqlalchemy_url)
    try:
        with engine.connect() as conn:
            first_pid = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
        with engine.connect() as conn:  # pooled: the same server process
            assert conn.execute(text("SELECT pg_backend_pid()")).scalar_one() == first_pid
        with psycopg.connect(pg_url, autocommit=True) as admin:
            # With a timeout it returns once the backend has gone (its goodbye sent): without one
            # it returned at the signal, and the check at checkout could come first.
            admin.execute("SELECT pg_terminate_backend(%s, 5000)", (first_pid,))
        with engine.connect() as conn:  # would raise if the dead connection were handed out
            assert conn.execute(text("SELECT pg_backend_pid()")).scalar_one() != first_pid
    finally:
        engine.dispose()


def test_the_service_carries_on_when_every_pooled_connection_is_killed(
    client: httpx.Client, service: Service, pg_url: str
) -> None:
    """No pre-ping: the API's and the worker's dead pooled connections are discarded at checkout
    (api and worker share db.session's engine setup) and the requests after the kill succeed."""
    for i in range(3):  # the API's and the worker's pools hold connections now
        assert client.post("/v1/jobs", json={"kind": "embed", "input": {"texts": [f"warm {i}"]}},
                           headers={"Prefer": "wait=30"}).status_code == 201  # fmt: skip
    database = pg_url.rpartition("/")[2]
    with psycopg.connect(pg_url, autocommit=True) as admin:
        killed = admin.execute(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            (database,),
        ).fetchone()
    assert killed is not None and killed[0] >= 2
    r = client.post(
        "/v1/jobs",
        json={"kind": "embed", "input": {"texts": ["after the kill"]}},
        headers={"Prefer": "wait=30"},
    )
    assert r.status_code == 201 and r.json()["status"] == "succeeded", r.text
    assert client.get("/v1/jobs", params={"limit": 5}).status_code == 200
