"""Operations on keys and on the data they seal: rotating the master key, rotating a tenant's data
key (re-encrypting its rows and files), deleting a tenant (crypto-shredding), and sealing what was
stored before encryption existed. The commands are in tensorq/cli/crypto.py.

Rewrites happen while the service runs: each row's value is replaced only if it is still the one
read (a conditional UPDATE on its stored text), and each file is rewritten atomically. All of them
are resumable: run again after a crash, they skip what is already done.
"""

from __future__ import annotations

import hmac
import logging
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, Text, cast, delete, func, select, update

from db.keys import WRONG_KEY, Keyring
from db.models import (
    AliasChange,
    ApiKey,
    Dataset,
    Job,
    KeyCheck,
    Model,
    ModelAlias,
    ModelEvaluation,
    ModelVersion,
    OpenAIBatch,
    OpenAIBatchRequest,
    OpenAIFile,
    ShadowRun,
    Tenant,
    TenantKey,
    utcnow,
)
from db.sealing import SEALED, object_name
from tensorq.core.artifacts import ArtifactStore
from tensorq.core.crypto import (
    TEXT_PREFIX,
    MasterKeyError,
    TenantCipher,
    fingerprint,
    is_sealed,
    is_sealed_text,
    unwrap_data_key,
    wrap_data_key,
)
from tensorq.core.sealed_files import SealedFiles

log = logging.getLogger(__name__)
CHUNK = 500


@dataclass
class Rewritten:
    """What a pass did: values and files rewritten, and those skipped (changed under it, or gone)."""

    values: int = 0
    files: int = 0
    skipped: int = 0
    unreadable: list[str] = field(default_factory=list)

    def add(self, other: Rewritten) -> None:
        self.values += other.values
        self.files += other.files
        self.skipped += other.skipped
        self.unreadable += other.unreadable


# The master key


def rotate_master(engine: Engine, old: bytes, new: bytes) -> int:
    """Re-wrap every data key with `new`, in one transaction; no data is rewritten. Returns the
    number of data keys. Afterwards only `new` starts the service."""
    with engine.begin() as conn:
        stored = conn.execute(select(KeyCheck.master_fingerprint)).scalar_one_or_none()
        if stored is not None and not hmac.compare_digest(stored, fingerprint(old)):
            raise MasterKeyError(WRONG_KEY)
        rows = conn.execute(
            select(TenantKey.tenant, TenantKey.version, TenantKey.wrapped).with_for_update()
        ).all()
        for tenant, version, wrapped in rows:
            key = unwrap_data_key(old, tenant, version, wrapped)
            conn.execute(
                update(TenantKey)
                .where(TenantKey.tenant == tenant, TenantKey.version == version)
                .values(wrapped=wrap_data_key(new, tenant, version, key))
            )
        conn.execute(update(KeyCheck).values(master_fingerprint=fingerprint(new), updated_at=utcnow()))
    return len(rows)


# A tenant's rows and files


def tenant_files(engine: Engine, store: ArtifactStore, tenant: str) -> Iterator[Path]:
    """Every file of the tenant's: datasets, OpenAI files, and its jobs' directories (checkpoints,
    trained and optimised models)."""
    with engine.connect() as conn:
        paths = list(conn.scalars(select(Dataset.path).where(Dataset.tenant == tenant)))
        paths += list(conn.scalars(select(OpenAIFile.path).where(OpenAIFile.tenant == tenant)))
        job_ids = list(conn.scalars(select(Job.id).where(Job.tenant == tenant)))
    for rel in paths:
        path = store.path(rel)
        if path.is_file():
            yield path
    for job_id in job_ids:
        job_dir = store.job_dir(job_id)
        if job_dir.is_dir():
            yield from sorted(p for p in job_dir.rglob("*") if p.is_file() and not p.is_symlink())


def _rewrite_values(
    engine: Engine,
    tenant: str | None,
    decide: Callable[[str, str, Any, bool], Any | None],
) -> Rewritten:
    """For every sealed column of every row (of `tenant`, or all): `decide(tenant, obj, stored,
    text)` returns the new stored value, or None to leave it. Replaced only if unchanged since read."""
    done = Rewritten()
    for table, (key_attr, json_cols, text_cols) in SEALED.items():
        pk = getattr(table, key_attr)
        for col in (*json_cols, *text_cols):
            column = getattr(table, col)
            stored_text = cast(column, Text) if col in json_cols else column
            last: Any = None
            while True:
                stmt = select(pk, table.tenant, column, stored_text).where(column.is_not(None))  # type: ignore[attr-defined]
                if tenant is not None:
                    stmt = stmt.where(table.tenant == tenant)  # type: ignore[attr-defined]
                if last is not None:
                    stmt = stmt.where(pk > last)
                with engine.begin() as conn:
                    rows = conn.execute(stmt.order_by(pk).limit(CHUNK)).all()
                    for key, owner, value, as_text in rows:
                        obj = object_name(table.__tablename__, key, col)  # type: ignore[attr-defined]
                        new = decide(owner, obj, value, col in text_cols)
                        if new is None:
                            continue
                        res = conn.execute(
                            update(table)
                            .where(pk == key, stored_text == as_text)
                            .values({col: new})
                            .execution_options(synchronize_session=False)
                        )
                        if res.rowcount:
                            done.values += 1
                        else:
                            done.skipped += 1
                if len(rows) < CHUNK:
                    break
                last = rows[-1][0]
    return done


