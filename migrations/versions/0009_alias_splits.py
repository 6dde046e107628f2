"""gradual rollouts: alias splits, shadows and guards; alias history; shadow runs; jobs' versions

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-25 09:00:00

An alias may now split its jobs between versions by percentage, run a share of them on a shadow
version too, and roll itself back when a candidate fails too often (db/rollouts.py). A job that
names a model through an alias is assigned one version at submission (`jobs.model_version`, part
of the batching key). Existing aliases keep pointing at their one version (split NULL).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _json() -> sa.types.TypeEngine[Any]:
    return sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("model_version", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("shadow_version", sa.Integer(), nullable=True))
    op.create_index(
        "ix_jobs_tenant_model_version_created", "jobs", ["tenant", "model", "model_version", "created_at"]
    )
    with op.batch_alter_table("model_aliases") as batch:
        batch.add_column(sa.Column("split", _json(), nullable=True))
        batch.add_column(sa.Column("shadow", _json(), nullable=True))
        batch.add_column(sa.Column("guard", _json(), nullable=True))
        batch.add_column(sa.Column("revision", sa.Integer(), nullable=False, server_default="1"))
    op.create_table(
        "model_alias_history",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("alias", sa.String(length=63), nullable=False),
        sa.Column("action", sa.String(length=16), nullable=False),
        sa.Column("from_assignment", _json(), nullable=True),
        sa.Column("to_assignment", _json(), nullable=False),
        sa.Column("key_id", sa.Uuid(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_model_alias_history_alias", "model_alias_history", ["model_id", "alias", "id"])
    op.create_table(
        "shadow_runs",
        sa.Column("job_id", sa.Uuid(), nullable=False),
        sa.Column("tenant", sa.String(length=63), nullable=False),
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("primary_version", sa.Integer(), nullable=True),
        sa.Column("ok", sa.Boolean(), nullable=False),
        sa.Column("agreement", sa.Float(), nullable=True),
        sa.Column("output", _json(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("run_ms", sa.Float(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("job_id"),
    )
    op.create_index("ix_shadow_runs_tenant_model_created", "shadow_runs", ["tenant", "model", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_shadow_runs_tenant_model_created", table_name="shadow_runs")
    op.drop_table("shadow_runs")
    op.drop_index("ix_model_alias_history_alias", table_name="model_alias_history")
    op.drop_table("model_alias_history")
    with op.batch_alter_table("model_aliases") as batch:
        batch.drop_column("revision")
        batch.drop_column("guard")
        batch.drop_column("shadow")
        batch.drop_column("split")
    op.drop_index("ix_jobs_tenant_model_version_created", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("shadow_version")
        batch.drop_column("model_version")
