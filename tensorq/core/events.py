"""Job change notifications over Redis pub/sub, so waiting clients need no polling loop.

Workers publish the ids of jobs whose state changed (one message per claim or finish, batches
included); each API process keeps one subscription and wakes the requests waiting on those ids.
A lost notification costs only latency: waiters re-read the database when their time is up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import orjson
import redis
import redis.asyncio as aioredis
from redis.client import Pipeline

log = logging.getLogger(__name__)


def channel(redis_url: str) -> str:
    """The job-events channel of the deployment using `redis_url`. Pub/sub ignores the database
    number, so it is part of the name: deployments (or test sessions) that share a Redis server on
    different databases must not hear each other's jobs, whose rows ride along."""
    db = redis.connection.parse_url(redis_url).get("db") or 0
    return f"tensorq:{db}:job-events"


# Rows ride along only in small events: every API process and worker parses every event.
MAX_EVENT_BYTES_WITH_ROWS = 64 * 1024


class EventPublisher:
    """Used by workers; never raises (a notification is an optimisation, not a guarantee)."""

    def __init__(self, redis_url: str) -> None:
        self.client = redis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2)
        self.channel = channel(redis_url)

    def changed(
        self,
        job_ids: Iterable[uuid.UUID],
        finished: list[dict[str, Any]] | None = None,
        running: bool = False,
        final: bool = False,
        rows: Iterable[dict[str, Any]] = (),
        along: Callable[[Pipeline], None] | None = None,
    ) -> None:
        """`finished` carries {kind, status, queue_s, run_s} per finished job, for the API's metrics;
        `running` says the jobs are running (claimed, or progress): no news for a wait on the end;
        `final` says every one of them is in a final state, committed (see worker/finished.py);
        `rows` are committed rows of some of them (db.snapshots), handed to their waiters;
        `along` queues commands that go in the same round trip, before the event (the active-job
        counts a final state takes off, so a client answered by the event sees them taken)."""
        ids = [str(i) for i in job_ids]
        if not ids:
            return
        message = {
            "ids": ids,
            "finished": finished or [],
            "running": running,
            "final": final,
            "rows": {str(row["id"]): row for row in rows},
        }
        payload = orjson.dumps(message)
        if len(payload) > MAX_EVENT_BYTES_WITH_ROWS and message["rows"]:
            message["rows"] = {}  # their waiters read the rows from the database instead
            payload = orjson.dumps(message)
        try:
            if along is None:
                self.client.publish(self.channel, payload)
                return
            pipe = self.client.pipeline(transaction=False)
            along(pipe)
            pipe.publish(self.channel, payload)
            pipe.execute()
        except redis.RedisError as exc:
            log.debug("job event not published: %s", exc)


class JobWatch:
    """Set when a job changes; `row` is its committed row when the event carried one."""

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self.row: dict[str, Any] | None = None

    def set(self, row: dict[str, Any] | None = None) -> None:
        self.row = row
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    async def wait(self) -> None:
        await self._event.wait()

    def clear(self) -> None:
        self._event.clear()
        self.row = None


class EventListener:
    """One subscription per API process, fanned out to per-job waiters."""

    def __init__(self, redis_url: str, on_finished: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.redis_url = redis_url
        self.on_finished = on_finished
        self._waiters: dict[str, set[JobWatch]] = defaultdict(set)
        # Waiters for the end only: not woken by `running` events, which would cost a database read.
        self._end_waiters: dict[str, set[JobWatch]] = defaultdict(set)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._listen())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    @contextlib.contextmanager
    def watch(self, job_id: uuid.UUID, end_only: bool = False) -> Iterator[JobWatch]:
        """A watch set when the job changes; with `end_only`, not while it is still running."""
        event = JobWatch()
        key = str(job_id)
        waiters = self._end_waiters if end_only else self._waiters
        waiters[key].add(event)
        try:
            yield event
        finally:
            waiters[key].discard(event)
            if not waiters[key]:
                del waiters[key]

    async def _listen(self) -> None:
        while True:
            client = aioredis.Redis.from_url(self.redis_url)
            try:
                async with client.pubsub() as pubsub:
                    await pubsub.subscribe(channel(self.redis_url))
                    async for message in pubsub.listen():
                        if message.get("type") == "message":
                            self._dispatch(message["data"])
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Redis away: waiters fall back to their timeout; try again shortly.
                log.debug("job event subscription lost: %s", exc)
                await asyncio.sleep(1)
            finally:
                with contextlib.suppress(Exception):
                    await client.aclose()

    def _dispatch(self, data: bytes) -> None:
        try:
            message = orjson.loads(data)
            ids, finished = message["ids"], message.get("finished", [])
            running = bool(message.get("running", False))
            rows = message.get("rows") or {}
        except (ValueError, KeyError, TypeError, AttributeError):
            return
        for job_id in ids:
            row = rows.get(job_id)
            for event in self._waiters.get(job_id, ()):
                event.set(row)
            if not running:
                for event in self._end_waiters.get(job_id, ()):
                    event.set(row)
        if self.on_finished is not None:
            for info in finished:
                self.on_finished(info)
