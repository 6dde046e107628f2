"""Encryption at rest (issue #21), against real PostgreSQL, Redis and worker processes: a canary
placed in a dataset, in job inputs and in a trained model's data is absent from every file under
the artifact directory, from `pg_dump` and from everything Redis saw, while the API reads it back;
rotations keep it readable; tampering is a DataIntegrityError; a deleted tenant's data is gone and
a copy taken before deletion cannot be opened."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from tasks.data import sample_dataset_path
from tests.conftest import POSTGRES_ADMIN_URL
from tests.helpers import (
    RedisServer,
    Service,
    create_database,
    drop_database,
    insert_queued_row,
    service_env,
    start_service,
    tenant_of,
    wait_job,
    wait_until,
)

pytestmark = pytest.mark.integration

CANARY = "canary-7f3a9c1e-zebra-quartz"


def hidden_forms(secret: str) -> list[bytes]:
    """The canary, and its base64 at each of the three alignments (Redis message bodies are base64)."""
    raw = secret.encode()
    forms = [raw]
    for pad in range(3):
        encoded = base64.b64encode(b"\0" * pad + raw)
        forms.append(encoded[(pad * 4 + 2) // 3 + 1 : -4])
    return forms


def assert_no_canary(blob: bytes, where: str) -> None:
    for form in hidden_forms(CANARY):
        assert form not in blob, f"the canary ({form!r}) is in {where}"


class RedisMonitor:
    """Everything the Redis server is sent (redis-cli MONITOR), captured to a file."""

    def __init__(self, url: str, out: Path) -> None:
        self.out = out
        self.file = out.open("wb")
        self.proc = subprocess.Popen(
            ["redis-cli", "-u", url, "monitor"], stdout=self.file, stderr=subprocess.STDOUT
        )
        wait_until(lambda: out.stat().st_size > 0, 10, what="redis-cli monitor")  # prints "OK"

    def stop(self) -> bytes:
        self.proc.terminate()
        self.proc.wait(10)
        self.file.close()
        return self.out.read_bytes()


def dataset_with_canary() -> bytes:
    lines = sample_dataset_path().read_text().splitlines()[:160]
    rows = [json.loads(line) for line in lines]
    for row in rows[::4]:
        row["text"] = f"{row['text']} {CANARY}"
    return "\n".join(json.dumps(r) for r in rows).encode()


def cli(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tensorq.cli", *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def sqlalchemy_url(url: str) -> str:
    return url.replace("postgresql://", "postgresql+psycopg://")


@dataclass
class Deployment:
    db_url: str
    redis_url: str
    tmp: Path
    env: dict[str, str]
    service: Service
    tenant: str = ""
    dataset_id: str = ""
    model: str = "canary-clf"
    job_ids: tuple[str, ...] = ()

    @property
    def artifacts(self) -> Path:
        return Path(self.env["TENSORQ_ARTIFACT_DIR"])

    def client(self, key: str | None = None) -> httpx.Client:
        return self.service.client(key)

    def restart(self, env: dict[str, str] | None = None) -> None:
        """Stop and start the API and the worker; the first tenant's key keeps working."""
        self.stop()
        self.start(env or self.env)

    def start(self, env: dict[str, str]) -> None:
        key = self.service.api_key
        self.env = env
        self.service = start_service(env, self.tmp)
        self.service.api_key = key

    def stop(self) -> None:
        self.service.api.stop()
        self.service.worker.stop()


