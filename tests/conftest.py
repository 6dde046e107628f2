"""Fixtures. Unit tests use SQLite; integration tests use the real PostgreSQL, Redis and
`tensorq worker` / `tensorq api` subprocesses (TENSORQ_TEST_POSTGRES_URL, TENSORQ_TEST_REDIS_URL)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg
import pytest
import redis

from db.migrate import upgrade
from tests.helpers import Proc, free_port, wait_until

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
def pg_database() -> Iterator[str]:
    """A fresh PostgreSQL database, migrated with Alembic, dropped afterwards."""
    name = f"tensorq_test_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = _with_db(POSTGRES_ADMIN_URL, name)
    try:
        yield url
    finally:
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def pg_url(pg_database: str) -> str:
    upgrade(pg_database.replace("postgresql://", "postgresql+psycopg://"))
    return pg_database


@pytest.fixture(scope="session")
def redis_url() -> str:
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    client.close()
    return REDIS_URL


@dataclass
class Service:
    base_url: str
    env: dict[str, str]
    api: Proc
    worker: Proc
    log_dir: Path

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=30)


def service_env(database_url: str, redis_url: str, tmp: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TENSORQ_")}
    env.update(
        TENSORQ_DATABASE_URL=database_url,
        TENSORQ_REDIS_URL=redis_url,
        TENSORQ_ARTIFACT_DIR=str(tmp / "artifacts"),
        TENSORQ_SWEEP_INTERVAL_SECONDS="1",
        TENSORQ_LOG_LEVEL="INFO",
        HF_HUB_OFFLINE="1",
    )
    env.update(extra)
    return env


def start_service(env: dict[str, str], log_dir: Path, worker_args: list[str] | None = None) -> Service:
    port = free_port()
    worker = Proc("worker", ["worker", "--gpus", "none", *(worker_args or [])], env, log_dir)
    api = Proc("api", ["api", "--port", str(port)], env, log_dir)
    base = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert api.alive(), api.log()
        assert worker.alive(), worker.log()
        try:
            return httpx.get(f"{base}/readyz", timeout=2).status_code == 200 and (
                "worker process ready" in worker.log()
            )
        except httpx.HTTPError:
            return False

    wait_until(ready, timeout=120, interval=0.3, what="api and worker ready")
    return Service(base_url=base, env=env, api=api, worker=worker, log_dir=log_dir)


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
