"""The schema comes from Alembic migrations only, and matches the models exactly."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text

from db.models import Base

pytestmark = pytest.mark.integration


def test_migrated_postgres_schema_matches_models(pg_url: str) -> None:
    engine = create_engine(pg_url.replace("postgresql://", "postgresql+psycopg://"))
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": True})
        diff = compare_metadata(ctx, Base.metadata)
        columns = {c["name"]: c for c in inspect(conn).get_columns("jobs")}
    engine.dispose()
    assert diff == []
    assert str(columns["params"]["type"]) == "JSONB"
    assert columns["created_at"]["type"].timezone is True


def test_job_results_are_compressed_with_lz4_on_postgres(pg_url: str) -> None:
    """Cheaper to write than pglz for large results (see migration 0005)."""
    engine = create_engine(pg_url.replace("postgresql://", "postgresql+psycopg://"))
    with engine.connect() as conn:
        method = conn.execute(
            text(
                "SELECT attcompression FROM pg_attribute WHERE attrelid = 'jobs'::regclass AND attname = 'result'"
            )
        ).scalar()
    engine.dispose()
    assert method == "l"
