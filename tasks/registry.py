"""The registry of job kinds. A kind is one module in `tasks/` that defines `KIND`."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel

from tasks.context import JobContext

P = TypeVar("P", bound=BaseModel)
R = TypeVar("R", bound=BaseModel)

Category = Literal["inference", "training"]


@dataclass(frozen=True)
class JobKind(Generic[P, R]):
    name: str
    params: type[P]
    result: type[R]
    run: Callable[[P, JobContext], R]
    category: Category = "inference"
    description: str = ""
    # Loads what the kind needs ahead of the first job (called once per worker process).
    warmup: Callable[[JobContext], None] | None = None
    # The model a job of this kind will use, recorded on the job row for listing and metrics.
    model_of: Callable[[P], str | None] = lambda params: None
    # Batchable inference kinds: run many jobs' params in one forward pass, one result per job.
    run_batch: Callable[[list[P], JobContext], list[R]] | None = None
    # A job's share of a batch (texts for text kinds); batches are bounded by the sum of these.
    batch_cost: Callable[[P], int] = lambda params: 1
    # Kinds whose result carries `model` (a name), `artifact_dir` and `metrics` (and optionally
    # `labels`, `task`, `parent` {name, version}, `lineage`): the worker registers that directory as
    # the model's next version when it commits the job.
    registers_model: bool = False
    # Kinds whose result carries `evaluation` {model, version, dataset_id, split, metrics, device}:
    # the worker keeps it on that registered version when it commits the job.
    records_evaluation: bool = False
    # Whether a job reads its tenant's models or datasets. Jobs of kinds that do are batched only
    # with the same tenant's jobs, since a model name means another model in another tenant.
    reads_tenant_data: bool = True
    # Params fields that name a registered model, with the tasks (db.models.ModelVersion.task:
    # "masked-lm", "embedder", ...) a version named there must have; the shipped MiniLM counts as
    # an "embedder". The API refuses a mismatch at submission where the reference resolves; the
    # kind checks again when it runs (a reference may resolve differently by then).
    model_tasks: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # Whether a stored `dataset_id` must be a labelled dataset (a classifier's data).
    needs_labels: bool = False
    # Whether it must when the model named by the first `model_tasks` field is of one of these
    # tasks (evaluate and optimize of a "text-classifier" need labelled rows; of an embedder not).
    needs_labels_for_tasks: tuple[str, ...] = ()
    # Whether the `model_tasks` references must resolve at submission (the API answers 422
    # ModelNotFound naming the field otherwise) rather than only when the job runs.
    model_must_exist: bool = False
    # Celery time limits in seconds: at the soft one the job fails with Timeout; at the hard one
    # the pool child is killed and the job is failed by the parent. Settings may override them.
    soft_time_limit: float | None = 300
    time_limit: float | None = 360

    @property
    def task_name(self) -> str:
        """The Celery task name, readable in Flower: tensorq.embed, tensorq.train_text_classifier."""
        return "tensorq." + self.name.replace("-", "_")

    def run_json(self, params: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
        """Validate stored params, run, and return the result as JSON-ready data."""
        result = self.run(self.params.model_validate(params), ctx)
        return result.model_dump(mode="json")


@lru_cache(maxsize=1)
def all_kinds() -> dict[str, JobKind[Any, Any]]:
    """Every module of this package that defines KIND, by kind name."""
    import tasks

    kinds: dict[str, JobKind[Any, Any]] = {}
    for info in pkgutil.iter_modules(tasks.__path__):
        module = importlib.import_module(f"tasks.{info.name}")
        kind = getattr(module, "KIND", None)
        if isinstance(kind, JobKind):
            if kind.name in kinds:
                raise RuntimeError(f"job kind {kind.name!r} defined twice")
            kinds[kind.name] = kind
    return dict(sorted(kinds.items()))


def get_kind(name: str) -> JobKind[Any, Any]:
    try:
        return all_kinds()[name]
    except KeyError:
        raise KeyError(f"unknown job kind {name!r}") from None
