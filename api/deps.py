"""Dependencies injected into routes: settings, a database session, the publisher.

They are `async def` because none of them blocks: FastAPI runs a plain `def` dependency in its
threadpool, and a thread hop per dependency was a measurable part of a submission's cost.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.orm import Session

from db.session import AsyncSessions, get_sessionmaker
from tensorq.core.broker import Publisher
from tensorq.core.events import EventListener
from tensorq.core.settings import Settings


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_session(request: Request) -> AsyncIterator[Session]:
    # Making a session does no I/O (it connects on first use); closing one in a transaction
    # does (a rollback), and the hop to a thread for it is worth saving when there is none.
    session = get_sessionmaker(request.app.state.settings.sqlalchemy_url)()
    try:
        yield session
    finally:
        if session.in_transaction():
            await run_in_threadpool(session.close)
        else:  # committed already (a submission, a job read): nothing to roll back, no I/O
            session.close()


async def get_db(request: Request) -> AsyncSessions:
    """The asynchronous database path (submissions, key lookups, waits), on the event loop."""
    db: AsyncSessions = request.app.state.db
    return db


async def get_publisher(request: Request) -> Publisher:
    publisher: Publisher = request.app.state.publisher
    return publisher


async def get_events(request: Request) -> EventListener:
    events: EventListener = request.app.state.events
    return events
