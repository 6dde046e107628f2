"""`fill-mask`: the most likely tokens for each [MASK] in texts, with a registered masked-LM encoder
(one `pretrain-mlm` made). Jobs naming the same model share forward passes, as embed and classify do.

The shipped MiniLM has no masked-LM head: naming it (or a classifier) is IncompatibleModel, a 422 at
submission where the API can tell (the kind's `model_tasks`) and a typed job error otherwise.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from tasks import minilm
from tasks import mlm as mlm_lib
from tasks.classify import ModelRef
from tasks.context import JobContext, JobError, ResolvedModel
from tasks.registry import JobKind
from tasks.texts import Text

MASK_TOKEN = "[MASK]"  # the shipped tokenizer's mask token, which every encoder made here keeps
MAX_TEXTS = 64
MAX_TOP_K = 50


def _has_mask(text: str) -> str:
    # Validated per item, so the error is located at texts.<i> (the API's 422 names the index).
    if MASK_TOKEN not in text:
        raise ValueError(f"must contain at least one {MASK_TOKEN}")
    return text


MaskedText = Annotated[Text, AfterValidator(_has_mask)]


class FillMaskParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # The shipped name passes the schema so that naming it is IncompatibleModel, not a bad pattern.
    model: ModelRef | Literal["all-MiniLM-L6-v2"] = Field(
        description='A registered masked-LM encoder: "name", "name:3" or "name@alias".'
    )
    texts: list[MaskedText] = Field(
        min_length=1,
        max_length=MAX_TEXTS,
        description=f"1 to {MAX_TEXTS} texts, each with at least one {MASK_TOKEN}.",
    )
    top_k: int = Field(default=5, ge=1, le=MAX_TOP_K, strict=True)


class TokenScore(BaseModel):
    token: str = Field(description='A vocabulary entry as it is: a word piece keeps its "##".')
    score: float = Field(description="Its probability at that mask (softmax over the whole vocabulary).")


class FillMaskResult(BaseModel):
    model: str
    version: int
    predictions: list[list[list[TokenScore]]] = Field(
        description="Per text, per [MASK] in order, the top_k tokens, most likely first."
    )


def masked_lm(ctx: JobContext, resolved: ResolvedModel) -> mlm_lib.MaskedLM:
    # The files decide (a classifier's directory is no masked-LM one), whatever the registry says.
    def load() -> mlm_lib.MaskedLM:
        try:
            return mlm_lib.load_mlm(resolved.path, ctx.device, ctx.files)
        except mlm_lib.MaskedLMFormatError as exc:
            raise JobError(
                "IncompatibleModel", f"{resolved.name}:{resolved.version} has no masked-LM head: {exc}"
            ) from None

    # Keyed by the version's files, not its name: tenants may each have a "domain:1".
    return ctx.models.get(f"masked-lm:{resolved.path}@{ctx.device}", load)


def run(params: FillMaskParams, ctx: JobContext) -> FillMaskResult:
    return run_batch([params], ctx)[0]


def run_batch(batch: list[FillMaskParams], ctx: JobContext) -> list[FillMaskResult]:
    """Jobs naming the same model share forward passes; each reference is resolved once.
    (The worker batches jobs of one model, but a mixed batch is handled too, one model at a time.)"""
    refs = list(dict.fromkeys(p.model for p in batch))
    if minilm.MODEL_NAME in refs:
        raise JobError(
            "IncompatibleModel", f"{minilm.MODEL_NAME} (the shipped encoder) has no masked-LM head"
        )
    resolved = {ref: ctx.resolve_model(ref) for ref in refs}
    # "domain", "domain:3" and "domain@prod" may all be one version: one group per version's files.
    versions = {model.path: model for model in resolved.values()}
    results: dict[int, FillMaskResult] = {}
    for path, model in versions.items():
        members = [i for i, p in enumerate(batch) if resolved[p.model].path == path]
        texts = [text for i in members for text in batch[i].texts]
        top_k = max(batch[i].top_k for i in members)  # one top-k for all, each job keeps its own k
        try:
            filled = mlm_lib.fill_mask(masked_lm(ctx, model), texts, top_k)
        except ValueError as exc:  # a mask past the model's length
            raise JobError("InvalidInput", str(exc)) from None
        start = 0
        for i in members:
            k, end = batch[i].top_k, start + len(batch[i].texts)
            results[i] = FillMaskResult(
                model=model.name,
                version=model.version,
                predictions=[
                    [[TokenScore(token=c.token, score=c.score) for c in mask[:k]] for mask in text]
                    for text in filled[start:end]
                ],
            )
            start = end
    return [results[i] for i in range(len(batch))]


def batch_cost(params: FillMaskParams) -> int:
    return len(params.texts)


KIND_MODEL_TASKS: tuple[tuple[str, tuple[str, ...]], ...] = (("model", (mlm_lib.TASK,)),)

FILL_MASK_KIND_SPEC: dict[str, Any] = {
    "name": "fill-mask",
    "params": FillMaskParams,
    "result": FillMaskResult,
    "run": run,
    "category": "inference",
    "description": "The top-k tokens for each [MASK] in texts, with an encoder trained by pretrain-mlm.",
    "model_of": lambda params: params.model,
    "run_batch": run_batch,
    "batch_cost": batch_cost,
    "reads_tenant_data": True,
    "model_tasks": KIND_MODEL_TASKS,
}

KIND = JobKind(**FILL_MASK_KIND_SPEC)
