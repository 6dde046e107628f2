"""Tenants' data keys in SQL, and each process's keyring (tensorq/core/crypto.py says the scheme).

A process gets the keyring of a database with `keyring_for(engine)` (or `tenant_cipher(url, t)`):
the first call reads the master key from the settings and checks it against the database's
`key_check` row, so a process holding the wrong key fails on its first use of the database; the
API and the workers call `check_master_key` at start, to refuse to start instead.
"""

from __future__ import annotations

import hmac
import os
import threading
import time

from sqlalchemy import Connection, Engine, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from db.models import KeyCheck, Tenant, TenantKey, utcnow
from db.session import get_engine
from tensorq.core.crypto import (
    DataKey,
    MasterKeyError,
    PlainCipher,
    TenantCipher,
    fingerprint,
    generate_key,
    master_key,
    unwrap_data_key,
    wrap_data_key,
)
from tensorq.core.settings import Settings, get_settings

WRONG_KEY = (
    "the master key is not the one this database's data keys are wrapped with "
    "(after `tensorq keys rotate-master`, start with the new key)"
)


class Keyring:
    """The master key and the data keys unwrapped so far, for one database."""

    def __init__(
        self, master: bytes, engine: Engine, cache_seconds: float = 5.0, *, unencrypted: bool = False
    ) -> None:
        self.master = master
        self.engine = engine
        self.cache_seconds = cache_seconds
        # Settings.benchmark_unencrypted: seal nothing, accept plaintext (a benchmark's control run).
        self.unencrypted = unencrypted
        self.legacy_plaintext = unencrypted
        self._keys: dict[tuple[str, int], DataKey] = {}
        self._active: dict[str, tuple[DataKey, float]] = {}
        self._lock = threading.Lock()

    # The master key

    def verify(self, *, record: bool = True) -> None:
        """MasterKeyError unless the master key is this database's; the first start records it
        and gives every tenant without a data key one. `record=False` only reads (a first use in
        the middle of someone's transaction must not write: SQLite has one writer)."""
        mine = fingerprint(self.master)
        if not record:
            with self.engine.connect() as conn:
                row = conn.execute(select(KeyCheck.master_fingerprint, KeyCheck.legacy_plaintext)).first()
            known = row.master_fingerprint if row is not None else None
            if known is not None and not hmac.compare_digest(known, mine):
                raise MasterKeyError(WRONG_KEY)
            self.legacy_plaintext = self.unencrypted or bool(row is not None and row.legacy_plaintext)
            return
        with self.engine.begin() as conn:
            row = conn.execute(select(KeyCheck.master_fingerprint, KeyCheck.legacy_plaintext)).first()
            if row is None:
                conn.execute(insert(KeyCheck).values(id=1, master_fingerprint=mine, legacy_plaintext=False))
                legacy = False
            elif row.master_fingerprint is None:
                # Data keys made before the first start recorded the key (by an operator
                # command) must open with this one, or it is the wrong key.
                for tenant, version, wrapped in conn.execute(
                    select(TenantKey.tenant, TenantKey.version, TenantKey.wrapped)
                ):
                    try:
                        unwrap_data_key(self.master, tenant, version, wrapped)
                    except MasterKeyError:
                        raise MasterKeyError(WRONG_KEY) from None
                conn.execute(update(KeyCheck).values(master_fingerprint=mine, updated_at=utcnow()))
                legacy = row.legacy_plaintext
            elif not hmac.compare_digest(row.master_fingerprint, mine):
                raise MasterKeyError(WRONG_KEY)
            else:
                legacy = row.legacy_plaintext
            self.legacy_plaintext = self.unencrypted or bool(legacy)
            # Every tenant gets its key now, not in the middle of someone's transaction.
            missing = select(Tenant.name).where(~Tenant.name.in_(select(TenantKey.tenant)))
            for (tenant,) in conn.execute(missing).all():
                self._create(conn, tenant, 1)

    # Data keys

    def _create(self, conn: Connection, tenant: str, version: int) -> DataKey:
        key = generate_key()
        conn.execute(
            insert(TenantKey).values(
                tenant=tenant,
                version=version,
                wrapped=wrap_data_key(self.master, tenant, version, key),
                created_at=utcnow(),
            )
        )
        return DataKey.of(version, key)

    def _unwrap(self, tenant: str, version: int, wrapped: bytes) -> DataKey:
        return DataKey.of(version, unwrap_data_key(self.master, tenant, version, wrapped))

    def active(self, tenant: str, conn: Connection | None = None) -> DataKey:
        """The tenant's newest data key, created if it has none: in `conn`'s transaction when
        given (then it is not cached until it is seen committed), else in its own."""
        now = time.monotonic()
        cached = self._active.get(tenant)
        if cached is not None and cached[1] > now:
            return cached[0]
        if conn is not None and conn.get_execution_options().get("isolation_level") == "AUTOCOMMIT":
            # A one-statement session (db.session.one_statement): no transaction to create the
            # key in (nor a savepoint for the race with another process), so one of its own.
            conn = None
        if conn is None:
            with self.engine.connect() as own:
                key, created = self._active_in(own, tenant)
                own.commit()
        else:
            key, created = self._active_in(conn, tenant)
        if not created or conn is None:
            with self._lock:
                self._active[tenant] = (key, now + self.cache_seconds)
                self._keys[(tenant, key.version)] = key
        return key

    def _active_in(self, conn: Connection, tenant: str) -> tuple[DataKey, bool]:
        row = conn.execute(
            select(TenantKey.version, TenantKey.wrapped)
            .where(TenantKey.tenant == tenant)
            .order_by(TenantKey.version.desc())
            .limit(1)
        ).first()
        if row is not None:
            cached = self._keys.get((tenant, row.version))
            return (cached or self._unwrap(tenant, row.version, row.wrapped)), False
        try:
            with conn.begin_nested():
                return self._create(conn, tenant, 1), True
        except IntegrityError:  # another process created it first
            return self._active_in(conn, tenant)

    def key(self, tenant: str, version: int) -> DataKey:
        """One data key by version; KeyError if it does not exist (never made, or destroyed)."""
        cached = self._keys.get((tenant, version))
        if cached is not None:
            return cached
        with self.engine.connect() as conn:
            wrapped = conn.execute(
                select(TenantKey.wrapped).where(TenantKey.tenant == tenant, TenantKey.version == version)
            ).scalar_one_or_none()
        if wrapped is None:
            raise KeyError((tenant, version))
        key = self._unwrap(tenant, version, wrapped)
        with self._lock:
            self._keys[(tenant, version)] = key
        return key

    def cipher(self, tenant: str, conn: Connection | None = None) -> TenantCipher:
        """`conn`: a transaction the cipher is used in right away (e.g. a flush), so a key it
        creates is part of it; a cipher kept for later must not be given one."""
        if self.unencrypted:
            return PlainCipher(tenant)
        return TenantCipher(tenant, lambda: self.active(tenant, conn), lambda v: self.key(tenant, v))

    def forget(self, tenant: str) -> None:
        """Drop a tenant's cached keys (after a rotation or a deletion by this process)."""
        with self._lock:
            self._active.pop(tenant, None)
            for k in [k for k in self._keys if k[0] == tenant]:
                del self._keys[k]

    def versions(self, conn: Connection, tenant: str) -> list[int]:
        return list(
            conn.scalars(
                select(TenantKey.version).where(TenantKey.tenant == tenant).order_by(TenantKey.version)
            )
        )

    def max_version(self, conn: Connection, tenant: str) -> int:
        return int(conn.scalar(select(func.max(TenantKey.version)).where(TenantKey.tenant == tenant)) or 0)


