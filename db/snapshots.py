"""A committed job row as JSON, and back: how a lone job's final state travels with the worker's
finished-job event, so the API can answer the request waiting on it without reading the row
again (that read was ~2 ms of a lone job's ~30; docs/performance.md).

The worker sends the row its finishing UPDATE returned, after the commit: the same values a read
would give. Nothing is ever written from a snapshot.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Callable, Mapping
from datetime import datetime
from functools import lru_cache
from typing import Any

from sqlalchemy import Engine

from db.keys import keyring_for
from db.models import Job, UTCDateTime
from db.sealing import open_row


@lru_cache(maxsize=1)
def _decoders() -> dict[str, Callable[[Any], Any]]:
    """Per column, how its JSON value becomes the Python value again (JSON types need nothing)."""
    decoders: dict[str, Callable[[Any], Any]] = {}
    for col in Job.__table__.columns:
        python_type = col.type.python_type  # `object` for a TypeDecorator such as UTCDateTime
        if isinstance(col.type, UTCDateTime):
            decoders[col.key] = datetime.fromisoformat
        elif python_type is uuid.UUID or issubclass(python_type, enum.Enum):
            decoders[col.key] = python_type
    return decoders


def job_snapshot(row: Mapping[str, Any]) -> dict[str, Any]:
    """Every column of a committed job row; datetimes, UUIDs and enums are left for the event's
    JSON encoder (orjson writes them as ISO 8601 and strings)."""
    return {col.key: row[col.key] for col in Job.__table__.columns}


def job_from_snapshot(snapshot: Mapping[str, Any], engine: Engine) -> Job:
    """A detached, read-only Job as the snapshot describes it, its sealed columns opened with the
    keys of `engine`'s database (the snapshot carries them sealed, as stored); KeyError if a
    column is missing."""
    decoders = _decoders()
    values = {}
    for col in Job.__table__.columns:
        value = snapshot[col.key]
        decode = decoders.get(col.key)
        values[col.key] = value if value is None or decode is None else decode(value)
    job = Job(**values)
    open_row(keyring_for(engine), Job, job)
    return job
