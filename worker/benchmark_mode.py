"""BENCHMARK ONLY (`TENSORQ_BENCHMARK_SKIP_FORWARD_PASS`, off by default): `embed` results without
the forward pass, so `bench.run` can measure what the service itself can carry in jobs/s.

Everything around the model still runs (claim, params validation, result objects, the final write
of a full-size result, events): each text gets the same fixed 384-float vector, rounded as real
results are, so the rows written and read weigh what real ones do."""

from __future__ import annotations

import logging
import random
from functools import lru_cache
from typing import Any

from pydantic import BaseModel

from tasks import minilm
from tasks.embed import JSON_DECIMALS, EmbedResult
from tasks.registry import JobKind

log = logging.getLogger(__name__)

DIM = 384


@lru_cache(maxsize=1)
def _vector() -> tuple[float, ...]:
    rng = random.Random(384)
    raw = [rng.gauss(0.0, 1.0) for _ in range(DIM)]
    norm = sum(x * x for x in raw) ** 0.5
    return tuple(round(x / norm, JSON_DECIMALS) for x in raw)


def skips(kind: JobKind[Any, Any]) -> bool:
    """Whether this kind's forward pass is skipped in benchmark mode (only `embed`'s is)."""
    return kind.name == "embed"


def embed_results(batch: list[Any]) -> list[BaseModel]:
    """What `tasks.embed.run_batch` returns, for the shipped model, without running it."""
    vector = list(_vector())
    return [
        EmbedResult(
            model=minilm.MODEL_NAME,
            dim=DIM,
            embeddings=[vector for _ in params.texts],
            tokens=4 * len(params.texts),
        )
        for params in batch
    ]
