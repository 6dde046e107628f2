"""API-key revocations over Redis pub/sub: each API process caches the keys it has looked up
(api/keycache.py) and drops one as soon as a revocation naming it arrives here."""

from __future__ import annotations

import logging
import uuid

import redis

log = logging.getLogger(__name__)


def channel(redis_url: str) -> str:
    """As the job-events channel: pub/sub ignores the database number, so it is in the name."""
    db = redis.connection.parse_url(redis_url).get("db") or 0
    return f"tensorq:{db}:key-revocations"


def publish_revocation(client: redis.Redis, redis_url: str, key_id: uuid.UUID) -> bool:
    """Tell every API process that `key_id` was revoked (after the revocation is committed).
    False when Redis could not be reached: API processes whose subscription is down do not use
    their caches, and the others keep the key for at most TENSORQ_API_KEY_CACHE_SECONDS."""
    try:
        client.publish(channel(redis_url), str(key_id))
        return True
    except redis.RedisError as exc:
        log.warning("key revocation not published (Redis unreachable): %s", exc)
        return False
