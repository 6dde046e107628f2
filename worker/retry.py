"""Transient failures (database connection lost, broker hiccup) are retried with exponential
backoff and jitter; everything else propagates at once."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import redis
from sqlalchemy.exc import DBAPIError, OperationalError

from tensorq.core.backoff import backoff_delay

log = logging.getLogger(__name__)
T = TypeVar("T")


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, OperationalError):
        return True
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    if isinstance(exc, (redis.ConnectionError, redis.TimeoutError)):
        return True
    return type(exc).__name__ == "OutOfMemoryError" and type(exc).__module__.startswith("torch")


def with_retries(fn: Callable[[], T], *, what: str, attempts: int = 10) -> T:
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as exc:
            if not is_transient(exc) or attempt == attempts - 1:
                raise
            delay = backoff_delay(attempt)
            log.warning(
                "%s: transient %s (%s); retry %d in %.2fs", what, type(exc).__name__, exc, attempt + 1, delay
            )
            time.sleep(delay)
    raise AssertionError("unreachable")


@contextlib.contextmanager
def skip_if_transient(what: str, job_id: object) -> Iterator[None]:
    """For advisory writes and reads inside a job (progress, cancel checks): a transient error is
    logged and the step skipped, so a database blip does not cost the job its attempt and the work
    since its last checkpoint; the lease has slack for it. Anything else propagates."""
    try:
        yield
    except Exception as exc:
        if not is_transient(exc):
            raise
        log.warning(
            "job %s: %s skipped (transient %s: %s)",
            job_id,
            what,
            type(exc).__name__,
            exc,
            extra={"job_id": str(job_id)},
        )
