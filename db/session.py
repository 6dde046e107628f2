"""Engine and session factory, one per process and database URL."""

from __future__ import annotations

import select
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

import orjson
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.orm import Session, sessionmaker


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # WAL lets the API read while a worker writes; busy_timeout turns lock contention into waiting.
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def dumps_json(value: Any) -> str:
    """JSON columns are written with orjson: a 64-job batch of embeddings (64 x 384 floats) takes
    ~6 ms with json.dumps and ~0.5 ms here. Non-string keys become strings, as with json.dumps;
    NaN and infinities become null (PostgreSQL's jsonb rejects them anyway)."""
    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()


JSON_CODEC: dict[str, Any] = {"json_serializer": dumps_json, "json_deserializer": orjson.loads}


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 10}, **JSON_CODEC)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    # No pre-ping: it cost a round trip per checkout, i.e. per transaction. A dead pooled connection
    # is found by `_discard_if_dead` without one and replaced (the pool retries the checkout).
    engine = create_engine(url, pool_size=10, max_overflow=20, **JSON_CODEC)
    event.listen(engine, "checkout", _discard_if_dead)
    return engine


def _discard_if_dead(dbapi_conn: Any, _record: Any, _proxy: Any) -> None:
    """Refuse a pooled connection the server has closed, without a round trip: an idle
    connection has nothing to read unless the server said goodbye (pg_terminate_backend, a
    shutdown or restart send an error and close; a crashed server's socket reads EOF). Raising
    DisconnectionError makes SQLAlchemy's pool throw the connection away and check out another
    (up to three tries, then a fresh connection). A connection whose peer vanished silently (a
    dropped network path) still passes; its first statement fails and SQLAlchemy invalidates it."""
    pgconn = getattr(dbapi_conn, "pgconn", None)
    if pgconn is None:  # not psycopg
        return
    if dbapi_conn.closed or pgconn.status != 0:  # psycopg.pq.ConnStatus.OK
        raise DisconnectionError("connection closed")
    try:
        readable, _, _ = select.select([pgconn.socket], [], [], 0)
    except (OSError, ValueError) as exc:
        raise DisconnectionError(f"connection socket unusable: {exc}") from exc
    if readable:
        raise DisconnectionError("the server closed or is closing the connection")


@lru_cache(maxsize=4)
def get_engine(url: str) -> Engine:
    return make_engine(url)


@lru_cache(maxsize=4)
def get_sessionmaker(url: str) -> sessionmaker[Session]:
    return sessionmaker(bind=get_engine(url), expire_on_commit=False)


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    session = get_sessionmaker(url)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