def classify(c: httpx.Client, model: str, text: str) -> dict[str, Any]:
    r = c.post(
        "/v1/jobs",
        json={"kind": "classify", "input": {"model": model, "texts": [text]}},
        headers={"Prefer": "wait=60"},
    )
    assert r.status_code in (201, 202), r.text
    return wait_job(c, r.json()["id"], timeout=120)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    tmp = tmp_path_factory.mktemp("encryption")
    # A Redis server of its own: the session's shared service has a worker consuming the same
    # queues on the shared one, which would take (and drop) this deployment's messages; and
    # MONITOR then sees this deployment only.
    server = RedisServer(tmp)
    server.start()
    redis_url = server.url
    db_url = create_database(POSTGRES_ADMIN_URL)
    env = service_env(db_url, redis_url, tmp)
    monitor = RedisMonitor(redis_url, tmp / "monitor.txt")
    dep = Deployment(db_url, redis_url, tmp, env, start_service(env, tmp))
    try:
        with dep.client() as c:
            dep.tenant = tenant_of(c)
            r = c.post(
                "/v1/datasets",
                content=dataset_with_canary(),
                headers={"content-type": "application/x-ndjson"},
            )
            assert r.status_code == 201, r.text
            dep.dataset_id = r.json()["id"]
            r = c.post(
                "/v1/jobs",
                json={
                    "kind": "train-text-classifier",
                    "input": {"dataset_id": dep.dataset_id, "model_name": dep.model, "epochs": 1,
                              "batch_size": 16, "max_seq_length": 24},
                },
            )  # fmt: skip
            assert r.status_code == 202, r.text
            trained = wait_job(c, r.json()["id"], timeout=300)
            assert trained["status"] == "succeeded", trained
            # A lone job answered through the finished event (its row rides in Redis), and a batch.
            lone = c.post(
                "/v1/jobs",
                json={"kind": "embed", "input": {"texts": [f"lone {CANARY}"]}},
                headers={"Prefer": "wait=60"},
            )
            assert lone.status_code == 201, lone.text
            assert lone.json()["input"]["texts"] == [f"lone {CANARY}"]
            batch = c.post(
                "/v1/jobs:batch",
                json={
                    "jobs": [{"kind": "embed", "input": {"texts": [f"batch {i} {CANARY}"]}} for i in range(4)]
                },
            )
            assert batch.status_code == 202, batch.text
            ids = batch.json()["ids"]
            for job_id in ids:
                assert wait_job(c, job_id)["status"] == "succeeded"
            predicted = classify(c, dep.model, f"this is wonderful {CANARY}")
            assert predicted["status"] == "succeeded", predicted
            dep.job_ids = (trained["id"], lone.json()["id"], *ids, predicted["id"])
        (tmp / "redis-seen.txt").write_bytes(monitor.stop())
        yield dep
    finally:
        if monitor.proc.poll() is None:
            monitor.stop()
        dep.stop()
        drop_database(POSTGRES_ADMIN_URL, db_url)
        server.stop()


def test_the_canary_is_nowhere_at_rest_nor_in_redis_but_every_read_gives_it(deployment: Deployment) -> None:
    dep = deployment
    files = [p for p in dep.artifacts.rglob("*") if p.is_file()]
    assert any(p.suffix == ".jsonl" for p in files) and any("model" in p.parts[-2] for p in files), files
    for path in files:
        assert_no_canary(path.read_bytes(), str(path))
    dump = subprocess.run(["pg_dump", "--data-only", dep.db_url], capture_output=True, check=True).stdout
    assert b"tq1:" in dump  # the sealed values are there
    assert_no_canary(dump, "pg_dump")
    seen = (dep.tmp / "redis-seen.txt").read_bytes()
    assert b"tensorq" in seen and len(seen) > 10_000, "MONITOR saw the run"
    assert_no_canary(seen, "Redis (MONITOR)")
    with dep.client() as c:
        trained, lone, *rest = (c.get(f"/v1/jobs/{i}").json() for i in dep.job_ids)
        assert trained["result"]["model"] == dep.model
        assert lone["input"]["texts"] == [f"lone {CANARY}"] and len(lone["result"]["embeddings"][0]) == 384
        assert rest[-1]["input"]["texts"] == [f"this is wonderful {CANARY}"]
        page = c.get("/v1/jobs", params={"include": "input", "kind": "embed", "limit": 50}).json()["items"]
        assert any(CANARY in t for j in page for t in j["input"]["texts"])


