"""Fixtures. Unit tests use SQLite; integration tests use the real PostgreSQL, Redis and
`tensorq worker` / `tensorq api` subprocesses (TENSORQ_TEST_POSTGRES_URL, TENSORQ_TEST_REDIS_URL)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from migrations.run import upgrade
from tests.helpers import Service, create_database, drop_database, service_env, start_service

POSTGRES_ADMIN_URL = os.environ.get("TENSORQ_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("TENSORQ_TEST_REDIS_URL", "redis://127.0.0.1:6379/11")


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'tensorq.db'}"
    upgrade(url)
    return url


def _with_db(url: str, name: str) -> str:
    base, _, _ = url.rpartition("/")
    return f"{base}/{name}"


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database, migrated with Alembic, dropped afterwards."""
    url = create_database(POSTGRES_ADMIN_URL)
    yield url
    drop_database(POSTGRES_ADMIN_URL, url)


@pytest.fixture(scope="session")
def redis_url() -> str:
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    client.close()
    return REDIS_URL


@pytest.fixture(scope="session")
def service(pg_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """API + one CPU worker on PostgreSQL and Redis, shared by the integration tests."""
    tmp = tmp_path_factory.mktemp("service")
    svc = start_service(service_env(pg_url, redis_url, tmp), tmp)
    yield svc
    svc.api.stop()
    svc.worker.stop()


@pytest.fixture
def client(service: Service) -> Iterator[httpx.Client]:
    with service.client() as c:
        yield c
