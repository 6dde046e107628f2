"""Tenants and API keys. A key is a random token shown once; only its SHA-256 is stored.

SHA-256 (not a slow password hash) is the right tool here: the keys are 256-bit random tokens,
so there is nothing to brute-force, and a fast hash keeps authentication to one indexed lookup.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import uuid
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from db.keys import keyring_for
from db.models import ApiKey, Tenant, utcnow

TENANT_NAME = r"[a-z0-9][a-z0-9_-]{0,62}"
TENANT_RE = re.compile(rf"^{TENANT_NAME}$")
KEY_PREFIX = "tq_"
PREFIX_CHARS = len(KEY_PREFIX) + 8


@dataclass(frozen=True)
class Principal:
    """Who is calling: the tenant every query is scoped to, and the key used."""

    tenant: str
    key_id: uuid.UUID
    admin: bool


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_webhook_secret() -> str:
    return "whsec_" + secrets.token_hex(24)


def ensure_tenant(session: Session, name: str) -> Tenant:
    if not TENANT_RE.match(name):
        raise ValueError(f"not a tenant name: {name!r} (lowercase letters, digits, '-' and '_')")
    tenant = session.get(Tenant, name)
    if tenant is None:
        tenant = Tenant(name=name, webhook_secret=new_webhook_secret(), created_at=utcnow())
        session.add(tenant)
        session.flush()
        # Its data key, in the same transaction (tensorq/core/crypto.py).
        keyring_for(session.get_bind().engine).active(name, session.connection())
    return tenant


def create_key(
    session: Session, tenant: str, *, admin: bool = False, label: str | None = None
) -> tuple[ApiKey, str]:
    """A new key for `tenant` (created if new): the stored row and the key, which is not kept."""
    ensure_tenant(session, tenant)
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(
        id=uuid.uuid4(),
        tenant=tenant,
        prefix=key[:PREFIX_CHARS],
        key_hash=hash_key(key),
        admin=admin,
        label=label,
        created_at=utcnow(),
    )
    session.add(row)
    session.flush()
    return row, key


def looks_like_key(key: str) -> bool:
    return key.startswith(KEY_PREFIX) and len(key) <= 200


def authenticate(session: Session, key: str) -> Principal | None:
    """The principal a presented key stands for, or None (unknown or revoked)."""
    if not looks_like_key(key):
        return None
    digest = hash_key(key)
    row = session.scalars(select(ApiKey).where(ApiKey.key_hash == digest)).one_or_none()
    if row is None or row.revoked_at is not None or not hmac.compare_digest(row.key_hash, digest):
        return None
    return Principal(tenant=row.tenant, key_id=row.id, admin=row.admin)


def list_keys(session: Session, tenant: str | None = None) -> list[ApiKey]:
    stmt = select(ApiKey).order_by(ApiKey.tenant, ApiKey.created_at)
    if tenant is not None:
        stmt = stmt.where(ApiKey.tenant == tenant)
    return list(session.scalars(stmt))


def find_key(session: Session, id_or_prefix: str, tenant: str | None = None) -> ApiKey | None:
    """A key by its id or its listed prefix (unambiguous), optionally within one tenant."""
    stmt = select(ApiKey)
    try:
        stmt = stmt.where(ApiKey.id == uuid.UUID(id_or_prefix))
    except ValueError:
        stmt = stmt.where(ApiKey.prefix == id_or_prefix)
    if tenant is not None:
        stmt = stmt.where(ApiKey.tenant == tenant)
    rows = list(session.scalars(stmt.limit(2)))
    return rows[0] if len(rows) == 1 else None


def revoke_key(session: Session, key: ApiKey) -> None:
    session.execute(
        update(ApiKey).where(ApiKey.id == key.id, ApiKey.revoked_at.is_(None)).values(revoked_at=utcnow())
    )
    session.refresh(key)


def lock_tenant(session: Session, tenant: str) -> None:
    """Hold the tenant's row until the transaction ends, so a check of its usage and the insert
    it allows are not interleaved with another's (a no-op UPDATE: a row lock on PostgreSQL, the
    database's write lock on SQLite)."""
    session.execute(update(Tenant).where(Tenant.name == tenant).values(name=Tenant.name))


def webhook_secret(session: Session, tenant: str) -> str:
    return ensure_tenant(session, tenant).webhook_secret


def rotate_webhook_secret(session: Session, tenant: str) -> str:
    row = ensure_tenant(session, tenant)
    row.webhook_secret = new_webhook_secret()
    session.flush()
    return row.webhook_secret
