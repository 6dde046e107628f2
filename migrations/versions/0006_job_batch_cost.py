"""jobs.batch_cost: what a job adds to a batch (texts), so claims fill batches by cost

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-24 07:30:00

Claims used to take up to `batch_max_texts` jobs whatever their size; they now add queued jobs
while the sum of their costs stays within it. Jobs still queued or running at upgrade get the
length of their `texts` (the cost of every batching kind at this revision); others keep 1.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_BACKFILL = {
    "postgresql": "UPDATE jobs SET batch_cost = greatest(jsonb_array_length(params->'texts'), 1)"
    " WHERE status IN ('queued', 'running') AND jsonb_typeof(params->'texts') = 'array'",
    "sqlite": "UPDATE jobs SET batch_cost = max(json_array_length(params, '$.texts'), 1)"
    " WHERE status IN ('queued', 'running') AND json_type(params, '$.texts') = 'array'",
}


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("batch_cost", sa.Integer(), nullable=False, server_default="1"))
    backfill = _BACKFILL.get(op.get_bind().dialect.name)
    if backfill:
        op.execute(backfill)


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("batch_cost")
