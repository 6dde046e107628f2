"""The `texts` input shared by the text kinds (embed, classify): limits in one place.

`Storable` is the check every free text the API takes goes through (texts, labels): a value that
passes it can be written to PostgreSQL's text and JSONB columns and encoded as UTF-8.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import BeforeValidator, Field, StringConstraints

MAX_TEXTS = 256
MAX_TEXT_CHARS = 8192

# A lone UTF-16 surrogate arrives as a JSON escape ("\ud800"); UTF-8 cannot encode it.
SURROGATE = re.compile("[\ud800-\udfff]")


def unstorable(value: str) -> str | None:
    """Why PostgreSQL could not store `value`, or None when it can."""
    if "\x00" in value:
        return "must not contain the NUL character (\\u0000)"
    if SURROGATE.search(value) is not None:
        return "must not contain a lone UTF-16 surrogate (\\ud800 to \\udfff)"
    return None


def _check_storable(value: object) -> object:
    if isinstance(value, str) and (reason := unstorable(value)) is not None:
        raise ValueError(reason)
    return value


# Runs before the str schema, so a surrogate gets this message rather than pydantic's
# "unable to parse raw data", and so SQLite (which would store NUL) refuses what PostgreSQL refuses.
Storable = BeforeValidator(_check_storable)

Text = Annotated[str, StringConstraints(min_length=1, max_length=MAX_TEXT_CHARS), Storable]
Texts = Annotated[
    list[Text],
    Field(
        min_length=1,
        max_length=MAX_TEXTS,
        description=f"1 to {MAX_TEXTS} texts of 1 to {MAX_TEXT_CHARS} characters each.",
    ),
]
