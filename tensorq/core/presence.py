"""Which queues have a live worker: each worker's main process announces its queues in Redis every
few seconds (a sorted set per queue, scored by Redis's clock), and the API asks before accepting
a job that requires a device ("gpu", "cpu"), so a job no worker would ever take is refused at
submission instead of waiting forever. Jobs for device "any" go to the shared queues every worker
consumes and are not checked."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable

import redis

log = logging.getLogger(__name__)

ANNOUNCE_EVERY_SECONDS = 5.0
# A worker not heard from for this long no longer counts (its main process died or hangs).
ALIVE_SECONDS = 20.0

_ANNOUNCE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, now, ARGV[1])
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - tonumber(ARGV[2]))
  redis.call('EXPIRE', key, math.ceil(tonumber(ARGV[2]) * 2))
end
return 1
"""

_ALIVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
return redis.call('ZCOUNT', KEYS[1], now - tonumber(ARGV[1]), '+inf')
"""


def queue_key(queue: str) -> str:
    return f"tensorq:workers:{queue}"


class Announcer:
    """In a worker's main process: keeps announcing `node` on `queues` until stopped."""

    def __init__(self, redis_url: str, node: str, queues: Iterable[str]) -> None:
        self.node = node
        self.keys = [queue_key(q) for q in queues]
        self.redis = redis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2)
        self.script = self.redis.register_script(_ANNOUNCE)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tensorq-presence", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def announce(self) -> None:
        self.script(keys=self.keys, args=[self.node, ALIVE_SECONDS])

    def _run(self) -> None:
        failing = False
        while not self._stop.is_set():
            try:
                self.announce()
                failing = False
            except redis.RedisError as exc:
                if not failing:
                    log.warning("cannot announce this worker's queues in Redis: %s", exc)
                failing = True
            self._stop.wait(ANNOUNCE_EVERY_SECONDS)

    def stop(self) -> None:
        self._stop.set()
        try:
            for key in self.keys:
                self.redis.zrem(key, self.node)
        except redis.RedisError:
            pass
        self.redis.close()


class Presence:
    """In the API: whether a queue has a live worker, cached `cache_seconds` per queue. When Redis
    cannot say, the answer is yes (accepting jobs does not depend on the broker; the job waits)."""

    def __init__(self, redis_url: str, cache_seconds: float) -> None:
        self.cache_seconds = cache_seconds
        self.redis = redis.Redis.from_url(redis_url, socket_timeout=0.5, socket_connect_timeout=0.5)
        self.script = self.redis.register_script(_ALIVE)
        self._lock = threading.Lock()
        self._seen: dict[str, tuple[bool, float]] = {}

    def served(self, queue: str) -> bool:
        now = time.monotonic()
        with self._lock:
            cached = self._seen.get(queue)
        if cached is not None and now - cached[1] < self.cache_seconds:
            return cached[0]
        try:
            served = int(self.script(keys=[queue_key(queue)], args=[ALIVE_SECONDS])) > 0
        except redis.RedisError as exc:
            log.warning("cannot tell whether queue %s has a worker; accepting: %s", queue, exc)
            served = True
        with self._lock:
            self._seen[queue] = (served, now)
        return served

    def close(self) -> None:
        self.redis.close()
