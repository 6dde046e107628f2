"""model versions: task, parent and lineage; model_evaluations

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-01 10:20:00

A version is a text classifier, a masked-LM encoder or an embedder, made from a parent version
(fine-tuned, pretrained further, optimised) by a recorded method; `evaluate` jobs keep their
figures on the version. Existing versions are text classifiers without a registered parent.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON(none_as_null=True).with_variant(postgresql.JSONB(none_as_null=True), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("model_versions") as batch:
        batch.add_column(sa.Column("task", sa.String(32), nullable=False, server_default="text-classifier"))
        batch.add_column(sa.Column("parent_name", sa.String(63), nullable=True))
        batch.add_column(sa.Column("parent_version", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("lineage", JSON, nullable=True))
    op.create_table(
        "model_evaluations",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column(
            "model_version_id",
            sa.Integer(),
            sa.ForeignKey("model_versions.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("dataset_id", sa.String(128), nullable=False),
        sa.Column("split", sa.String(16), nullable=False),
        sa.Column("metrics", JSON, nullable=False),
        sa.Column("device", sa.String(32), nullable=False),
        sa.Column("job_id", sa.Uuid(), sa.ForeignKey("jobs.id", ondelete="SET NULL"), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_model_evaluations_version", "model_evaluations", ["model_version_id", "id"])


def downgrade() -> None:
    op.drop_index("ix_model_evaluations_version", "model_evaluations")
    op.drop_table("model_evaluations")
    with op.batch_alter_table("model_versions") as batch:
        batch.drop_column("lineage")
        batch.drop_column("parent_version")
        batch.drop_column("parent_name")
        batch.drop_column("task")
