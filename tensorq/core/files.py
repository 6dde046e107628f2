"""The one atomic file write (and its directory form): a temporary file beside the target, fsynced, renamed over it.

A reader sees the old file or the new one, never half of one, and a crash leaves no partial file
under the target's name (only a `.tmp-` file that the next write does not trip over).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def atomic_write(target: Path, write: Callable[[BinaryIO], object]) -> Path:
    """Calls `write(file)` on a temporary file, then renames it to `target`."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".tmp-{target.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def atomic_write_bytes(target: Path, data: bytes) -> Path:
    return atomic_write(target, lambda f: f.write(data))


def replace_dir(new: Path, target: Path) -> None:
    """Puts the finished directory `new` at `target`: a directory cannot be os.replace'd over a
    non-empty one, so the old one is moved aside first (a reader sees the old or the new)."""
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(new, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, target)
