"""`evaluate`: measure a registered version (or the shipped MiniLM) on a dataset. Classifiers:
accuracy, macro-F1, per-label P/R/F1, confusion matrix; embedders: cosine to the parent; both:
latency, throughput, size. The figures are kept on the version (GET /v1/models/{name})."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from tasks.context import JobContext
from tasks.optimize_jobs import MODEL_TASKS, EvaluateParams, EvaluateResult, check_task, run_evaluate
from tasks.registry import JobKind


class EvaluationRecord(BaseModel):
    """What the worker keeps on the measured version (tasks.registry.JobKind.records_evaluation)."""

    model: str
    version: int
    dataset_id: str
    split: str
    metrics: dict[str, Any]
    device: str


class EvaluateJobResult(EvaluateResult):
    evaluation: EvaluationRecord | None = Field(
        default=None, description="The figures as kept on the version; none for the shipped model."
    )


def metrics_of(result: EvaluateResult) -> dict[str, Any]:
    dumped = result.model_dump(mode="json")
    keys = ("kind", "classifier", "cosine_to_parent", "speed", "size", "recipe", "split", "parent")
    return {k: dumped[k] for k in keys if dumped.get(k) is not None}


def run(params: EvaluateParams, ctx: JobContext) -> EvaluateJobResult:
    check_task(params.model, ctx)
    result = run_evaluate(params, ctx)
    record = (
        EvaluationRecord(
            model=result.model,
            version=result.version,
            dataset_id=result.dataset_id,
            split=result.split.split,
            metrics=metrics_of(result),
            device=result.speed.device,
        )
        if result.version > 0
        else None
    )
    return EvaluateJobResult(**result.model_dump(), evaluation=record)


KIND = JobKind(
    name="evaluate",
    params=EvaluateParams,
    result=EvaluateJobResult,
    run=run,
    category="training",
    description="Measure a model on a dataset: quality, latency, throughput and size.",
    model_of=lambda params: params.model,
    records_evaluation=True,
    model_tasks=(("model", MODEL_TASKS),),
    needs_labels_for_tasks=("text-classifier",),
    model_must_exist=True,
    soft_time_limit=1800,
    time_limit=1860,
)
