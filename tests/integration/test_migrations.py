"""The schema comes from Alembic migrations only, and matches the models exactly."""

from __future__ import annotations

import json
import os
import uuid
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text

from db.models import Base
from migrations.run import upgrade
from tests.conftest import POSTGRES_ADMIN_URL

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


@pytest.mark.parametrize("dialect", ["postgresql", "sqlite"])
def test_jobs_queued_before_the_batch_cost_column_get_their_text_count(dialect: str, tmp_path: Path) -> None:
    """After an upgrade, jobs already queued fill batches by their texts like new ones (0006)."""
    if dialect == "postgresql":
        admin = POSTGRES_ADMIN_URL
        name = f"tensorq_mig_{os.urandom(4).hex()}"
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        url = f"{admin.rpartition('/')[0]}/{name}".replace("postgresql://", "postgresql+psycopg://")
    else:
        url = f"sqlite:///{tmp_path / 'old.db'}"
    try:
        upgrade(url, "0005")
        engine = create_engine(url)
        insert = text(
            "INSERT INTO jobs (id, tenant, kind, queue, status, params, attempts, max_attempts,"
            " cancel_requested, created_at, updated_at, webhook_attempts)"
            " VALUES (:id, 't', :kind, 'inference', :status, :params, 0, 3, false, :now, :now, 0)"
        )
        rows = {  # id: (kind, status, params, batch cost expected)
            uuid.uuid4(): ("embed", "queued", {"texts": ["a", "b", "c"]}, 3),
            uuid.uuid4(): ("embed", "succeeded", {"texts": ["a", "b"]}, 1),  # finished: never claimed again
            uuid.uuid4(): ("train-text-classifier", "queued", {"dataset_id": "d"}, 1),
        }
        with engine.begin() as conn:
            for job_id, (kind, status, params, _) in rows.items():
                conn.execute(insert, {
                    "id": job_id if dialect == "postgresql" else job_id.hex, "kind": kind, "status": status,
                    "params": json.dumps(params), "now": datetime.now(UTC),
                })  # fmt: skip
        engine.dispose()
        upgrade(url)
        engine = create_engine(url)
        with engine.connect() as conn:
            got = dict(conn.execute(text("SELECT id, batch_cost FROM jobs")).all())
        engine.dispose()
        as_key = (lambda i: i) if dialect == "postgresql" else (lambda i: i.hex)
        assert {job_id: got[as_key(job_id)] for job_id in rows} == {i: r[3] for i, r in rows.items()}
    finally:
        if dialect == "postgresql":
            with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
