"""Text datasets: JSONL validation shared by uploads, inline training data and the worker.

A dataset is labelled ({"text", "label"} on every line: for classifiers) or text-only ({"text"} on
every line: for pretrain-mlm). A mix is refused at the first line that breaks the first line's
pattern: a forgotten label would otherwise make a classifier dataset silently smaller."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from tasks.classifier import MAX_LABELS
from tasks.texts import unstorable

MAX_TEXT_CHARS = 8192
MAX_LABEL_CHARS = 100


class DatasetError(ValueError):
    def __init__(self, line: int, message: str) -> None:
        super().__init__(f"line {line}: {message}")
        self.line = line
        self.message = message


@dataclass(frozen=True)
class ParsedDataset:
    rows: list[dict[str, str]]
    labels: list[str]  # [] for a text-only dataset
    labelled: bool
    sha256: str
    size_bytes: int


def check_row(obj: Any, line: int) -> dict[str, str]:
    if not isinstance(obj, dict):
        raise DatasetError(line, 'expected a JSON object {"text": ...} or {"text": ..., "label": ...}')
    extra = set(obj) - {"text", "label"}
    if extra:
        raise DatasetError(line, f"unknown field(s): {', '.join(sorted(extra))}")
    text, label = obj.get("text"), obj.get("label")
    if not isinstance(text, str) or not text.strip():
        raise DatasetError(line, "'text' must be a non-empty string")
    if len(text) > MAX_TEXT_CHARS:
        raise DatasetError(line, f"'text' is longer than {MAX_TEXT_CHARS} characters")
    if "label" not in obj:
        if (reason := unstorable(text)) is not None:
            raise DatasetError(line, f"'text' {reason}")
        return {"text": text}
    if not isinstance(label, str) or not label.strip():
        raise DatasetError(line, "'label' must be a non-empty string")
    if len(label) > MAX_LABEL_CHARS:
        raise DatasetError(line, f"'label' is longer than {MAX_LABEL_CHARS} characters")
    # Labels go into a JSONB column. Texts only go into the file, but a training job's rows must
    # pass the kind's Text as well, so such a text would only fail later, as a failed job.
    for field, value in (("text", text), ("label", label)):
        if (reason := unstorable(value)) is not None:
            raise DatasetError(line, f"'{field}' {reason}")
    return {"text": text, "label": label}


def parse_jsonl(data: bytes, *, max_rows: int) -> ParsedDataset:
    """Validate every line; raise DatasetError naming the first bad one (1-based)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DatasetError(line, "not valid UTF-8") from None
    rows: list[dict[str, str]] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        if len(rows) >= max_rows:
            raise DatasetError(number, f"more than {max_rows} rows")
        try:
            obj = json.loads(raw, parse_constant=_reject_constant)
        except ValueError as exc:
            raise DatasetError(number, f"not valid JSON ({exc})") from None
        except RecursionError:  # e.g. [[[[...]]]] thousands deep: Python's parser gives up
            raise DatasetError(number, "not valid JSON (nested too deeply)") from None
        row = check_row(obj, number)
        if rows and ("label" in row) != ("label" in rows[0]):
            first = "has a label" if "label" in rows[0] else "has none"
            raise DatasetError(
                number, f"mixes labelled and unlabelled rows (the first row {first}; all or none)"
            )
        rows.append(row)
    if not rows:
        raise DatasetError(1, "no rows")
    labelled = "label" in rows[0]
    labels = sorted({row["label"] for row in rows}) if labelled else []
    if labelled and (problem := label_problem(labels)):
        raise DatasetError(1, problem)
    return ParsedDataset(
        rows=rows,
        labels=labels,
        labelled=labelled,
        sha256=hashlib.sha256(data).hexdigest(),
        size_bytes=len(data),
    )


def label_problem(labels: list[str]) -> str | None:
    """Why training a classifier on these distinct labels would fail, known at upload (the
    training job checks the same limits); None when it would not. Only for labelled rows."""
    if len(labels) < 2:
        return "a classification dataset needs at least 2 distinct labels"
    if len(labels) > MAX_LABELS:
        return f"{len(labels)} distinct labels; a classifier takes at most {MAX_LABELS}"
    return None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")
