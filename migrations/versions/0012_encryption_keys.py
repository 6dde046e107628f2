"""encryption at rest: tenant_keys, key_check

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-01 13:00:00

Data keys per tenant, wrapped by the master key, and the check that recognises the master key.
This migration needs no key and rewrites no data: a database that already holds jobs, datasets,
models or files is marked `legacy_plaintext`, so what was stored before stays readable until
`tensorq encrypt-existing` has sealed it (docs/security.md, "Upgrading").
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC as TZ_UTC
from datetime import datetime

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UTC = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "tenant_keys",
        sa.Column("tenant", sa.String(63), primary_key=True),
        sa.Column("version", sa.Integer(), primary_key=True),
        sa.Column("wrapped", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", UTC, nullable=False),
    )
    check = op.create_table(
        "key_check",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("master_fingerprint", sa.String(64), nullable=True),
        sa.Column("legacy_plaintext", sa.Boolean(), nullable=False),
        sa.Column("updated_at", UTC, nullable=False),
    )
    bind = op.get_bind()
    existing = any(
        bind.execute(sa.text(f"SELECT 1 FROM {table} LIMIT 1")).first() is not None
        for table in ("jobs", "datasets", "model_versions", "openai_files")
    )
    op.bulk_insert(
        check,
        [
            {
                "id": 1,
                "master_fingerprint": None,
                "legacy_plaintext": existing,
                "updated_at": datetime.now(TZ_UTC),
            }
        ],
    )


def downgrade() -> None:
    op.drop_table("key_check")
    op.drop_table("tenant_keys")
