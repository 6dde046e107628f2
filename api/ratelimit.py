"""Per-tenant admission in one Redis round trip: the active-job quota (the count kept by
tensorq.core.active_jobs) and the submission rate limit, a token bucket (GCRA) shared by every
API replica."""

from __future__ import annotations

import logging
import math
from typing import NamedTuple

import redis
import redis.asyncio as aioredis

from tensorq.core.active_jobs import active_key

log = logging.getLogger(__name__)

# KEYS[1]: the tenant's GCRA key, which holds the "theoretical arrival time" of the next token;
# KEYS[2]: its active-job count. A request of `cost` jobs is admitted when the count plus cost is
# within the quota and, after it, the bucket would not be more than `burst` jobs ahead of now; then
# both are updated. Redis's own clock is used, so API replicas with skewed clocks agree.
_ADMIT = """
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local quota = tonumber(ARGV[4])
local active = redis.call('GET', KEYS[2])
if not active then return {'seed', '0'} end
active = tonumber(active)
if active + cost > quota then return {'quota', tostring(active)} end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + cost * interval
local wait = new_tat - burst * interval - now
if wait > 0 then return {'rate', tostring(wait)} end
redis.call('SET', KEYS[1], tostring(new_tat), 'PX', math.ceil((new_tat - now) * 1000) + 1000)
redis.call('INCRBY', KEYS[2], cost)
return {'ok', '0'}
"""


class Verdict(NamedTuple):
    """`outcome`: "ok" (admitted and counted), "quota" (value: the active count), "rate" (value:
    seconds to wait), "seed" (no count for the tenant yet) or "unavailable" (Redis unreachable)."""

    outcome: str
    value: float = 0.0


class RateLimiter:
    def __init__(self, redis_url: str, *, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = burst
        # Asynchronous: admission is awaited on the event loop, with no thread hop.
        self.redis = aioredis.Redis.from_url(redis_url, socket_timeout=0.5, socket_connect_timeout=0.5)
        self.script = self.redis.register_script(_ADMIT)
        # Tenants admitted while Redis was unreachable: their counts missed those jobs, so they
        # are dropped (and read from the database again) once Redis answers.
        self._stale: set[str] = set()

    async def admit(self, tenant: str, cost: int, quota: int) -> Verdict:
        try:
            if self._stale:
                stale, self._stale = self._stale, set()
                await self.redis.delete(*(active_key(t) for t in stale))
            outcome, value = await self.script(
                keys=[f"tensorq:rate:{tenant}", active_key(tenant)],
                args=[1.0 / self.rate, self.burst, cost, quota],
            )
        except redis.RedisError as exc:
            log.warning("quota and rate limit not checked in Redis (unreachable): %s", exc)
            self._stale.add(tenant)
            return Verdict("unavailable")
        outcome = outcome.decode() if isinstance(outcome, bytes) else str(outcome)
        if outcome == "rate" and cost > self.burst:
            return Verdict("rate", math.inf)
        return Verdict(outcome, float(value))

    async def set_active(self, tenant: str, active: int, *, only_if_missing: bool) -> None:
        """The tenant's active count as the database has it: a missing count (`only_if_missing`:
        another API process may have seeded it meanwhile), or one that drifted high."""
        try:
            await self.redis.set(active_key(tenant), active, nx=only_if_missing)
        except redis.RedisError as exc:
            log.warning("active-job count not stored (Redis unreachable): %s", exc)

    async def close(self) -> None:
        await self.redis.aclose()
