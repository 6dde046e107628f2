"""datasets: labelled

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-01 12:00:00

A dataset is labelled ({"text", "label"} rows, for classifiers) or text-only ({"text"} rows, for
pretrain-mlm). Every dataset stored before this was labelled (uploads required a label).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("datasets") as batch:
        batch.add_column(sa.Column("labelled", sa.Boolean(), nullable=False, server_default=sa.true()))


def downgrade() -> None:
    with op.batch_alter_table("datasets") as batch:
        batch.drop_column("labelled")
