"""The batching rule: which jobs may share a forward pass. One place, used by the API when it
groups a submission's messages and by the worker's claim when it fills a batch.

Jobs share a pass only when they are of the same kind and model, assigned the same model version
(a `name@alias` reference whose split gives jobs different versions names several models), on the same queue (a job that
requires a GPU must not ride in a CPU worker's batch) and, for kinds that read tenant data, of the
same tenant (a model name means another model in another tenant's registry).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement

from db.models import Job

# The columns that must match; `tenant` only for kinds that read tenant data.
KEY_COLUMNS = ("kind", "queue", "model", "model_version", "tenant")


@dataclass(frozen=True)
class BatchKey:
    kind: str
    queue: str
    model: str | None
    tenant: str | None  # None: any tenant (the kind reads no tenant data)
    model_version: int | None = None  # assigned at submission (db.rollouts.assign); None: at run time


def key_of(job: Job, reads_tenant_data: bool) -> BatchKey:
    return BatchKey(
        job.kind, job.queue, job.model, job.tenant if reads_tenant_data else None, job.model_version
    )


def same_batch(value_of: Callable[[str], Any], same_tenant: bool) -> list[ColumnElement[bool]]:
    """SQL conditions that a job matches the key whose column values `value_of(name)` gives
    (bound parameters, or subqueries of another job's row)."""
    conditions = []
    for name in KEY_COLUMNS:
        if name == "tenant" and not same_tenant:
            continue
        column = Job.__table__.c[name]
        value = value_of(name)
        # `=` where the column cannot be NULL: PostgreSQL uses an index for it, not for IS NOT DISTINCT FROM.
        conditions.append(column.is_not_distinct_from(value) if column.nullable else column == value)
    return conditions
