"""Models loaded once per worker process and reused, bounded by a memory budget (LRU)."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

log = logging.getLogger(__name__)
T = TypeVar("T")


def size_of(obj: Any) -> int:
    """Bytes held by a model: its own `nbytes()` if it has one, else a torch module's tensors."""
    nbytes = getattr(obj, "nbytes", None)
    if callable(nbytes):
        return int(nbytes())
    state_dict = getattr(obj, "state_dict", None)
    if callable(state_dict):
        return sum(t.numel() * t.element_size() for t in state_dict().values())
    return 0


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0


class ModelCache:
    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self.stats = CacheStats()
        self._entries: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def used_bytes(self) -> int:
        return sum(size for _, size in self._entries.values())

    def keys(self) -> list[str]:
        return list(self._entries)

    def get(self, key: str, load: Callable[[], T]) -> T:
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                self.stats.hits += 1
                return cast(T, self._entries[key][0])
            self.stats.misses += 1
            obj = load()
            size = size_of(obj)
            self._entries[key] = (obj, size)
            self._evict(keep=key)
            log.info("loaded model %s (%.1f MB)", key, size / 1e6)
            return obj

    def _evict(self, keep: str) -> None:
        # The model just loaded stays even if it alone exceeds the budget: the job needs it.
        while self.used_bytes > self.budget_bytes and len(self._entries) > 1:
            key = next(iter(self._entries))
            if key == keep:
                break
            del self._entries[key]
            self.stats.evictions += 1
            log.info("evicted model %s", key)
