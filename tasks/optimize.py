"""`optimize`: make a smaller or faster version of a classifier or embedder (int8, fp16/bf16,
distillation to fewer layers, FFN pruning) and register it as a new version whose parent is the
model it was made from. The version's `lineage` keeps the method, options, the comparison with the
parent on the dataset's held-out rows, the recipe's steps and the chain of versions it came from.
See tasks/optimize_jobs.py (params, options, the methods) and docs/optimize.md."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from tasks.context import JobContext
from tasks.optimize_jobs import MODEL_TASKS, OptimizeParams, OptimizeResult, check_task, run_optimize
from tasks.registry import JobKind

# db.models.ModelVersion.task values (tasks does not import db).
REGISTRY_TASKS: dict[str, Literal["text-classifier", "embedder"]] = {
    "classifier": "text-classifier",
    "embedder": "embedder",
}


class OptimizeJobResult(OptimizeResult):
    task: Literal["text-classifier", "embedder"] = Field(description="The registry task of the new version.")
    lineage: dict[str, Any] = Field(  # type: ignore[assignment]
        description="Kept on the version: method, options, parent, comparison, recipe steps, and "
        "`chain`, the versions it came from with the method each applied."
    )


def run(params: OptimizeParams, ctx: JobContext) -> OptimizeJobResult:
    check_task(params.model, ctx)
    result = run_optimize(params, ctx)
    dumped = result.model_dump(mode="json")
    lineage = {
        "method": dumped["method"],
        "options": dumped["options"],
        "parent": dumped["parent"],
        "comparison": dumped["comparison"],
        "steps": dumped["recipe"]["steps"],
        "chain": dumped["lineage"],
    }
    fields = result.model_dump(exclude={"lineage"})
    return OptimizeJobResult(**fields, task=REGISTRY_TASKS[result.kind], lineage=lineage)


KIND = JobKind(
    name="optimize",
    params=OptimizeParams,
    result=OptimizeJobResult,
    run=run,
    category="training",
    description="Quantise, distil or prune a classifier or embedder into a new registered version.",
    model_of=lambda params: params.model,
    registers_model=True,
    model_tasks=(("model", MODEL_TASKS),),
    needs_labels_for_tasks=("text-classifier",),
    model_must_exist=True,
    soft_time_limit=3600,
    time_limit=3660,
)
