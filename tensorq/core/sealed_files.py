"""A tenant's files in the artifact store, sealed with its data key (tensorq/core/crypto.py).

Plaintext never touches the disk: what is written is sealed in memory first, and what is read is
opened in memory (model weights are then loaded from bytes). A file's associated data is its
path relative to the store, so a sealed file copied or moved elsewhere does not open.

`Files` is what a job kind (tasks/) reads and writes model directories, checkpoints and datasets
through (`JobContext.files`): `SealedFiles` in a worker, `PlainFiles` (no encryption) for plain
Python use and for the shipped base model, which is a public package outside the store.

Each file is sealed whole (one AES-GCM blob): reading one means reading it whole into memory.
The largest are model weights (~90 MB) and OpenAI batch files (at most
TENSORQ_OPENAI_FILE_MAX_BYTES, 64 MiB), and both were read whole before anyway.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from tensorq.core.artifacts import ArtifactStore
from tensorq.core.crypto import TenantCipher
from tensorq.core.files import atomic_write_bytes, replace_dir


class Files(Protocol):
    """A tenant's files as a job kind sees them: whole files in memory, written atomically."""

    def read(self, path: Path) -> bytes: ...

    def read_text(self, path: Path) -> str: ...

    def write(self, path: Path, data: bytes) -> Path: ...

    def write_dir(self, target: Path, files: dict[str, bytes]) -> Path: ...

    def exists(self, path: Path) -> bool: ...


def _check_name(name: str) -> None:
    if "/" in name or name in ("", ".", ".."):
        raise ValueError(f"not a file name: {name!r}")


def _write_dir(target: Path, files: dict[str, bytes], stored: Callable[[Path, bytes], bytes]) -> Path:
    """Each file's `stored(final path, data)` written into a temporary sibling, then put at
    `target` at once (a reader sees the old directory or the new one)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".tmp-{target.name}."))
    try:
        for name, data in files.items():
            _check_name(name)
            with open(tmp / name, "wb") as f:
                f.write(stored(target / name, data))
                f.flush()
                os.fsync(f.fileno())
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


class PlainFiles:
    """`Files` without encryption: outside a worker, and for files that are no tenant's."""

    def read(self, path: Path) -> bytes:
        return Path(path).read_bytes()

    def read_text(self, path: Path) -> str:
        return self.read(path).decode("utf-8")

    def write(self, path: Path, data: bytes) -> Path:
        return atomic_write_bytes(Path(path), data)

    def write_dir(self, target: Path, files: dict[str, bytes]) -> Path:
        return _write_dir(Path(target), files, lambda _, data: data)

    def exists(self, path: Path) -> bool:
        return Path(path).is_file()


PLAIN = PlainFiles()


class SealedFiles:
    def __init__(self, store: ArtifactStore, cipher: TenantCipher) -> None:
        self.store = store
        self.cipher = cipher

    @property
    def tenant(self) -> str:
        return self.cipher.tenant

    def _obj(self, path: Path) -> str:
        return "file:" + self.store.relative(path)

    def read(self, path: Path) -> bytes:
        return self.cipher.open(path.read_bytes(), self._obj(path))

    def read_text(self, path: Path) -> str:
        return self.read(path).decode("utf-8")

    def seal_for(self, path: Path, data: bytes) -> bytes:
        """The bytes to store at `path` (for a caller that writes them itself)."""
        return self.cipher.seal(data, self._obj(path))

    def write(self, path: Path, data: bytes) -> Path:
        """Atomically (see tensorq.core.files); the sealed bytes only."""
        return atomic_write_bytes(path, self.seal_for(path, data))

    def write_dir(self, target: Path, files: dict[str, bytes]) -> Path:
        """A directory of files put at `target` at once (a reader sees the old one or the new one).
        Each file is sealed for its final path, then written into a temporary sibling."""
        return _write_dir(Path(target), files, self.seal_for)

    def exists(self, path: Path) -> bool:
        return Path(path).is_file()
