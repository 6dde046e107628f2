"""Embeddings the OpenAI way: the request, which tensorq model and kind serve it, the response.

Shared by POST /openai/v1/embeddings and by batch lines (whose body is the same request), so a
batch's output line carries exactly what the endpoint would have answered.
"""

from __future__ import annotations

import base64
import sys
import time
from array import array
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy.orm import Session

from api.openai.errors import OpenAIError, from_validation, model_not_found
from tasks import minilm
from tasks.registry import get_kind
from tensorq.core.settings import Settings

EncodingFormat = Literal["float", "base64"]


class EmbeddingsRequest(BaseModel):
    """OpenAI's embeddings request. `input` is checked by `texts_of` (token arrays are refused)."""

    model_config = ConfigDict(extra="forbid")

    input: Any = Field(description="A string, or an array of strings (token arrays are not supported)")
    model: str = Field(
        max_length=200, description="all-MiniLM-L6-v2 (or sentence-transformers/all-MiniLM-L6-v2)"
    )
    encoding_format: EncodingFormat = "float"
    dimensions: int | None = Field(default=None, description="Accepted only when equal to the model's (384)")
    user: str | None = Field(default=None, description="Accepted and ignored")


@dataclass(frozen=True)
class EmbeddingModel:
    """A model the tenant can embed with: its public id, the job kind that runs it, its size."""

    id: str
    kind: str
    dim: int
    owned_by: str = "tensorq"
    created: int = 0
    aliases: tuple[str, ...] = field(default_factory=tuple)

    def params(self, texts: list[str]) -> BaseModel:
        """The job's input for these texts, validated by the kind's own schema."""
        return get_kind(self.kind).params.model_validate({"texts": texts})


# The shipped base model, the same for every tenant. (Its package's build date is not known here;
# `created` is the Unix time of the model's publication on the Hugging Face Hub, 2021-08.)
MINILM = EmbeddingModel(
    id=minilm.MODEL_NAME,
    kind="embed",
    dim=minilm.DIM,
    owned_by="sentence-transformers",
    created=1628553600,
    aliases=(f"sentence-transformers/{minilm.MODEL_NAME}",),
)


def embedding_models(session: Session, tenant: str) -> list[EmbeddingModel]:
    """The models `tenant` can embed with (GET /models). A tenant's registered embedders would be
    added here, and in `resolve_embedding_model`, beside the shipped one."""
    return [MINILM]


def resolve_embedding_model(session: Session, tenant: str, name: str) -> EmbeddingModel | None:
    """The one place a request's `model` is looked up (by id or alias); None when unknown."""
    for model in embedding_models(session, tenant):
        if name == model.id or name in model.aliases:
            return model
    return None


@dataclass(frozen=True)
class EmbeddingsCall:
    """A checked request: the model, the job input, and what the response must echo."""

    model: EmbeddingModel
    params: BaseModel
    texts: int
    requested_model: str
    encoding_format: EncodingFormat

    @property
    def options(self) -> dict[str, Any]:
        return {"model": self.requested_model, "encoding_format": self.encoding_format}


def parse_request(body: Any) -> EmbeddingsRequest:
    """A batch line's body as a request (the endpoint gets its through FastAPI)."""
    if not isinstance(body, dict):
        raise OpenAIError(400, "The request body must be a JSON object.", param="body")
    try:
        return EmbeddingsRequest.model_validate(body)
    except ValidationError as exc:
        raise from_validation(list(exc.errors())) from None


def texts_of(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return value
    if isinstance(value, list) and value and all(isinstance(v, int | list) for v in value):
        raise OpenAIError(
            400,
            "Token arrays are not supported by this server: send `input` as a string or an array of strings.",
            param="input",
            code="unsupported_input",
        )
    raise OpenAIError(
        400,
        "'$.input' is invalid: it must be a non-empty string or a non-empty array of strings.",
        param="input",
    )


def check_request(
    session: Session, settings: Settings, tenant: str, request: EmbeddingsRequest
) -> EmbeddingsCall:
    """Everything the endpoint checks before a job exists; raises OpenAIError (400, 404)."""
    model = resolve_embedding_model(session, tenant, request.model)
    if model is None:
        raise model_not_found(request.model)
    texts = texts_of(request.input)
    if request.dimensions is not None and request.dimensions != model.dim:
        raise OpenAIError(
            400,
            f"This model's embeddings have {model.dim} dimensions; `dimensions` may only be {model.dim}.",
            param="dimensions",
        )
    if len(texts) > settings.max_texts_per_job:
        raise OpenAIError(
            400,
            f"{len(texts)} inputs; this server takes at most {settings.max_texts_per_job} per request.",
            param="input",
        )
    try:
        params = model.params(texts)
    except ValidationError as exc:
        errors = [{**e, "loc": ("input", *e["loc"][1:])} for e in exc.errors()]  # texts.3 -> input[3]
        if len(texts) == 1 and isinstance(request.input, str):
            errors = [{**e, "loc": ("input",)} for e in errors]
        raise from_validation(errors) from None
    return EmbeddingsCall(model, params, len(texts), request.model, request.encoding_format)


def encode_vector(vector: list[float], encoding_format: EncodingFormat) -> list[float] | str:
    """OpenAI's base64: the float32 values as little-endian bytes."""
    if encoding_format == "float":
        return vector
    packed = array("f", vector)
    if sys.byteorder == "big":
        packed.byteswap()
    return base64.b64encode(packed.tobytes()).decode("ascii")


def embeddings_body(result: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """The response for an embed job's result. usage counts the tokens the worker's tokenizer gave
    the model (0 for a result from before the worker counted them)."""
    fmt: EncodingFormat = options.get("encoding_format", "float")
    tokens = int(result.get("tokens") or 0)
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": encode_vector(vector, fmt)}
            for i, vector in enumerate(result["embeddings"])
        ],
        "model": options.get("model", result.get("model")),
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def unix(value: Any) -> int | None:
    return None if value is None else int(value.timestamp())


def now_unix() -> int:
    return int(time.time())
