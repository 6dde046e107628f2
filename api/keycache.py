"""Each API process's cache of the API keys it has looked up, so a request with a known key costs
no database round trip (nor a thread hop).

Revocation reaches every process through Redis pub/sub (tensorq.core.revocations): the revoking
process drops the key at once, before it answers, and the others when the message arrives
(milliseconds; tested under 100 ms). The cache is only used while this process's subscription is
up: it starts empty on every (re)subscription, and while Redis is away every request reads the
database as before. A lookup that raced a revocation (read before the revocation committed,
finished after its message came) is not cached: every revocation heard bumps `generation`, and an
entry is stored only if none came since its lookup began. Entries also expire after
TENSORQ_API_KEY_CACHE_SECONDS, which bounds the one case pub/sub cannot cover: a revocation whose
publish failed while this process's subscription stayed up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid

import redis
import redis.asyncio as aioredis

from db.tenants import Principal
from tensorq.core.revocations import channel, publish_revocation

log = logging.getLogger(__name__)


class KeyCache:
    def __init__(self, redis_url: str, ttl_seconds: float) -> None:
        self.redis_url = redis_url
        self.ttl = ttl_seconds
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[Principal, float]] = {}  # key digest -> (principal, expires)
        self._live = False
        self.generation = 0
        self._task: asyncio.Task[None] | None = None
        self._publisher = redis.Redis.from_url(redis_url, socket_timeout=1, socket_connect_timeout=1)

    def start(self) -> None:
        if self.ttl > 0:
            self._task = asyncio.get_running_loop().create_task(self._listen())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._publisher.close()

    def get(self, digest: str) -> Principal | None:
        """The cached principal of a key (by its SHA-256), or None: then look it up."""
        with self._lock:
            if not self._live:
                return None
            entry = self._entries.get(digest)
            if entry is None:
                return None
            if entry[1] < time.monotonic():
                del self._entries[digest]
                return None
            return entry[0]

    def put(self, digest: str, principal: Principal, generation: int) -> None:
        """Cache a lookup that began when `self.generation` was `generation`."""
        with self._lock:
            if self._live and generation == self.generation:
                self._entries[digest] = (principal, time.monotonic() + self.ttl)

    def revoked(self, key_id: uuid.UUID) -> None:
        """A revocation committed by this process: dropped here now, then told to the others."""
        self._drop(str(key_id))
        publish_revocation(self._publisher, self.redis_url, key_id)

    def _drop(self, key_id: str) -> None:
        with self._lock:
            self.generation += 1
            for digest in [d for d, (p, _) in self._entries.items() if str(p.key_id) == key_id]:
                del self._entries[digest]

    def _set_live(self, live: bool) -> None:
        with self._lock:
            self._live = live
            self.generation += 1
            self._entries.clear()

    async def _listen(self) -> None:
        while True:
            client = aioredis.Redis.from_url(self.redis_url, socket_connect_timeout=1)
            try:
                async with client.pubsub() as pubsub:
                    await pubsub.subscribe(channel(self.redis_url))
                    async for message in pubsub.listen():
                        kind = message.get("type")
                        if kind == "subscribe":
                            self._set_live(True)
                        elif kind == "message":
                            data = message["data"]
                            self._drop(data.decode() if isinstance(data, bytes) else str(data))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("key revocation subscription lost: %s", exc)
            finally:
                self._set_live(False)
                with contextlib.suppress(Exception):
                    await client.aclose()
            await asyncio.sleep(0.5)
