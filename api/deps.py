"""Dependencies injected into routes: settings, a database session, the publisher."""

from __future__ import annotations

from collections.abc import Iterator

from fastapi import Request
from sqlalchemy.orm import Session

from db.session import get_sessionmaker
from tensorq.broker import Publisher
from tensorq.events import EventListener
from tensorq.settings import Settings


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_session(request: Request) -> Iterator[Session]:
    session = get_sessionmaker(request.app.state.settings.sqlalchemy_url)()
    try:
        yield session
    finally:
        session.close()


def get_publisher(request: Request) -> Publisher:
    publisher: Publisher = request.app.state.publisher
    return publisher


def get_events(request: Request) -> EventListener:
    events: EventListener = request.app.state.events
    return events
