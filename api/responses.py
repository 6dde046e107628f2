"""Responses serialised once, straight from the model.

FastAPI re-validates a returned model against `response_model` (in a threadpool hop for sync
routes); for job objects carrying hundreds of floats that doubles the cost of a request. Routes
declare `response_model` for the OpenAPI document and return this instead.
"""

from __future__ import annotations

from fastapi import Response
from pydantic import BaseModel


def model_response(
    model: BaseModel, status_code: int = 200, headers: dict[str, str] | None = None
) -> Response:
    return Response(
        content=model.model_dump_json(),
        status_code=status_code,
        headers=headers,
        media_type="application/json",
    )
