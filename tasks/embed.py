"""`embed`: sentence embeddings (mean pooling, L2-normalised, 384 dims) with all-MiniLM-L6-v2, or
with the encoder of a registered masked-LM version (one pretrain-mlm made).

Batching: a job naming the shipped model reads nothing of its tenant's, but one naming a registered
model does (a name means another model in another tenant). The kind therefore reads tenant data, so
a batch holds one tenant's jobs of one model (the job's `model` column is the reference). Jobs of
different tenants no longer share a forward pass even for the shipped model: that costs throughput
only when many tenants each send a trickle of embed jobs at once; one tenant's jobs batch as before.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from tasks import minilm
from tasks import mlm as mlm_lib
from tasks.classify import ModelRef
from tasks.context import JobContext, JobError, ResolvedModel
from tasks.recipes import RECIPE_FILE
from tasks.registry import JobKind
from tasks.texts import Texts

JSON_DECIMALS = 8


class EmbedParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    texts: Texts
    model: ModelRef | Literal["all-MiniLM-L6-v2"] = Field(
        default=minilm.MODEL_NAME,
        description='"all-MiniLM-L6-v2" (the shipped model), or a registered masked-LM encoder: "name", '
        '"name:3" or "name@alias".',
    )


class EmbedResult(BaseModel):
    model: str
    version: int | None = Field(
        default=None, description="The registered version; none for the shipped model."
    )
    dim: int
    embeddings: list[list[float]] = Field(
        description=f"One L2-normalised vector per text, in order; float32 values rounded to {JSON_DECIMALS} decimals."
    )
    tokens: int | None = Field(
        default=None,
        description="Tokens the model read for all the texts (after truncation, with [CLS] and [SEP]); "
        "the OpenAI-compatible API reports it as usage. None in results from before it was counted.",
    )


def encoder(ctx: JobContext) -> minilm.Encoder:
    return ctx.models.get(f"{minilm.MODEL_NAME}@{ctx.device}", lambda: minilm.load_encoder(ctx.device))


def registered_encoder(ctx: JobContext, resolved: ResolvedModel) -> minilm.Encoder:
    def load() -> minilm.Encoder:
        if ctx.files.exists(resolved.path / RECIPE_FILE):
            return optimized(ctx, resolved)
        try:
            return mlm_lib.load_encoder_from_dir(resolved.path, ctx.device, ctx.files)
        except mlm_lib.MaskedLMFormatError as exc:
            raise JobError(
                "IncompatibleModel", f"{resolved.name}:{resolved.version} is not an encoder: {exc}"
            ) from None

    # Keyed by the version's files, not its name: tenants may each have a "domain:1".
    return ctx.models.get(f"encoder:{resolved.path}@{ctx.device}", load)


def optimized(ctx: JobContext, resolved: ResolvedModel) -> minilm.Encoder:
    """An embedder `optimize` made (of the shipped MiniLM or a registered encoder): its recipe
    applied at load (int8 re-quantised, on the CPU even on a GPU worker). Its `nbytes()` counts
    packed int8 weights, so the model cache charges its real size."""
    from tasks.optimizing import ModelFormatError, OptimizedEncoder, load_model

    try:
        model = load_model(resolved.path, ctx.device, files=ctx.files)
    except ModelFormatError as exc:
        raise JobError(
            "InvalidModel", f"{resolved.name}:{resolved.version} cannot be loaded: {exc}"
        ) from None
    if not isinstance(model, OptimizedEncoder):
        raise JobError(
            "IncompatibleModel", f"{resolved.name}:{resolved.version} is a classifier, not an encoder"
        )
    return model


def run(params: EmbedParams, ctx: JobContext) -> EmbedResult:
    return run_batch([params], ctx)[0]


def run_batch(batch: list[EmbedParams], ctx: JobContext) -> list[EmbedResult]:
    """Each model's jobs' texts through one tokenisation and one forward pass, split back per job
    (the worker batches one model's jobs; a mixed batch is run one model at a time)."""
    results: dict[int, EmbedResult] = {}
    for ref in dict.fromkeys(p.model for p in batch):
        if ref == minilm.MODEL_NAME:
            name, version, model = minilm.MODEL_NAME, None, encoder(ctx)
        else:
            resolved = ctx.resolve_model(ref)
            name, version, model = resolved.name, resolved.version, registered_encoder(ctx, resolved)
        members = [i for i, p in enumerate(batch) if p.model == ref]
        texts = [text for i in members for text in batch[i].texts]
        # The model computes in float32 (about 7 significant digits); a float64 repr of such a value
        # has 17, which every process then writes and parses (JSONB in PostgreSQL, the API, clients).
        # Rounded to 8 decimals, the JSON is ~40% shorter and finishing a 64-job batch ~30% cheaper.
        max_tokens = getattr(model, "max_seq_length", minilm.MAX_TOKENS)  # an optimised embedder's own
        embedded, counts = minilm.embed_texts_counted(model, texts, max_tokens)
        vectors = embedded.double().round(decimals=JSON_DECIMALS).tolist()
        start = 0
        for i in members:
            end = start + len(batch[i].texts)
            results[i] = EmbedResult(
                model=name,
                version=version,
                dim=minilm.DIM,
                embeddings=vectors[start:end],
                tokens=sum(counts[start:end]),
            )
            start = end
    return [results[i] for i in range(len(batch))]


def warmup(ctx: JobContext) -> None:
    encoder(ctx)


KIND = JobKind(
    name="embed",
    params=EmbedParams,
    result=EmbedResult,
    run=run,
    category="inference",
    description="Sentence embeddings with all-MiniLM-L6-v2 or a registered masked-LM encoder.",
    warmup=warmup,
    model_of=lambda params: params.model,
    run_batch=run_batch,
    batch_cost=lambda params: len(params.texts),
    # A registered model is the tenant's: batches are one tenant's (see the module docstring).
    reads_tenant_data=True,
)
