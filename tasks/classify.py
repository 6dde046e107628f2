"""`classify`: label texts with a registered text classifier (one `train-text-classifier` made)."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from tasks import classifier as clf
from tasks.context import JobContext, JobError, ResolvedModel
from tasks.recipes import RECIPE_FILE
from tasks.registry import JobKind
from tasks.texts import Texts

# "name" (the latest version), "name:3" (a version) or "name@production" (an alias).
ModelRef = Annotated[
    str,
    StringConstraints(pattern=rf"^{clf.MODEL_NAME_PATTERN}(:[1-9][0-9]{{0,8}}|@{clf.MODEL_NAME_PATTERN})?$"),
]


class ClassifyParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: ModelRef = Field(description='A registered classifier: "name", "name:3" or "name@alias".')
    texts: Texts


class Prediction(BaseModel):
    label: str
    scores: dict[str, float] = Field(description="Every label's probability; they sum to 1.")


class ClassifyResult(BaseModel):
    model: str
    version: int
    predictions: list[Prediction] = Field(description="One per text, in order.")


def classifier(ctx: JobContext, resolved: ResolvedModel) -> clf.TextClassifier:
    def load() -> clf.TextClassifier:
        if ctx.files.exists(resolved.path / RECIPE_FILE):
            return optimized(ctx, resolved)
        try:
            return clf.load_classifier(resolved.path, ctx.device, ctx.files)
        except clf.ClassifierFormatError as exc:
            raise JobError(
                "InvalidModel", f"{resolved.name}:{resolved.version} is not a classifier: {exc}"
            ) from None

    # Keyed by the version's files, not its name: tenants may each have a "sentiment:1".
    return ctx.models.get(f"classifier:{resolved.path}@{ctx.device}", load)


def optimized(ctx: JobContext, resolved: ResolvedModel) -> clf.TextClassifier:
    """A version `optimize` made: its recipe applied at load (int8 is re-quantised and runs on the
    CPU even on a GPU worker; fp16/bf16 compute in fp32 off CUDA). Its `nbytes()` counts packed
    int8 weights, so the model cache charges its real size."""
    from tasks.optimizing import ModelFormatError, OptimizedClassifier, load_model

    try:
        model = load_model(resolved.path, ctx.device, files=ctx.files)
    except ModelFormatError as exc:
        raise JobError(
            "InvalidModel", f"{resolved.name}:{resolved.version} cannot be loaded: {exc}"
        ) from None
    if not isinstance(model, OptimizedClassifier):
        raise JobError(
            "IncompatibleModel", f"{resolved.name}:{resolved.version} is an embedder, not a classifier"
        )
    return model


def run(params: ClassifyParams, ctx: JobContext) -> ClassifyResult:
    return run_batch([params], ctx)[0]


def run_batch(batch: list[ClassifyParams], ctx: JobContext) -> list[ClassifyResult]:
    """Jobs naming the same model share one forward pass; each reference is resolved once."""
    resolved = {ref: ctx.resolve_model(ref) for ref in dict.fromkeys(p.model for p in batch)}
    results: dict[int, ClassifyResult] = {}
    for ref, model in resolved.items():
        members = [i for i, p in enumerate(batch) if p.model == ref]
        texts = [text for i in members for text in batch[i].texts]
        predictions = clf.predict(classifier(ctx, model), texts)
        start = 0
        for i in members:
            end = start + len(batch[i].texts)
            results[i] = ClassifyResult(
                model=model.name,
                version=model.version,
                predictions=[Prediction(label=lb, scores=pr) for lb, pr in predictions[start:end]],
            )
            start = end
    return [results[i] for i in range(len(batch))]


KIND = JobKind(
    name="classify",
    params=ClassifyParams,
    result=ClassifyResult,
    run=run,
    category="inference",
    description="Label texts with a text classifier trained by train-text-classifier.",
    model_of=lambda params: params.model,
    run_batch=run_batch,
    batch_cost=lambda params: len(params.texts),
)