# One keyring per database per process.
_keyrings: dict[str, Keyring] = {}
_keyrings_lock = threading.Lock()


def _url_of(engine: Engine) -> str:
    url = engine.url
    if url.drivername == "sqlite+aiosqlite":  # the API's async engine (db.session): the same database
        url = url.set(drivername="sqlite")
    return url.render_as_string(hide_password=False)


def install_keyring(engine: Engine, settings: Settings, *, record: bool = True) -> Keyring:
    """The keyring of `engine`'s database, built from `settings` and verified (MasterKeyError)."""
    if settings.benchmark_unencrypted and "bench" not in os.path.basename(engine.url.database or ""):
        # As TENSORQ_BENCHMARK_SKIP_FORWARD_PASS: only on a benchmark's own database.
        raise MasterKeyError(
            "TENSORQ_BENCHMARK_UNENCRYPTED is refused on a database whose name has no 'bench'"
        )
    keyring = Keyring(
        master_key(settings),
        engine,
        settings.data_key_cache_seconds,
        unencrypted=settings.benchmark_unencrypted,
    )
    keyring.verify(record=record)
    with _keyrings_lock:
        _keyrings[_url_of(engine)] = keyring
    return keyring


def keyring_for(engine: Engine) -> Keyring:
    url = _url_of(engine)
    found = _keyrings.get(url)
    if found is not None:
        return found
    # An async engine's (the API's, db.session.AsyncSessions) keyring reads keys synchronously:
    # they are also read outside any session (db.snapshots).
    return install_keyring(
        get_engine(url) if engine.dialect.is_async else engine, get_settings(), record=False
    )


def check_master_key(settings: Settings) -> Keyring:
    """For the API's and the workers' start: MasterKeyError (one line) if the key is missing or wrong."""
    return install_keyring(get_engine(settings.sqlalchemy_url), settings)


def tenant_cipher(database_url: str, tenant: str) -> TenantCipher:
    """A cipher for `tenant`'s data, kept as long as needed (keys are looked up when used)."""
    return keyring_for(get_engine(database_url)).cipher(tenant)
