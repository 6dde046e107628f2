"""Shared helpers for tests: free ports, service subprocesses, polling."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import psycopg

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent


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


def wait_job(client: httpx.Client, job_id: str, timeout: float = 60) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        job = client.get(f"/v1/jobs/{job_id}").json()
        return job if job["status"] in ("succeeded", "failed", "cancelled") else None

    return wait_until(done, timeout, interval=0.05, what=f"job {job_id}")


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
        TENSORQ_WORKER_METRICS_PORT=str(free_port()),
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


def create_database(admin_url: str, prefix: str = "tensorq_test") -> str:
    """A new, migrated PostgreSQL database beside `admin_url`'s; returns its URL."""
    from db.migrate import upgrade

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


def training_job(name: str, epochs: int, rows: int = 160, **extra: Any) -> dict[str, Any]:
    """A small inline train-text-classifier job on the shipped dataset (seconds per epoch on CPU)."""
    import json as _json

    from tasks.data import sample_dataset_path

    data = [_json.loads(line) for line in sample_dataset_path().read_text().splitlines()[:rows]]
    params = {"data": data, "epochs": epochs, "batch_size": 16, "max_seq_length": 24, "model_name": name}
    return {"kind": "train-text-classifier", "input": {**params, **extra}}
