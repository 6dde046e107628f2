"""The artifact store: a directory tree; every path into it is built here and checked to stay inside."""

from __future__ import annotations

import uuid
from pathlib import Path, PurePosixPath

from tensorq.core.files import atomic_write_bytes


class UnsafePath(ValueError):
    """A relative artifact path that is absolute, climbs out, or is otherwise not ours."""


class ArtifactStore:
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def path(self, relative: str) -> Path:
        """The absolute path of a stored relative path, refusing anything that escapes the root."""
        rel = PurePosixPath(relative)
        if not relative or rel.is_absolute() or ".." in rel.parts or "\\" in relative or "\x00" in relative:
            raise UnsafePath(f"not a safe artifact path: {relative!r}")
        full = (self.root / rel).resolve()
        if not full.is_relative_to(self.root):
            raise UnsafePath(f"not a safe artifact path: {relative!r}")
        return full

    def relative(self, absolute: Path) -> str:
        """The stored form of a path inside the store."""
        full = absolute.resolve()
        if not full.is_relative_to(self.root):
            raise UnsafePath(f"{absolute} is outside the artifact store")
        return full.relative_to(self.root).as_posix()

    def job_dir(self, job_id: uuid.UUID) -> Path:
        # A UUID's text cannot escape the root, so no resolve(): it cost ~30 us a job, and every
        # finished job is checked for a work dir (4 ms per batch of 128).
        return self.root / "jobs" / str(uuid.UUID(str(job_id)))

    def dataset_relpath(self, dataset_id: uuid.UUID) -> str:
        return f"datasets/{uuid.UUID(str(dataset_id))}.jsonl"

    def write_atomic(self, relative: str, data: bytes) -> Path:
        return atomic_write_bytes(self.path(relative), data)
