"""Engine and session factory, one per process and database URL."""

from __future__ import annotations

import select
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any, Concatenate, ParamSpec, TypeVar

import orjson
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session, sessionmaker

P = ParamSpec("P")
T = TypeVar("T")


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


def async_url(url: str) -> str:
    """The URL's asyncio driver: psycopg 3's own async connection for PostgreSQL (SQLAlchemy picks
    it for "postgresql+psycopg" in an async engine), aiosqlite for SQLite."""
    if url.startswith("sqlite:"):
        return "sqlite+aiosqlite:" + url[len("sqlite:") :]
    return url


def make_async_engine(url: str) -> AsyncEngine:
    if url.startswith("sqlite"):
        engine = create_async_engine(async_url(url), connect_args={"timeout": 10}, **JSON_CODEC)
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    engine = create_async_engine(async_url(url), pool_size=10, max_overflow=20, **JSON_CODEC)
    event.listen(engine.sync_engine, "checkout", _discard_if_dead)
    return engine


def _discard_if_dead(dbapi_conn: Any, _record: Any, _proxy: Any) -> None:
    """Refuse a pooled connection the server has closed, without a round trip: an idle
    connection has nothing to read unless the server said goodbye (pg_terminate_backend, a
    shutdown or restart send an error and close; a crashed server's socket reads EOF). Raising
    DisconnectionError makes SQLAlchemy's pool throw the connection away and check out another
    (up to three tries, then a fresh connection). A connection whose peer vanished silently (a
    dropped network path) still passes; its first statement fails and SQLAlchemy invalidates it."""
    # An async engine's connection is SQLAlchemy's adapter around psycopg's AsyncConnection.
    conn = getattr(dbapi_conn, "driver_connection", dbapi_conn)
    pgconn = getattr(conn, "pgconn", None)
    if pgconn is None:  # not psycopg
        return
    if conn.closed or pgconn.status != 0:  # psycopg.pq.ConnStatus.OK
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


@lru_cache(maxsize=4)
def get_one_statement_sessionmaker(url: str) -> sessionmaker[Session]:
    return sessionmaker(bind=one_statement_engine(get_engine(url)), expire_on_commit=False)


AnyEngine = TypeVar("AnyEngine", Engine, AsyncEngine)


def one_statement_engine(engine: AnyEngine) -> AnyEngine:
    """`engine` for transactions of one statement (see `one_statement`): autocommit on
    PostgreSQL, on the same pool (psycopg switches autocommit on a checked-out connection
    without I/O); as it is elsewhere."""
    if engine.dialect.name == "postgresql":
        return engine.execution_options(isolation_level="AUTOCOMMIT")
    return engine


@contextmanager
def one_statement(url: str) -> Iterator[Session]:
    """A session for a transaction that is one statement (a claim, a lone or batch finish).

    On PostgreSQL it runs in autocommit, so the statement is its own transaction and costs one
    round trip: psycopg otherwise sends BEGIN before it and COMMIT after it, each a round trip of
    its own. A statement that fails has changed nothing, so there is nothing to roll back. More
    than one statement here would not be atomic: use `session_scope` for those. On SQLite (one
    writer, in-process) it is `session_scope`."""
    with session_scope_of(get_one_statement_sessionmaker(url)) as session:
        yield session


class AsyncSessions:
    """The API's database path on its event loop, without a thread per call: `run(fn, ...)` calls
    the synchronous `fn(session, ...)` (the same functions the workers use) in a greenlet, its
    statements awaited on the asyncio driver (SQLAlchemy's `AsyncSession.run_sync`). `fn` commits
    what it writes; the session is closed after it (a rollback of anything left open)."""

    def __init__(self, url: str) -> None:
        self.engine = make_async_engine(url)
        self._sessions = async_sessionmaker(self.engine, class_=AsyncSession, expire_on_commit=False)
        self._one_statement = async_sessionmaker(
            one_statement_engine(self.engine), class_=AsyncSession, expire_on_commit=False
        )

    async def run(self, fn: Callable[Concatenate[Session, P], T], *args: P.args, **kwargs: P.kwargs) -> T:
        async with self._sessions() as session:
            return await session.run_sync(fn, *args, **kwargs)

    async def run_one_statement(
        self, fn: Callable[Concatenate[Session, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """`run` for a `fn` whose writes are one statement: one round trip (see `one_statement`)."""
        async with self._one_statement() as session:
            return await session.run_sync(fn, *args, **kwargs)

    @property
    def rows_per_insert(self) -> int:
        """The rows SQLAlchemy sends in one INSERT ... VALUES statement; more go in several."""
        return int(self.engine.dialect.insertmanyvalues_page_size)

    async def close(self) -> None:
        await self.engine.dispose()


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    with session_scope_of(get_sessionmaker(url)) as session:
        yield session


@contextmanager
def session_scope_of(sessions: sessionmaker[Session]) -> Iterator[Session]:
    session = sessions()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
