"""OpenAI's error body, {"error": {"message", "type", "param", "code"}}, on /openai/v1 only.

The routes there use `OpenAIRoute`, which turns every error (a validation error, the API's own
HTTPException from auth or quotas, an `OpenAIError`, anything unforeseen) into OpenAI's shape and
status codes; the rest of the API keeps its own error format.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException

from api.errors import _encodable
from tensorq.core.crypto import DataIntegrityError

log = logging.getLogger(__name__)

INVALID_REQUEST = "invalid_request_error"

# OpenAI's type and code for a status the API raises itself (auth, quotas, not found).
_BY_STATUS: dict[int, tuple[str, str | None]] = {
    400: (INVALID_REQUEST, None),
    401: (INVALID_REQUEST, "invalid_api_key"),
    403: (INVALID_REQUEST, None),
    404: (INVALID_REQUEST, None),
    409: (INVALID_REQUEST, None),
    413: (INVALID_REQUEST, "request_too_large"),
    429: ("requests", "rate_limit_exceeded"),
}


class OpenAIError(Exception):
    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        type: str = INVALID_REQUEST,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(
            status_code=self.status_code, content=_encodable(self.body()), headers=self.headers
        )


def model_not_found(model: str) -> OpenAIError:
    return OpenAIError(
        404,
        f"The model `{model}` does not exist or you do not have access to it.",
        param="model",
        code="model_not_found",
    )


def not_found(what: str, ident: str) -> OpenAIError:
    return OpenAIError(404, f"No such {what}: '{ident}'", param=f"{what}_id" if what != "File" else "file_id")


def param_of(loc: tuple[Any, ...] | list[Any]) -> str | None:
    """`input`, `input[2]`, `dimensions`: where in the body an error is, as OpenAI names it."""
    parts = [p for p in loc if p not in ("body", "query", "path", "header", "form")]
    if not parts:
        return None
    name = str(parts[0])
    for part in parts[1:]:
        name += f"[{part}]" if isinstance(part, int) else f".{part}"
    return name


def from_validation(errors: list[Any]) -> OpenAIError:
    first = dict(errors[0]) if errors else {}
    param = param_of(first.get("loc", ()))
    msg = str(first.get("msg", "invalid request"))
    if first.get("type") == "extra_forbidden" and param:
        return OpenAIError(400, f"Unrecognized request argument supplied: {param}", param=param)
    if first.get("type") == "missing" and param:
        return OpenAIError(
            400, f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter"
        )
    return OpenAIError(400, f"Invalid value for '{param}': {msg}" if param else msg, param=param)


def from_exception(request: Request, exc: Exception) -> OpenAIError:
    if isinstance(exc, OpenAIError):
        return exc
    if isinstance(exc, RequestValidationError):
        return from_validation(list(exc.errors()))
    if isinstance(exc, HTTPException):
        type_, code = _BY_STATUS.get(exc.status_code, ("server_error", None))
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        return OpenAIError(exc.status_code, message, type=type_, code=code, headers=dict(exc.headers or {}))
    error_id = uuid.uuid4().hex[:12]
    if isinstance(exc, DataIntegrityError):  # a sealed file or value that did not open: one line
        log.error("unhandled error %s on %s %s: %s", error_id, request.method, request.url.path, exc)
    else:
        log.exception("unhandled error %s on %s %s", error_id, request.method, request.url.path)
    return OpenAIError(500, f"internal error (id {error_id}); see the API log", type="server_error")


class OpenAIRoute(APIRoute):
    """A route whose every error leaves in OpenAI's shape (dependencies and body parsing included:
    they run inside the handler this wraps)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as exc:
                return from_exception(request, exc).response()

        return handle
