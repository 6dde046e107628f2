"""openai_files, openai_batches, openai_batch_requests: the OpenAI-compatible Files and Batch API

Revision ID: 0008
Revises: 0006
Create Date: 2026-11-24 12:00:00

New tables only (api/openai); nothing existing changes.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0008"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _json() -> sa.types.TypeEngine:
    return sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")


def _ts(name: str, nullable: bool = True) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "openai_files",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("tenant", sa.String(length=63), nullable=False),
        sa.Column("purpose", sa.String(length=32), nullable=False),
        sa.Column("filename", sa.String(length=255), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("lines", sa.Integer(), nullable=False),
        sa.Column("path", sa.String(length=500), nullable=False),
        _ts("created_at", nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_openai_files_tenant_created", "openai_files", ["tenant", "created_at", "id"])
    op.create_table(
        "openai_batches",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("tenant", sa.String(length=63), nullable=False),
        sa.Column("endpoint", sa.String(length=64), nullable=False),
        sa.Column("completion_window", sa.String(length=16), nullable=False),
        sa.Column("input_file_id", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("batch_metadata", _json(), nullable=True),
        sa.Column("errors", _json(), nullable=True),
        sa.Column("total_lines", sa.Integer(), nullable=False),
        sa.Column("submitted_lines", sa.Integer(), nullable=False),
        sa.Column("submitted_bytes", sa.BigInteger(), nullable=False),
        sa.Column("completed_lines", sa.Integer(), nullable=False),
        sa.Column("failed_lines", sa.Integer(), nullable=False),
        sa.Column("output_file_id", sa.String(length=64), nullable=True),
        sa.Column("error_file_id", sa.String(length=64), nullable=True),
        _ts("created_at", nullable=False),
        _ts("expires_at", nullable=False),
        _ts("in_progress_at"),
        _ts("finalizing_at"),
        _ts("completed_at"),
        _ts("failed_at"),
        _ts("cancelling_at"),
        _ts("cancelled_at"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_openai_batches_tenant_created", "openai_batches", ["tenant", "created_at", "id"])
    op.create_index("ix_openai_batches_status", "openai_batches", ["status"])
    op.create_table(
        "openai_batch_requests",
        sa.Column("batch_id", sa.String(length=64), nullable=False),
        sa.Column("line", sa.Integer(), nullable=False),
        sa.Column("custom_id", sa.String(length=512), nullable=False),
        sa.Column("job_id", sa.Uuid(), nullable=True),
        sa.Column("options", _json(), nullable=False),
        sa.Column("error", _json(), nullable=True),
        sa.ForeignKeyConstraint(["batch_id"], ["openai_batches.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("batch_id", "line"),
    )


def downgrade() -> None:
    op.drop_table("openai_batch_requests")
    op.drop_index("ix_openai_batches_status", table_name="openai_batches")
    op.drop_index("ix_openai_batches_tenant_created", table_name="openai_batches")
    op.drop_table("openai_batches")
    op.drop_index("ix_openai_files_tenant_created", table_name="openai_files")
    op.drop_table("openai_files")
