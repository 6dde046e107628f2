"""Small data sets shipped with tensorq, for examples, tests and benchmarks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def sample_dataset_path() -> Path:
    """240 short product and film reviews, labelled "positive" or "negative" (see make_sentiment.py)."""
    return Path(__file__).with_name("sentiment.jsonl")


def load_jsonl(path: Path | str) -> list[dict[str, Any]]:
    """One JSON object per non-blank line."""
    with Path(path).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
