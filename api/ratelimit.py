"""Per-tenant submission rate limit: a token bucket in Redis (GCRA), shared by every API replica."""

from __future__ import annotations

import logging
import math

import redis

log = logging.getLogger(__name__)

# GCRA: the key holds the "theoretical arrival time" of the next token. A request of `cost` jobs
# is allowed when, after it, the bucket would not be more than `burst` jobs ahead of now.
# Redis's own clock is used, so API replicas with skewed clocks agree.
_GCRA = """
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + cost * interval
local wait = new_tat - burst * interval - now
if wait > 0 then return tostring(wait) end
redis.call('SET', KEYS[1], tostring(new_tat), 'PX', math.ceil((new_tat - now) * 1000) + 1000)
return '0'
"""


class RateLimiter:
    def __init__(self, redis_url: str, *, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = burst
        self.redis = redis.Redis.from_url(redis_url, socket_timeout=0.5, socket_connect_timeout=0.5)
        self.script = self.redis.register_script(_GCRA)

    def acquire(self, tenant: str, cost: int = 1) -> float:
        """0 when `cost` jobs may be submitted now (and takes them), else the seconds to wait.

        With Redis unreachable the request is allowed: the database, not Redis, must accept jobs,
        and the per-tenant active-job quota still holds."""
        if cost > self.burst:
            return math.inf
        try:
            wait = float(
                self.script(keys=[f"tensorq:rate:{tenant}"], args=[1.0 / self.rate, self.burst, cost])
            )
        except redis.RedisError as exc:
            log.warning("rate limit not applied (Redis unreachable): %s", exc)
            return 0.0
        return wait

    def close(self) -> None:
        self.redis.close()
