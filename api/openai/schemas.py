"""OpenAI's response shapes, for the OpenAPI document (routes return the JSON directly)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


class ErrorBody(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error, requests (429) or server_error")
    param: str | None
    code: str | None = Field(description="e.g. model_not_found, invalid_api_key, rate_limit_exceeded")


class OpenAIErrorOut(BaseModel):
    error: ErrorBody


class Embedding(BaseModel):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str = Field(description="floats, or base64 of little-endian float32 bytes")


class Usage(BaseModel):
    prompt_tokens: int = Field(
        description="Tokens the worker's tokenizer gave the model ([CLS] and [SEP] included)"
    )
    total_tokens: int


class EmbeddingsOut(BaseModel):
    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: Usage


class ModelObject(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelListOut(BaseModel):
    object: Literal["list"]
    data: list[ModelObject]


class FileObject(BaseModel):
    id: str
    object: Literal["file"]
    bytes: int
    created_at: int
    filename: str
    purpose: str = Field(description="batch (an upload) or batch_output (a batch's output or error file)")
    status: str
    expires_at: int | None
    status_details: str | None


class RequestCounts(BaseModel):
    total: int
    completed: int
    failed: int


class BatchObject(BaseModel):
    id: str
    object: Literal["batch"]
    endpoint: str
    errors: dict[str, Any] | None
    input_file_id: str
    completion_window: str
    status: Literal[
        "validating", "in_progress", "finalizing", "completed", "failed", "cancelling", "cancelled"
    ]
    output_file_id: str | None
    error_file_id: str | None
    created_at: int
    in_progress_at: int | None
    expires_at: int | None
    finalizing_at: int | None
    completed_at: int | None
    failed_at: int | None
    expired_at: int | None
    cancelling_at: int | None
    cancelled_at: int | None
    request_counts: RequestCounts
    metadata: dict[str, str] | None


class BatchListOut(BaseModel):
    object: Literal["list"]
    data: list[BatchObject]
    first_id: str | None
    last_id: str | None
    has_more: bool


class BatchOutputResponse(BaseModel):
    status_code: int
    request_id: str | None = Field(description="The tensorq job's id")
    body: dict[str, Any] = Field(description="What POST /embeddings would have answered")


class BatchOutputLine(BaseModel):
    """One line of a batch's output or error file (JSONL)."""

    id: str
    custom_id: str | None
    response: BatchOutputResponse | None
    error: dict[str, Any] | None = Field(description="{code, message} for a request that got no response")
