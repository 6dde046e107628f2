"""The connection pool replaces a pooled connection the server closed instead of handing it out."""

from __future__ import annotations

import psycopg
import pytest
from sqlalchemy import text

from db.session import make_engine
from tensorq.core.settings import Settings

pytestmark = pytest.mark.integration


def test_a_connection_killed_while_idle_is_replaced_not_handed_out(pg_url: str) -> None:
    engine = make_engine(Settings(database_url=pg_url).sqlalchemy_url)
    try:
        with engine.connect() as conn:
            first_pid = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
        with engine.connect() as conn:  # pooled: the same server process
            assert conn.execute(text("SELECT pg_backend_pid()")).scalar_one() == first_pid
        with psycopg.connect(pg_url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (first_pid,))
        with engine.connect() as conn:  # would raise if the dead connection were handed out
            assert conn.execute(text("SELECT pg_backend_pid()")).scalar_one() != first_pid
    finally:
        engine.dispose()
