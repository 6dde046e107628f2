"""The `texts` input shared by the text kinds (embed, classify): limits in one place."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, StringConstraints

MAX_TEXTS = 256
MAX_TEXT_CHARS = 8192

Text = Annotated[str, StringConstraints(min_length=1, max_length=MAX_TEXT_CHARS)]
Texts = Annotated[
    list[Text],
    Field(
        min_length=1,
        max_length=MAX_TEXTS,
        description=f"1 to {MAX_TEXTS} texts of 1 to {MAX_TEXT_CHARS} characters each.",
    ),
]
