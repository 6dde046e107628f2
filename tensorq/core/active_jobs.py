"""Each tenant's active (queued or running) job count in Redis, for the quota check that the API
makes in the same round trip as the rate limit (api/ratelimit.py).

The API's admission script adds the jobs it admits; whoever moves jobs to a final state through
db/jobs.py's conditional UPDATEs takes them off after the commit (the worker's final write, the
reaper, cancellations), and only for the rows that UPDATE changed, so each job is taken off once.
A count that is missing (a new tenant, Redis restarted without its data, dropped after Redis was
unreachable) is read from the database again; a refusal is checked against the database before it
is answered, so a count that drifted high (an API process that died between admitting and
committing, a decrement lost while Redis was down) costs one COUNT and is corrected, never a
wrong 429. Adjustments never create a missing count, and a count that would go negative is
dropped (read again next time)."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Mapping

import redis
from redis.client import Pipeline

log = logging.getLogger(__name__)


def active_key(tenant: str) -> str:
    return f"tensorq:active:{tenant}"


_ADJUST = """
for i, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 1 then
    if redis.call('INCRBY', key, ARGV[i]) < 0 then redis.call('DEL', key) end
  end
end
return 0
"""


class ActiveJobCounter:
    """Used by workers and the API after their commits; never raises."""

    def __init__(self, redis_url: str) -> None:
        self.client = redis.Redis.from_url(redis_url, socket_timeout=1, socket_connect_timeout=1)
        self.script = self.client.register_script(_ADJUST)

    def adjust(self, deltas: Mapping[str, int], pipe: Pipeline | None = None) -> None:
        """With `pipe`, the adjustment is queued on it (sent with whatever else it carries; the
        caller handles its errors)."""
        changes = [(tenant, n) for tenant, n in deltas.items() if n]
        if not changes:
            return
        keys, args = [active_key(t) for t, _ in changes], [n for _, n in changes]
        if pipe is not None:
            # EVAL, not the registered script: a pipeline with scripts first asks SCRIPT EXISTS,
            # a round trip of its own, on every execute.
            pipe.eval(_ADJUST, len(keys), *keys, *args)
            return
        try:
            self.script(keys=keys, args=args)
        except redis.RedisError as exc:
            log.debug("active-job counts not adjusted: %s", exc)

    def finished(self, tenants: Iterable[str], pipe: Pipeline | None = None) -> None:
        """One tenant name per job that left the active set (a committed final state)."""
        self.adjust({tenant: -n for tenant, n in Counter(tenants).items()}, pipe)

    def added(self, tenant: str, n: int) -> None:
        """Jobs stored without the API's admission script (OpenAI batch lines)."""
        self.adjust({tenant: n})

    def close(self) -> None:
        self.client.close()
