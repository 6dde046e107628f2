"""A tenant's files in the artifact store, sealed with its data key (tensorq/core/crypto.py).

Plaintext never touches the disk: what is written is sealed in memory first, and what is read is
opened in memory (model weights are then loaded from bytes). A file's associated data is its
path relative to the store, so a sealed file copied or moved elsewhere does not open.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from tensorq.core.artifacts import ArtifactStore
from tensorq.core.crypto import TenantCipher
from tensorq.core.files import atomic_write_bytes, replace_dir


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
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".tmp-{target.name}."))
        try:
            for name, data in files.items():
                if "/" in name or name in ("", ".", ".."):
                    raise ValueError(f"not a file name: {name!r}")
                with open(tmp / name, "wb") as f:
                    f.write(self.seal_for(target / name, data))
                    f.flush()
                    os.fsync(f.fileno())
            replace_dir(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return target