def _sealed_version(cipher: TenantCipher, value: Any, obj: str) -> int | None:
    return cipher.text_version(value, obj) if is_sealed_text(value) else None


def rotate_data_key(
    engine: Engine,
    keyring: Keyring,
    store: ArtifactStore,
    tenant: str,
    *,
    settle_seconds: float | None = None,
) -> tuple[int, Rewritten]:
    """Give `tenant` a new data key and re-encrypt everything sealed with an older one, then
    destroy the older ones. Resumable: a rotation left half done (two or more key versions) is
    continued, not started again. Returns (the new version, what was rewritten)."""
    with engine.begin() as conn:
        versions = keyring.versions(conn, tenant)
        if not versions:
            raise LookupError(f"tenant {tenant!r} has no data key")
        if len(versions) == 1:  # a new rotation; else one left half done is continued
            keyring._create(conn, tenant, versions[-1] + 1)
    keyring.forget(tenant)
    with engine.connect() as conn:
        active = keyring.max_version(conn, tenant)
    # Every process asks for the active key again within data_key_cache_seconds: wait that out,
    # so nothing is still being sealed with an old key when the pass starts.
    settle = keyring.cache_seconds * 2 if settle_seconds is None else settle_seconds
    time.sleep(settle)
    cipher = keyring.cipher(tenant)
    done = Rewritten()
    for _ in range(2):  # the second pass catches a writer that sealed with an old key meanwhile
        done.add(_reseal_tenant(engine, store, cipher, tenant, active))
    remaining = done.unreadable
    if remaining:
        raise RuntimeError(f"{len(remaining)} objects did not open; old keys kept: {remaining[:5]}")
    with engine.begin() as conn:
        conn.execute(delete(TenantKey).where(TenantKey.tenant == tenant, TenantKey.version < active))
    keyring.forget(tenant)
    return active, done


def _reseal_tenant(
    engine: Engine, store: ArtifactStore, cipher: TenantCipher, tenant: str, active: int
) -> Rewritten:
    def decide(_owner: str, obj: str, value: Any, text: bool) -> Any | None:
        version = _sealed_version(cipher, value, obj)
        if version is None or version >= active:
            return None
        try:
            return (
                cipher.seal_text(cipher.open_text(value, obj), obj)
                if text
                else _reseal_json(cipher, value, obj)
            )
        except Exception as exc:  # DataIntegrityError: reported, the old keys are then kept
            done.unreadable.append(f"{obj}: {exc}")
            return None

    done = Rewritten()
    done.add(_rewrite_values(engine, tenant, decide))
    files = SealedFiles(store, cipher)
    for path in tenant_files(engine, store, tenant):
        data = path.read_bytes()
        if not is_sealed(data) or cipher.version_of(data, store.relative(path)) >= active:
            continue  # plaintext is encrypt-existing's; this one is done
        try:
            files.write(path, files.read(path))
            done.files += 1
        except Exception as exc:
            done.unreadable.append(f"{store.relative(path)}: {exc}")
    return done


def _reseal_json(cipher: TenantCipher, value: str, obj: str) -> str:
    return cipher.seal_json(cipher.open_json(value, obj), obj)


# Existing (pre-encryption) data


def encrypt_existing(engine: Engine, keyring: Keyring, store: ArtifactStore) -> Rewritten:
    """Seal every value and file stored in plaintext before encryption, then mark the database as
    holding none (plaintext is refused from then on). Resumable; safe while the service runs."""
    ciphers: dict[str, TenantCipher] = {}

    def cipher_of(tenant: str) -> TenantCipher:
        if tenant not in ciphers:
            ciphers[tenant] = keyring.cipher(tenant)
        return ciphers[tenant]

    def decide(owner: str, obj: str, value: Any, text: bool) -> Any | None:
        if is_sealed_text(value):
            return None
        cipher = cipher_of(owner)
        return cipher.seal_text(value, obj) if text else cipher.seal_json(value, obj)

    done = _rewrite_values(engine, None, decide)
    with engine.connect() as conn:
        tenants = set(conn.scalars(select(Job.tenant).distinct()))
        tenants |= set(conn.scalars(select(Dataset.tenant).distinct()))
        tenants |= set(conn.scalars(select(OpenAIFile.tenant).distinct()))
    for tenant in sorted(tenants):
        files = SealedFiles(store, cipher_of(tenant))
        for path in tenant_files(engine, store, tenant):
            data = path.read_bytes()
            if is_sealed(data):
                continue
            files.write(path, data)
            done.files += 1
    with engine.begin() as conn:
        conn.execute(update(KeyCheck).values(legacy_plaintext=False, updated_at=utcnow()))
    keyring.legacy_plaintext = False
    return done


