"""Alembic migrations; the schema is created by these only."""
