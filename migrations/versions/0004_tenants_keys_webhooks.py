"""tenants, API keys, tenant columns, job webhooks

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23 22:10:00

Rows that exist before this revision belong to the tenant "default".
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _add_tenant_column(table: str) -> None:
    # Filled with "default" for existing rows, then without a server default like the model says.
    with op.batch_alter_table(table) as batch:
        batch.add_column(sa.Column("tenant", sa.String(length=63), nullable=False, server_default="default"))
    with op.batch_alter_table(table) as batch:
        batch.alter_column("tenant", server_default=None)


def upgrade() -> None:
    op.create_table(
        "tenants",
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("webhook_secret", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("tenant", sa.String(length=63), nullable=False),
        sa.Column("prefix", sa.String(length=16), nullable=False),
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        sa.Column("admin", sa.Boolean(), nullable=False),
        sa.Column("label", sa.String(length=200), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["tenant"], ["tenants.name"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("key_hash"),
    )

    _add_tenant_column("jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("webhook_url", sa.String(length=2083), nullable=True))
        batch.add_column(
            sa.Column(
                "webhook_state",
                sa.Enum("pending", "delivered", "failed", name="webhookstate", native_enum=False, length=16),
                nullable=True,
            )
        )
        batch.add_column(sa.Column("webhook_attempts", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("webhook_next_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("webhook_error", sa.Text(), nullable=True))
    with op.batch_alter_table("jobs") as batch:
        batch.alter_column("webhook_attempts", server_default=None)
        batch.create_index("ix_jobs_tenant_created", ["tenant", "created_at", "id"], unique=False)
        batch.create_index(
            "ix_jobs_tenant_status_created", ["tenant", "status", "created_at", "id"], unique=False
        )
        batch.create_index("ix_jobs_webhook_due", ["webhook_state", "webhook_next_at"], unique=False)

    _add_tenant_column("datasets")
    with op.batch_alter_table("datasets") as batch:
        batch.create_index("ix_datasets_tenant", ["tenant"], unique=False)

    # Model names become unique per tenant instead of globally.
    if op.get_bind().dialect.name == "sqlite":
        # SQLite's unique constraint from 0002 has no name to drop: rebuild the table from this shape.
        models = sa.Table(
            "models",
            sa.MetaData(),
            sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
            sa.Column("name", sa.String(length=63), nullable=False),
            sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        )
        with op.batch_alter_table("models", copy_from=models, recreate="always"):
            pass
    else:
        op.drop_constraint("models_name_key", "models", type_="unique")
    _add_tenant_column("models")
    with op.batch_alter_table("models") as batch:
        batch.create_unique_constraint("uq_models_tenant_name", ["tenant", "name"])


def downgrade() -> None:
    with op.batch_alter_table("models") as batch:
        batch.drop_constraint("uq_models_tenant_name", type_="unique")
        batch.drop_column("tenant")
        batch.create_unique_constraint("models_name_key", ["name"])
    with op.batch_alter_table("datasets") as batch:
        batch.drop_index("ix_datasets_tenant")
        batch.drop_column("tenant")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_index("ix_jobs_webhook_due")
        batch.drop_index("ix_jobs_tenant_status_created")
        batch.drop_index("ix_jobs_tenant_created")
        for column in (
            "webhook_error",
            "webhook_next_at",
            "webhook_attempts",
            "webhook_state",
            "webhook_url",
        ):
            batch.drop_column(column)
        batch.drop_column("tenant")
    op.drop_table("api_keys")
    op.drop_table("tenants")
