"""Picking rows for a claim: `UPDATE ... WHERE id IN (SELECT ... LIMIT n FOR UPDATE SKIP LOCKED)`."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Select, select


def pick_for_update(dialect: str, ids: Select[*tuple[Any, ...]], name: str) -> Select[*tuple[Any, ...]]:
    """`ids` (with its LIMIT) as rows an UPDATE can claim from, locked and skipped when another
    transaction holds them.

    On PostgreSQL it is a MATERIALIZED CTE, so it runs once. As a plain `IN (subquery)` the planner
    may rescan it for every candidate row (a nested-loop semi-join, typical on a table without
    statistics), and each rescan skips the rows the UPDATE has already changed and locks the next
    ones: a claim of 11 jobs took all 483 queued. SQLite has one writer and no row locks."""
    if dialect != "postgresql":
        return ids
    locked = ids.with_for_update(skip_locked=True).cte(name).prefix_with("MATERIALIZED")
    return select(*locked.c)
