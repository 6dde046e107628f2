"""Every error leaves as JSON naming the field; nothing leaves as a bare 500 with a stack trace."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.schemas import KIND_TAGS
from tasks.texts import SURROGATE
from tensorq.core.crypto import DataIntegrityError

log = logging.getLogger(__name__)


def _clean_loc(error: dict[str, Any]) -> dict[str, Any]:
    raw = list(error.get("loc", ()))
    # A discriminated union puts the kind's tag into the path (body.embed.input.texts,
    # body.jobs.3.embed.input); drop it so the path is the one the client sent.
    loc = [part for i, part in enumerate(raw) if not (i > 0 and part in KIND_TAGS and _is_item(raw[i - 1]))]
    if error.get("type") in ("union_tag_invalid", "union_tag_not_found"):
        loc = [*loc, "kind"]
    error.pop("url", None)
    if isinstance(error.get("ctx"), dict):
        error["ctx"] = {k: str(v) for k, v in error["ctx"].items()}
    error["loc"] = loc
    if "input" in error:
        # Echo the offending input only when it is small and valid JSON (NaN and Infinity are not).
        try:
            if len(json.dumps(error["input"], allow_nan=False, default=str)) > 200:
                error.pop("input")
        except (ValueError, TypeError):
            error["input"] = repr(error["input"])[:200]
    return error


def _is_item(part: object) -> bool:
    return part == "body" or isinstance(part, int)


def _encodable(value: Any) -> Any:
    # The error echoes what the client sent (a field name in `loc`, a value in `input` or `msg`);
    # a surrogate among it would turn the 422 into a 500, so it goes back as U+FFFD instead.
    if isinstance(value, str):
        return SURROGATE.sub("\ufffd", value)
    if isinstance(value, dict):
        return {_encodable(k): _encodable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_encodable(v) for v in value]
    return value


async def validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [_clean_loc(dict(e)) for e in exc.errors()]
    return JSONResponse(status_code=422, content=_encodable(jsonable_encoder({"detail": errors})))


async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    error_id = uuid.uuid4().hex[:12]
    if isinstance(exc, DataIntegrityError):  # a sealed file or value that did not open: one line
        log.error("unhandled error %s on %s %s: %s", error_id, request.method, request.url.path, exc)
    else:
        log.error(
            "unhandled error %s on %s %s",
            error_id,
            request.method,
            request.url.path,
            exc_info=(type(exc), exc, exc.__traceback__),
        )
    return JSONResponse(
        status_code=500, content={"detail": f"internal error (id {error_id}); see the API log"}
    )


class CatchAll:
    """The outermost of tensorq's middleware: an error nothing else handled is logged here, once,
    and answered 500 as JSON. Starlette's own handler for `Exception` answers too but then raises
    the error on to the server, which logged it again as a plain-text traceback."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def sending(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception as exc:
            response = await unexpected_error(Request(scope), exc)
            if not started:  # else the answer is under way; the server ends the connection
                await response(scope, receive, send)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, validation_error)


class BodyLimit:
    """Answers 413 for a body over `max_bytes`, whether or not Content-Length says so, and 408 for
    one not received within `timeout` seconds (a client trickling it would hold its request open)."""

    def __init__(
        self, app: ASGIApp, max_bytes: int, upload_paths: dict[str, int] | None = None, timeout: float = 30.0
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.upload_paths = upload_paths or {}
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE"):
            await self.app(scope, receive, send)
            return
        limit = self.upload_paths.get(scope["path"], self.max_bytes)
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._reject(send, 413, f"request body larger than {limit} bytes")
            return
        chunks: list[bytes] = []
        size = 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                await self._reject(send, 408, f"request body not received within {self.timeout:g} s")
                return
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await self._reject(send, 413, f"request body larger than {limit} bytes")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _reject(self, send: Send, status: int, detail: str) -> None:
        body = json.dumps({"detail": detail}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    # The rest of the body may still come; the connection cannot carry another request.
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