def count_plaintext(engine: Engine) -> int:
    """Sealed columns' values that are still plaintext (0 once encrypt-existing has run)."""
    total = 0
    with engine.connect() as conn:
        # Only JSON columns: text columns may hold the system's own plaintext messages.
        for table, (_, json_cols, _text_cols) in SEALED.items():
            for col in json_cols:
                column = getattr(table, col)
                text = cast(column, Text)
                total += int(
                    conn.scalar(
                        select(func.count()).where(
                            column.is_not(None), text != "null", ~text.startswith('"' + TEXT_PREFIX)
                        )
                    )
                    or 0
                )
    return total


# Deleting a tenant


@dataclass
class TenantDeletion:
    tenant: str
    data_keys: int = 0
    rows: dict[str, int] = field(default_factory=dict)
    files: int = 0
    file_bytes: int = 0
    # Its API keys: the caller tells the API processes' key caches they are gone.
    key_ids: list[uuid.UUID] = field(default_factory=list)


def delete_tenant(
    engine: Engine, keyring: Keyring, store: ArtifactStore, tenant: str, *, apply: bool
) -> TenantDeletion:
    """Destroy the tenant's data keys (so every copy of its data, backups included, is unreadable),
    then delete its files and rows. A dry run (apply=False) only counts."""
    report = TenantDeletion(tenant)
    files = list(tenant_files(engine, store, tenant))
    report.files = len(files)
    report.file_bytes = sum(p.stat().st_size for p in files)
    with engine.begin() as conn:
        report.data_keys = int(conn.scalar(select(func.count()).where(TenantKey.tenant == tenant)) or 0)
        report.key_ids = list(conn.scalars(select(ApiKey.id).where(ApiKey.tenant == tenant)))
        model_ids = select(Model.id).where(Model.tenant == tenant)
        batch_ids = select(OpenAIBatch.id).where(OpenAIBatch.tenant == tenant)
        # Children before parents (SQLite enforces no foreign keys here, so no cascade either).
        targets: list[tuple[str, Any]] = [
            (
                "model_evaluations",
                ModelEvaluation.model_version_id.in_(
                    select(ModelVersion.id).where(ModelVersion.model_id.in_(model_ids))
                ),
            ),
            ("model_alias_history", AliasChange.model_id.in_(model_ids)),
            ("model_aliases", ModelAlias.model_id.in_(model_ids)),
            ("model_versions", ModelVersion.model_id.in_(model_ids)),
            ("models", Model.tenant == tenant),
            ("shadow_runs", ShadowRun.tenant == tenant),
            ("openai_batch_requests", OpenAIBatchRequest.batch_id.in_(batch_ids)),
            ("openai_batches", OpenAIBatch.tenant == tenant),
            ("openai_files", OpenAIFile.tenant == tenant),
            ("datasets", Dataset.tenant == tenant),
            ("jobs", Job.tenant == tenant),
            ("api_keys", ApiKey.tenant == tenant),
            ("tenants", Tenant.name == tenant),
        ]
        tables = {
            t.__tablename__: t
            for t in (
                ModelEvaluation,
                AliasChange,
                ModelAlias,
                ModelVersion,
                Model,
                ShadowRun,
                OpenAIBatchRequest,
                OpenAIBatch,
                OpenAIFile,
                Dataset,
                Job,
                ApiKey,
                Tenant,
            )
        }
        for name, where in targets:
            report.rows[name] = int(
                conn.scalar(select(func.count()).select_from(tables[name]).where(where)) or 0
            )
        if not apply:
            return report
        # First the keys, committed on their own: from here on nothing of the tenant's opens.
        conn.execute(delete(TenantKey).where(TenantKey.tenant == tenant))
    keyring.forget(tenant)
    for path in files:
        path.unlink(missing_ok=True)
    with engine.connect() as conn:
        job_ids = list(conn.scalars(select(Job.id).where(Job.tenant == tenant)))
    for job_id in job_ids:
        job_dir = store.job_dir(job_id)
        if job_dir.is_dir():
            shutil.rmtree(job_dir, ignore_errors=True)
    with engine.begin() as conn:
        for name, where in targets:
            conn.execute(delete(tables[name]).where(where).execution_options(synchronize_session=False))
    return report
