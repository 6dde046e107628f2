"""The service harness the benchmarks (and the tests, through tests/helpers.py) run on: a
PostgreSQL database of its own, and `tensorq api` / `tensorq worker` subprocesses with their logs."""

from __future__ import annotations

import base64
import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import httpx
import psycopg

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent
# The master key services started here seal tenants' data with: TENSORQ_MASTER_KEY if this
# process has one, else one made up for this process.
MASTER_KEY = os.environ.get("TENSORQ_MASTER_KEY") or base64.b64encode(os.urandom(32)).decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(check: Callable[[], T | None], timeout: float, interval: float = 0.1, what: str = "") -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what or check}")
        time.sleep(interval)


class Proc:
    """A `tensorq ...` subprocess with its output in a log file."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("ab")
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "tensorq.cli", *args],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            start_new_session=True,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, sig: int = 15, timeout: float = 30) -> int:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, sig)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, 9)
                self.popen.wait()
        self._log.close()
        return self.popen.returncode


def create_api_key(database_url: str, tenant: str, *, admin: bool = False) -> str:
    """A new API key for `tenant`, written straight to the database (as `tensorq keys create` does)."""
    from db.session import session_scope
    from db.tenants import create_key
    from tensorq.core.settings import Settings

    with session_scope(Settings(database_url=database_url).sqlalchemy_url) as session:
        return create_key(session, tenant, admin=admin)[1]


@dataclass
class Service:
    base_url: str
    env: dict[str, str]
    api: Proc
    worker: Proc
    log_dir: Path
    api_key: str  # an admin key of the service's own tenant

    def client(self, api_key: str | None = None) -> httpx.Client:
        return httpx.Client(
            base_url=self.base_url, timeout=30, headers={"Authorization": f"Bearer {api_key or self.api_key}"}
        )

    def new_key(self, tenant: str, *, admin: bool = False) -> str:
        return create_api_key(self.env["TENSORQ_DATABASE_URL"], tenant, admin=admin)


def service_env(database_url: str, redis_url: str, tmp: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TENSORQ_")}
    env.update(
        TENSORQ_DATABASE_URL=database_url,
        TENSORQ_REDIS_URL=redis_url,
        TENSORQ_ARTIFACT_DIR=str(tmp / "artifacts"),
        TENSORQ_SWEEP_INTERVAL_SECONDS="1",
        TENSORQ_WORKER_METRICS_PORT=str(free_port()),
        TENSORQ_LOG_LEVEL="INFO",
        TENSORQ_MASTER_KEY=MASTER_KEY,
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
    key = create_api_key(env["TENSORQ_DATABASE_URL"], f"t-{os.urandom(3).hex()}", admin=True)
    return Service(base_url=base, env=env, api=api, worker=worker, log_dir=log_dir, api_key=key)


def create_database(admin_url: str, prefix: str = "tensorq_test") -> str:
    """A new, migrated PostgreSQL database beside `admin_url`'s; returns its URL."""
    from migrations.run import upgrade

    name = f"{prefix}_{os.urandom(4).hex()}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = f"{admin_url.rpartition('/')[0]}/{name}"
    upgrade(url.replace("postgresql://", "postgresql+psycopg://"))
    return url


def drop_database(admin_url: str, url: str) -> None:
    name = url.rpartition("/")[2]
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
