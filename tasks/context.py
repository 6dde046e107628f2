"""What a running job may ask of whoever runs it (the worker, or a plain caller)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from tensorq.core.sealed_files import Files, PlainFiles

T = TypeVar("T")


class JobError(Exception):
    """A permanent failure with a type the user sees (e.g. bad input that passed the schema)."""

    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.message = message


class JobCancelled(Exception):
    """Raised by `JobContext.check_cancelled` when the user cancelled the running job."""


class JobTimeout(Exception):
    """The job ran past its soft time limit (the worker turns its transport's signal into this)."""


class ModelProvider(Protocol):
    def get(self, key: str, load: Callable[[], T]) -> T: ...


class NoCache:
    """Loads every time: for one-off calls outside a worker."""

    def get(self, key: str, load: Callable[[], T]) -> T:
        return load()


@dataclass(frozen=True)
class ResolvedModel:
    """A registered model version, as the worker found it in the registry."""

    name: str
    version: int
    path: Path  # directory holding the version's files (safetensors + config)
    task: str = "text-classifier"  # or masked-lm, embedder (db.models.ModelVersion.task)
    parent: tuple[str, int] | None = None  # the registered version it was made from


def _no_datasets(dataset_id: str) -> list[dict[str, Any]]:
    raise JobError("DatasetNotFound", f"no dataset store here to load {dataset_id!r}")


def _no_registry(ref: str) -> ResolvedModel:
    raise JobError("ModelNotFound", f"no model registry here to resolve {ref!r}")


@dataclass
class JobContext:
    """Handed to a kind's run function. The defaults make a kind callable from plain Python."""

    device: str = "cpu"
    models: ModelProvider = field(default_factory=NoCache)
    job_id: str | None = None
    # Per-job directory that survives redelivery (checkpoints, outputs); None outside a worker.
    work_dir: Path | None = None
    # This claim of the job (1, 2, ...: a new one per attempt); None outside a worker. A stale
    # attempt (its lease lost, the job claimed again) may still be running: outputs that get
    # registered go where only their own attempt writes.
    attempt: int | None = None
    report: Callable[[dict[str, Any]], None] = lambda progress: None
    cancel_requested: Callable[[], bool] = lambda: False
    load_dataset: Callable[[str], list[dict[str, Any]]] = _no_datasets
    resolve_model: Callable[[str], ResolvedModel] = _no_registry
    # The tenant's files (model directories, checkpoints): sealed with its data key in a worker,
    # plain outside one. Every file a kind reads or writes under the artifact store goes through it.
    files: Files = field(default_factory=PlainFiles)

    def check_cancelled(self) -> None:
        if self.cancel_requested():
            raise JobCancelled()