def test_a_flipped_byte_in_a_column_or_a_file_is_a_data_integrity_error(deployment: Deployment) -> None:
    dep = deployment
    lone_id = dep.job_ids[1]
    with psycopg.connect(dep.db_url) as conn:
        stored = conn.execute("SELECT result #>> '{}' FROM jobs WHERE id = %s", (lone_id,)).fetchone()[0]
        flipped = stored[:40] + ("A" if stored[40] != "A" else "B") + stored[41:]
        conn.execute("UPDATE jobs SET result = to_jsonb(%s::text) WHERE id = %s", (flipped, lone_id))
    with dep.client() as c:
        r = c.get(f"/v1/jobs/{lone_id}")
        assert r.status_code == 500
        assert CANARY not in r.text and "Traceback" not in r.text
        assert f"jobs/{lone_id}/result" in dep.service.api.log()
        with psycopg.connect(dep.db_url) as conn:  # put it back: the rotation test needs it whole
            conn.execute("UPDATE jobs SET result = to_jsonb(%s::text) WHERE id = %s", (stored, lone_id))
        assert c.get(f"/v1/jobs/{lone_id}").status_code == 200
        # A queued job whose params were tampered with fails with the type, and never runs on them.
        job_id = insert_queued_row(dep.db_url, dep.tenant, "embed", {"texts": ["fine"]}, published=False)
        with psycopg.connect(dep.db_url) as conn:
            stored = conn.execute("SELECT params #>> '{}' FROM jobs WHERE id = %s", (job_id,)).fetchone()[0]
            flipped = stored[:30] + ("A" if stored[30] != "A" else "B") + stored[31:]
            conn.execute("UPDATE jobs SET params = to_jsonb(%s::text) WHERE id = %s", (flipped, job_id))

        # (The API cannot show it either: its input does not open. The row says what happened.)
        def final_state() -> tuple[str, str] | None:
            with psycopg.connect(dep.db_url) as conn:
                row = conn.execute("SELECT status, error_type FROM jobs WHERE id = %s", (job_id,)).fetchone()
            return (row[0], row[1]) if row and row[0] in ("succeeded", "failed") else None

        assert wait_until(final_state, 60, what="the tampered job") == ("failed", "DataIntegrityError")
        assert c.get(f"/v1/jobs/{job_id}").status_code == 500
        with psycopg.connect(dep.db_url) as conn:  # a rotation refuses to destroy a key data still needs
            conn.execute("DELETE FROM jobs WHERE id = %s", (job_id,))
        # A flipped byte in the model's weights: the next classify job fails with the type.
        weights = [p for p in dep.artifacts.rglob("*.safetensors")]
        assert weights
        backup = {p: p.read_bytes() for p in weights}
        try:
            for p, data in backup.items():
                p.write_bytes(data[:100] + bytes([data[100] ^ 0x01]) + data[101:])
            dep.restart()  # a fresh worker: nothing cached in memory
            with dep.client() as c2:
                broken = classify(c2, dep.model, "anything")
            assert broken["status"] == "failed" and broken["error"]["type"] == "DataIntegrityError", broken
        finally:
            for p, data in backup.items():
                p.write_bytes(data)
        # Copied to another path, a sealed file does not open either.
        dataset_file = next(p for p in dep.artifacts.rglob("*.jsonl"))
        with dep.client() as c3:
            other = c3.post("/v1/datasets", content=b'{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}',
                            headers={"content-type": "application/x-ndjson"}).json()["id"]  # fmt: skip
            target = dep.artifacts / "datasets" / f"{other}.jsonl"
            saved = target.read_bytes()
            shutil.copyfile(dataset_file, target)
            r = c3.post("/v1/jobs", json={"kind": "train-text-classifier",
                                          "input": {"dataset_id": other, "model_name": "copied", "epochs": 1}})  # fmt: skip
            assert r.status_code == 202, r.text
            moved = wait_job(c3, r.json()["id"], timeout=120)
            target.write_bytes(saved)
        assert moved["status"] == "failed" and moved["error"]["type"] == "DataIntegrityError", moved


def test_rotations_keep_everything_readable_and_the_old_master_key_is_refused(deployment: Deployment) -> None:
    from db.keys import install_keyring
    from db.session import get_engine
    from tensorq.core.settings import Settings

    dep = deployment
    # A data-key rotation while the service runs.
    done = cli(dep.env, "tenants", "rotate-data-key", dep.tenant, "--settle-seconds", "1", timeout=300)
    assert done.returncode == 0, done.stderr
    with psycopg.connect(dep.db_url) as conn:
        versions = [
            v for (v,) in conn.execute("SELECT version FROM tenant_keys WHERE tenant = %s", (dep.tenant,))
        ]
    assert versions == [2]
    with dep.client() as c:
        assert c.get(f"/v1/jobs/{dep.job_ids[-1]}").json()["input"]["texts"] == [
            f"this is wonderful {CANARY}"
        ]
    dep.restart()  # nothing cached: files and rows open with the new data key only
    with dep.client() as c:
        assert classify(c, dep.model, "a fine day")["status"] == "succeeded"
        assert c.get(f"/v1/jobs/{dep.job_ids[0]}").json()["result"]["model"] == dep.model
    # A master-key rotation; then the old key no longer starts the service.
    old_key = dep.env["TENSORQ_MASTER_KEY"]
    new_file = dep.tmp / "new-master.key"
    assert cli(dep.env, "keys", "generate-master", "--out", str(new_file)).returncode == 0
    assert oct(new_file.stat().st_mode & 0o777) == "0o600"
    rotated = cli(dep.env, "keys", "rotate-master", "--new-key-file", str(new_file))
    assert rotated.returncode == 0, rotated.stderr
    dep.stop()
    refused = cli(dep.env, "api", "--port", "1")
    assert refused.returncode == 2
    assert refused.stderr.strip().count("\n") == 0 and "master key" in refused.stderr, refused.stderr
    missing = cli({k: v for k, v in dep.env.items() if k != "TENSORQ_MASTER_KEY"}, "worker", "--gpus", "none")
    assert missing.returncode == 2 and "no master key" in missing.stderr, missing.stderr
    new_env = {k: v for k, v in dep.env.items() if k != "TENSORQ_MASTER_KEY"}
    new_env["TENSORQ_MASTER_KEY_FILE"] = str(new_file)
    install_keyring(
        get_engine(sqlalchemy_url(dep.db_url)),
        Settings(database_url=dep.db_url, master_key=new_file.read_text().strip()),
    )
    dep.start(new_env)
    with dep.client() as c:
        assert c.get(f"/v1/jobs/{dep.job_ids[-1]}").json()["input"]["texts"] == [
            f"this is wonderful {CANARY}"
        ]
        assert classify(c, dep.model, "a fine day")["status"] == "succeeded"
    assert old_key != new_file.read_text().strip()


