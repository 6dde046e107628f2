"""Envelope encryption (tensorq/core/crypto.py), the keyring (db/keys.py), sealed job columns
(db/sealing.py) and the key operations (db/rekeying.py), on SQLite."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from sqlalchemy import text

from db.jobs import Outcome, claim_job, create_job, finish_jobs
from db.keys import Keyring, install_keyring, keyring_for
from db.models import Job, JobStatus
from db.rekeying import count_plaintext, delete_tenant, encrypt_existing, rotate_data_key, rotate_master
from db.session import get_engine, session_scope
from db.tenants import ensure_tenant
from tensorq.core.artifacts import ArtifactStore
from tensorq.core.crypto import (
    DataIntegrityError,
    DataKey,
    MasterKeyError,
    TenantCipher,
    encode_key,
    generate_key,
    is_sealed,
)
from tensorq.core.sealed_files import SealedFiles
from tensorq.core.settings import Settings


def cipher_for(tenant: str, key: bytes, version: int = 1) -> TenantCipher:
    data_key = DataKey.of(version, key)
    return TenantCipher(
        tenant, lambda: data_key, lambda v: data_key if v == version else (_ for _ in ()).throw(KeyError(v))
    )


def test_a_sealed_value_opens_only_where_and_for_whom_it_was_sealed() -> None:
    key = generate_key()
    acme = cipher_for("acme", key)
    blob = acme.seal(b"secret rows", "file:datasets/a.jsonl")
    assert b"secret" not in blob and is_sealed(blob)
    assert acme.open(blob, "file:datasets/a.jsonl") == b"secret rows"
    with pytest.raises(DataIntegrityError):
        acme.open(blob, "file:datasets/b.jsonl")  # moved
    with pytest.raises(DataIntegrityError):
        cipher_for("other", key).open(blob, "file:datasets/a.jsonl")  # another tenant (even the same key)
    flipped = blob[:-1] + bytes([blob[-1] ^ 1])
    with pytest.raises(DataIntegrityError):
        acme.open(flipped, "file:datasets/a.jsonl")
    with pytest.raises(DataIntegrityError):
        acme.open(blob[:10], "file:datasets/a.jsonl")  # truncated
    stored = acme.seal_json({"texts": ["x"]}, "jobs/1/params")
    assert stored.startswith("tq1:") and acme.open_json(stored, "jobs/1/params") == {"texts": ["x"]}


@pytest.fixture
def db(tmp_path: Path, sqlite_url: str) -> tuple[str, bytes]:
    master = generate_key()
    install_keyring(get_engine(sqlite_url), Settings(database_url=sqlite_url, master_key=encode_key(master)))
    return sqlite_url, master


def raw(url: str, sql: str, **params: object) -> list[tuple[object, ...]]:
    with get_engine(url).begin() as conn:
        result = conn.execute(text(sql), params)
        return [tuple(r) for r in result] if result.returns_rows else []


def new_job(url: str, tenant: str, texts: list[str]) -> uuid.UUID:
    with session_scope(url) as s:
        ensure_tenant(s, tenant)
        job = create_job(
            s, tenant=tenant, kind="embed", params={"texts": texts}, queue="inference", max_attempts=3
        )
        return job.id


def test_job_columns_are_stored_sealed_and_read_back_plain(db: tuple[str, bytes]) -> None:
    url, _ = db
    job_id = new_job(url, "acme", ["the canary"])
    ((stored,),) = raw(url, "SELECT params FROM jobs")
    assert "canary" not in str(stored) and "tq1:" in str(stored)
    with session_scope(url) as s:
        claimed = claim_job(s, job_id, worker="w", device="cpu", lease_seconds=60)
        assert claimed is not None and claimed.params == {"texts": ["the canary"]}
        finish_jobs(
            s,
            [
                Outcome(
                    job_id,
                    claimed.claim_token,
                    JobStatus.FAILED,
                    error_type="X",
                    error_message="bad: the canary",
                )
            ],
        )
    ((error,),) = raw(url, "SELECT error_message FROM jobs")
    assert "canary" not in str(error)
    with session_scope(url) as s:
        job = s.get(Job, job_id)
        assert (
            job is not None
            and job.params == {"texts": ["the canary"]}
            and job.error_message == "bad: the canary"
        )


def test_the_wrong_master_key_is_refused(db: tuple[str, bytes]) -> None:
    url, _ = db
    with pytest.raises(MasterKeyError, match="not the one"):
        Keyring(generate_key(), get_engine(url)).verify()


def test_rotate_master_rewraps_the_keys_and_only_the_new_one_opens(db: tuple[str, bytes]) -> None:
    url, master = db
    job_id = new_job(url, "acme", ["a"])
    new = generate_key()
    assert rotate_master(get_engine(url), master, new) == 1
    with pytest.raises(MasterKeyError):
        Keyring(master, get_engine(url)).verify()
    install_keyring(get_engine(url), Settings(database_url=url, master_key=encode_key(new)))
    with session_scope(url) as s:
        job = s.get(Job, job_id)
        assert job is not None and job.params == {"texts": ["a"]}


def test_rotate_data_key_reencrypts_rows_and_files_and_destroys_the_old_key(
    db: tuple[str, bytes], tmp_path: Path
) -> None:
    url, master = db
    engine = get_engine(url)
    store = ArtifactStore(tmp_path / "artifacts")
    job_id = new_job(url, "acme", ["kept"])
    keyring = keyring_for(engine)
    files = SealedFiles(store, keyring.cipher("acme"))
    model_file = store.job_dir(job_id) / "model" / "weights.bin"
    files.write(model_file, b"weights")
    old_copy = model_file.read_bytes()
    ((old_params,),) = raw(url, "SELECT params FROM jobs")
    version, done = rotate_data_key(engine, keyring, store, "acme", settle_seconds=0)
    assert version == 2 and done.values == 1 and done.files == 1
    assert raw(url, "SELECT version FROM tenant_keys WHERE tenant = 'acme'") == [(2,)]
    fresh = Keyring(master, engine)  # nothing cached
    with session_scope(url) as s:
        job = s.get(Job, job_id)
        assert job is not None and job.params == {"texts": ["kept"]}
    assert SealedFiles(store, fresh.cipher("acme")).read(model_file) == b"weights"
    with pytest.raises(DataIntegrityError, match="does not exist"):
        fresh.cipher("acme").open(old_copy, "file:" + store.relative(model_file))
    with pytest.raises(DataIntegrityError):
        fresh.cipher("acme").open_json(json.loads(str(old_params)), f"jobs/{job_id}/params")
    # Run again: a new rotation, and nothing lost.
    assert rotate_data_key(engine, keyring, store, "acme", settle_seconds=0)[0] == 3


def test_encrypt_existing_seals_what_was_stored_in_plaintext(db: tuple[str, bytes], tmp_path: Path) -> None:
    url, _ = db
    engine = get_engine(url)
    store = ArtifactStore(tmp_path / "artifacts")
    job_id = uuid.uuid4()
    raw(
        url,
        "INSERT INTO jobs (id, tenant, kind, queue, status, params, attempts, max_attempts, cancel_requested,"
        " created_at, updated_at, webhook_attempts, batch_cost) VALUES (:id, 'old', 'embed', 'inference',"
        " 'queued', :params, 0, 3, 0, '2026-01-01 00:00:00', '2026-01-01 00:00:00', 0, 1)",
        id=job_id.hex,
        params=json.dumps({"texts": ["from before"]}),
    )
    legacy_file = store.job_dir(job_id) / "checkpoint" / "state.pt"
    legacy_file.parent.mkdir(parents=True)
    legacy_file.write_bytes(b"plain checkpoint")
    raw(url, "UPDATE key_check SET legacy_plaintext = 1")
    keyring = install_keyring(
        engine, Settings(database_url=url, master_key=encode_key(keyring_for(engine).master))
    )
    with session_scope(url) as s:
        job = s.get(Job, job_id)
        assert job is not None and job.params == {"texts": ["from before"]}  # readable before
    assert count_plaintext(engine) == 1
    done = encrypt_existing(engine, keyring, store)
    assert done.values == 1 and done.files == 1 and count_plaintext(engine) == 0
    assert b"plain" not in legacy_file.read_bytes()
    assert SealedFiles(store, keyring.cipher("old")).read(legacy_file) == b"plain checkpoint"
    assert raw(url, "SELECT legacy_plaintext FROM key_check") == [(0,)]
    # From now on, plaintext written behind the service's back is refused as tampering.
    raw(url, "UPDATE jobs SET params = :p", p=json.dumps({"texts": ["forged"]}))
    with session_scope(url) as s:
        job = s.get(Job, job_id)
        assert job is not None
        with pytest.raises(DataIntegrityError, match="not sealed"):
            dict(job.params)


def test_delete_tenant_destroys_its_keys_then_its_rows_and_files(
    db: tuple[str, bytes], tmp_path: Path
) -> None:
    url, master = db
    engine = get_engine(url)
    store = ArtifactStore(tmp_path / "artifacts")
    job_id = new_job(url, "gone", ["bye"])
    kept = new_job(url, "stays", ["hi"])
    keyring = keyring_for(engine)
    path = store.job_dir(job_id) / "model" / "w"
    SealedFiles(store, keyring.cipher("gone")).write(path, b"w")
    backup = path.read_bytes()
    dry = delete_tenant(engine, keyring, store, "gone", apply=False)
    assert dry.rows["jobs"] == 1 and dry.data_keys == 1 and dry.files == 1 and path.exists()
    delete_tenant(engine, keyring, store, "gone", apply=True)
    assert raw(url, "SELECT count(*) FROM jobs WHERE tenant = 'gone'") == [(0,)]
    assert raw(url, "SELECT count(*) FROM tenant_keys WHERE tenant = 'gone'") == [(0,)]
    assert not path.exists()
    with pytest.raises(DataIntegrityError):
        Keyring(master, engine).cipher("gone").open(backup, "file:" + store.relative(path))
    with session_scope(url) as s:
        other = s.get(Job, kept)
        assert other is not None and other.params == {"texts": ["hi"]}


def test_a_first_start_with_another_key_than_the_data_keys_were_made_with_is_refused(sqlite_url: str) -> None:
    """An operator command may make data keys before any service start recorded the master key."""
    engine = get_engine(sqlite_url)
    first = Keyring(generate_key(), engine)
    first.verify(record=False)  # a lazy first use: records nothing
    with engine.begin() as conn:
        first.active("acme", conn)
    assert raw(sqlite_url, "SELECT master_fingerprint FROM key_check") == [(None,)]
    with pytest.raises(MasterKeyError):
        Keyring(generate_key(), engine).verify()
    first.verify()
    assert raw(sqlite_url, "SELECT master_fingerprint IS NOT NULL FROM key_check") == [(1,)]


def test_the_unencrypted_benchmark_control_is_refused_outside_a_benchmark_database(sqlite_url: str) -> None:
    settings = Settings(
        database_url=sqlite_url, master_key=encode_key(generate_key()), benchmark_unencrypted=True
    )
    with pytest.raises(MasterKeyError, match="bench"):
        install_keyring(get_engine(sqlite_url), settings)
