"""The /openai/v1 routes. Every error leaves in OpenAI's shape (`OpenAIRoute`)."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, File, Form, Query, Request, Response, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from sqlalchemy.orm import Session
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from api.auth import current_principal
from api.deps import get_db, get_events, get_session, get_settings
from api.files import Download, tenant_files
from api.limits import admit, check_items
from api.openai.batches import (
    COMPLETION_WINDOW,
    ENDPOINT,
    JobSpec,
    batch_out,
    cancel_batch,
    check_batch_file,
    file_out,
    new_batch,
    store_file,
)
from api.openai.embeddings import (
    EmbeddingModel,
    EmbeddingsCall,
    EmbeddingsRequest,
    check_request,
    embedding_models,
    embeddings_body,
    resolve_embedding_model,
)
from api.openai.errors import OpenAIError, OpenAIRoute, from_exception, model_not_found, not_found
from api.openai.schemas import (
    BatchListOut,
    BatchObject,
    BatchOutputLine,
    EmbeddingsOut,
    FileObject,
    ModelListOut,
    ModelObject,
    OpenAIErrorOut,
)
from api.routes.jobs import MAX_WAIT_S, build_job, follow_job, group_commit
from db.jobs import cancel_job
from db.models import Job, JobStatus
from db.openai_batches import get_batch, get_file, list_batches, new_batch_id
from db.queries import fetch_job
from db.session import AsyncSessions
from db.tenants import Principal
from tensorq.core.events import EventListener
from tensorq.core.settings import Settings

PREFIX = "/openai/v1"

router = APIRouter(
    prefix=PREFIX, tags=["openai"], route_class=OpenAIRoute, dependencies=[Depends(current_principal)]
)

# The body OpenAI's errors have, for the OpenAPI document.
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": OpenAIErrorOut, "description": "OpenAI's error body"}
    for code in (400, 401, 404, 429, 500)
}
FILE_CONTENT: dict[int | str, dict[str, Any]] = {
    200: {
        "model": BatchOutputLine,
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        "description": "The file's bytes: an upload as sent, or a batch's JSONL output or error file, "
        "one BatchOutputLine per line",
    },
    **ERRORS,
}


def json_response(body: Any, status_code: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status_code, media_type="application/json")


def model_object(model: EmbeddingModel) -> dict[str, Any]:
    return {"id": model.id, "object": "model", "created": model.created, "owned_by": model.owned_by}


@router.post(
    "/embeddings",
    response_model=EmbeddingsOut,
    responses=ERRORS,
    summary="Create embeddings (OpenAI-compatible)",
)
async def create_embeddings(
    request: Request,
    body: EmbeddingsRequest,
    db: AsyncSessions = Depends(get_db),
    settings: Settings = Depends(get_settings),
    principal: Principal = Depends(current_principal),
    events: EventListener = Depends(get_events),
) -> Response:
    """One embed job (listed in /v1/jobs, batched with concurrent ones by the worker), answered
    when it is final, as POST /v1/jobs with `Prefer: wait` would."""
    job_id = uuid.uuid4()

    def prepare(session: Session) -> tuple[EmbeddingsCall, Job]:
        call = check_request(session, settings, principal.tenant, body)
        spec = JobSpec(call.model.kind, call.params)
        check_items(request, session, settings, principal, [spec], ("body",))
        return call, build_job(session, spec, settings, principal, job_id)

    call: EmbeddingsCall | None = None

    async def submit() -> Job:
        nonlocal call
        call, job = await db.run(prepare)
        await admit(request, db, settings, principal.tenant, 1)
        await group_commit(request).commit([job])
        return job

    async def load() -> Job | None:
        return await db.run(fetch_job, job_id, principal.tenant)

    job = await follow_job(events, db, job_id, submit, load, MAX_WAIT_S, until="finished")
    assert job is not None and call is not None  # our own job, just committed
    if job.status == JobStatus.SUCCEEDED and job.result is not None:
        return json_response(embeddings_body(job.result, call.options))
    if not job.status.terminal:

        def give_up(session: Session) -> None:
            _, cancelled = cancel_job(session, job_id, principal.tenant)
            session.commit()
            if cancelled:
                request.app.state.active_counter.finished([principal.tenant])

        await db.run(give_up)
        raise OpenAIError(
            503, f"No worker finished the request within {MAX_WAIT_S:g} s; try again.", type="server_error"
        )
    message = (
        f"The embedding job {job.status.value}: {job.error_type or ''} {job.error_message or ''}".strip()
    )
    raise OpenAIError(500, message, type="server_error")


@router.get(
    "/models", response_model=ModelListOut, responses=ERRORS, summary="Models this key can embed with"
)
def read_models(
    session: Session = Depends(get_session), principal: Principal = Depends(current_principal)
) -> Response:
    models = embedding_models(session, principal.tenant)
    return json_response({"object": "list", "data": [model_object(m) for m in models]})


@router.get("/models/{model_id:path}", response_model=ModelObject, responses=ERRORS, summary="One model")
def read_model(
    model_id: str, session: Session = Depends(get_session), principal: Principal = Depends(current_principal)
) -> Response:
    model = resolve_embedding_model(session, principal.tenant, model_id)
    if model is None:
        raise model_not_found(model_id)
    return json_response(model_object(model))


@router.post(
    "/files",
    response_model=FileObject,
    responses=ERRORS,
    summary="Upload a batch input file (JSONL, purpose=batch)",
)
async def upload_file(
    file: UploadFile = File(description="JSONL: one {custom_id, method, url, body} per line"),
    purpose: str = Form(description="batch"),
    session: Session = Depends(get_session),
    settings: Settings = Depends(get_settings),
    principal: Principal = Depends(current_principal),
) -> Response:
    if purpose != "batch":
        raise OpenAIError(400, f"purpose {purpose!r} is not supported here; only 'batch'.", param="purpose")
    data = await file.read(settings.openai_file_max_bytes + 1)

    def store() -> dict[str, Any]:
        lines = check_batch_file(data, settings)
        row = store_file(
            session,
            tenant_files(settings, principal.tenant),
            tenant=principal.tenant,
            purpose=purpose,
            filename=file.filename or "batch.jsonl",
            data=data,
            lines=lines,
        )
        session.commit()
        return file_out(row)

    return json_response(await run_in_threadpool(store))


@router.get("/files/{file_id}", response_model=FileObject, responses=ERRORS, summary="A file's metadata")
def read_file(
    file_id: str, session: Session = Depends(get_session), principal: Principal = Depends(current_principal)
) -> Response:
    row = get_file(session, file_id, principal.tenant)
    if row is None:
        raise not_found("File", file_id)
    return json_response(file_out(row))


@router.get(
    "/files/{file_id}/content",
    response_class=FileResponse,
    responses=FILE_CONTENT,
    summary="A file's content",
)
def read_file_content(
    file_id: str,
    session: Session = Depends(get_session),
    settings: Settings = Depends(get_settings),
    principal: Principal = Depends(current_principal),
) -> Response:
    row = get_file(session, file_id, principal.tenant)
    if row is None:
        raise not_found("File", file_id)
    files = tenant_files(settings, principal.tenant)
    path = files.store.path(row.path)
    try:
        data = files.read(path)  # sealed: opened whole, in memory (DataIntegrityError: a 500)
    except FileNotFoundError:
        raise OpenAIError(404, f"The content of file '{file_id}' is gone.", param="file_id") from None
    return Download(data, filename=row.filename)


Metadata = dict[
    Annotated[str, StringConstraints(min_length=1, max_length=64)],
    Annotated[str, StringConstraints(max_length=512)],
]


class BatchCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input_file_id: str = Field(max_length=64)
    endpoint: str = Field(description=ENDPOINT)
    completion_window: str = Field(description=COMPLETION_WINDOW)
    metadata: Metadata | None = Field(default=None, max_length=16)


@router.post(
    "/batches", response_model=BatchObject, responses=ERRORS, summary="Create a batch of embeddings requests"
)
def create_batch(
    request: Request,
    body: BatchCreate,
    session: Session = Depends(get_session),
    principal: Principal = Depends(current_principal),
) -> Response:
    if body.endpoint != ENDPOINT:
        raise OpenAIError(400, f"endpoint must be {ENDPOINT}; no other runs here.", param="endpoint")
    if body.completion_window != COMPLETION_WINDOW:
        raise OpenAIError(400, f"completion_window must be {COMPLETION_WINDOW}.", param="completion_window")
    source = get_file(session, body.input_file_id, principal.tenant)
    if source is None:
        raise not_found("File", body.input_file_id)
    if source.purpose != "batch":
        raise OpenAIError(
            400, "The input file must have been uploaded with purpose 'batch'.", param="input_file_id"
        )
    batch = new_batch(
        session, batch_id=new_batch_id(), tenant=principal.tenant, input_file=source, metadata=body.metadata
    )
    session.commit()
    wake_batches(request)
    return json_response(batch_out(session, batch))


def wake_batches(request: Request) -> None:
    loops = getattr(request.app.state, "background", None)
    if loops is not None:
        loops.wake_openai_batches()


@router.get("/batches/{batch_id}", response_model=BatchObject, responses=ERRORS, summary="A batch")
def read_batch(
    batch_id: str, session: Session = Depends(get_session), principal: Principal = Depends(current_principal)
) -> Response:
    batch = get_batch(session, batch_id, principal.tenant)
    if batch is None:
        raise not_found("batch", batch_id)
    return json_response(batch_out(session, batch))


@router.post(
    "/batches/{batch_id}/cancel", response_model=BatchObject, responses=ERRORS, summary="Cancel a batch"
)
def cancel(
    request: Request,
    batch_id: str,
    session: Session = Depends(get_session),
    principal: Principal = Depends(current_principal),
) -> Response:
    batch = get_batch(session, batch_id, principal.tenant, for_update=True)
    if batch is None:
        raise not_found("batch", batch_id)
    cancelled = cancel_batch(session, batch)
    session.commit()
    if cancelled:
        request.app.state.active_counter.finished([batch.tenant] * len(cancelled))
        request.app.state.event_publisher.changed(cancelled, final=True)
    wake_batches(request)
    return json_response(batch_out(session, batch))


@router.get(
    "/batches", response_model=BatchListOut, responses=ERRORS, summary="This key's batches, newest first"
)
def read_batches(
    after: str | None = Query(default=None, max_length=64, description="The last id of the previous page"),
    limit: int = Query(default=20, ge=1, le=100),
    session: Session = Depends(get_session),
    principal: Principal = Depends(current_principal),
) -> Response:
    previous = None
    if after is not None:
        previous = get_batch(session, after, principal.tenant)
        if previous is None:
            raise OpenAIError(400, f"No such batch for `after`: '{after}'", param="after")
    rows, has_more = list_batches(session, principal.tenant, limit=limit, after=previous)
    data = [batch_out(session, b) for b in rows]
    return json_response(
        {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": has_more,
        }
    )


class UnknownRoute:
    """Any other path or method under /openai/v1 gets OpenAI's 404, not the API's own 404 or 405.
    An ASGI app rather than a function, so its route takes every method, even ones no route names."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        error = OpenAIError(404, f"Invalid URL ({request.method} {request.url.path})")
        await error.response()(scope, receive, send)


async def http_error(request: Request, exc: Exception) -> Response:
    """The app's handler for HTTP errors raised outside any route (a path no route matches, as one
    holding a newline, which even the catch-all below cannot match): OpenAI's shape under PREFIX,
    FastAPI's own everywhere else."""
    assert isinstance(exc, StarletteHTTPException)
    if request.url.path.startswith(f"{PREFIX}/"):
        return from_exception(request, exc).response()
    return await http_exception_handler(request, exc)


# Last, so every route above is tried first.
router.add_route(f"{PREFIX}/{{rest:path}}", UnknownRoute(), include_in_schema=False)  # type: ignore[arg-type]