def test_a_deleted_tenants_rows_are_gone_and_a_copy_of_its_files_does_not_open(
    deployment: Deployment,
) -> None:
    from db.keys import Keyring
    from db.session import get_engine
    from tensorq.core.artifacts import ArtifactStore
    from tensorq.core.crypto import DataIntegrityError, read_key_file
    from tensorq.core.sealed_files import SealedFiles

    dep = deployment
    victim = f"gone-{uuid.uuid4().hex[:6]}"
    key = dep.service.new_key(victim)
    with dep.client(key) as c:
        r = c.post(
            "/v1/datasets", content=dataset_with_canary(), headers={"content-type": "application/x-ndjson"}
        )
        dataset_id = r.json()["id"]
        job = c.post("/v1/jobs", json={"kind": "embed", "input": {"texts": [CANARY]}}).json()
        assert wait_job(c, job["id"])["status"] == "succeeded"
    backup = dep.tmp / "backup"
    shutil.copytree(dep.artifacts, backup)
    with psycopg.connect(dep.db_url) as conn:
        sealed_params = conn.execute(
            "SELECT params #>> '{}' FROM jobs WHERE id = %s", (job["id"],)
        ).fetchone()[0]
    dry = cli(dep.env, "tenants", "delete", victim)
    assert dry.returncode == 0, dry.stderr
    report = json.loads(dry.stdout)
    assert report["applied"] is False and report["rows"]["jobs"] == 1 and report["rows"]["datasets"] == 1
    assert (dep.artifacts / "datasets" / f"{dataset_id}.jsonl").exists()
    applied = cli(dep.env, "tenants", "delete", victim, "--apply")
    assert applied.returncode == 0, applied.stderr
    with psycopg.connect(dep.db_url) as conn:
        for table, column in [("jobs", "tenant"), ("datasets", "tenant"), ("api_keys", "tenant"),
                              ("tenants", "name"), ("tenant_keys", "tenant")]:  # fmt: skip
            assert (
                conn.execute(f"SELECT count(*) FROM {table} WHERE {column} = %s", (victim,)).fetchone()[0]
                == 0
            )
    assert not (dep.artifacts / "datasets" / f"{dataset_id}.jsonl").exists()
    with dep.client(key) as c:
        assert c.get("/v1/whoami").status_code == 401
    # The backup: with the master key (a fresh keyring, nothing cached), nothing of it opens.
    master = read_key_file(Path(dep.env["TENSORQ_MASTER_KEY_FILE"])) if "TENSORQ_MASTER_KEY_FILE" in dep.env else (
        base64.b64decode(dep.env["TENSORQ_MASTER_KEY"]))  # fmt: skip
    keyring = Keyring(master, get_engine(sqlalchemy_url(dep.db_url)))
    copy = backup / "datasets" / f"{dataset_id}.jsonl"
    files = SealedFiles(ArtifactStore(backup), keyring.cipher(victim))
    with pytest.raises(DataIntegrityError):
        files.read(copy)
    with pytest.raises(DataIntegrityError):
        keyring.cipher(victim).open_json(sealed_params, f"jobs/{job['id']}/params")
    assert os.environ.get("TENSORQ_MASTER_KEY")  # the test process's own key is untouched
