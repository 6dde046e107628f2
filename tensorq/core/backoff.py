"""The one backoff: exponential with jitter, for worker retries, republishing and webhooks."""

from __future__ import annotations

import random


def backoff_delay(attempt: int, base: float = 0.25, cap: float = 15.0, floor: float = 0.0) -> float:
    """Jittered exponential backoff: uniform in [floor * d, d], d = min(cap, base * 2**attempt),
    attempt counted from 0. `floor` 0 is full jitter; a larger one keeps retries from bunching at 0."""
    delay = min(cap, base * 2**attempt)
    return random.uniform(floor * delay, delay)
