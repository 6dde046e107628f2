from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Literal

from fastapi import APIRouter, Depends, Header, HTTPException, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from sqlalchemy.orm import Session

from api.auth import UNAUTHORIZED, current_principal
from api.deps import get_db, get_events, get_session, get_settings
from api.limits import admit, check_items
from api.responses import model_response
from api.schemas import (
    LISTED_PAYLOADS,
    ErrorOut,
    JobBatchCreate,
    JobBatchOut,
    JobCreate,
    JobList,
    JobOut,
    JobSummary,
)
from api.submitting import GroupCommit
from api.submitting import message_groups as message_groups  # re-exported (tests, older imports)
from db.jobs import cancel_job, new_job
from db.models import Job, JobStatus
from db.queries import encode_cursor, fetch_job, get_job, job_payloads, list_jobs
from db.rollouts import assign
from db.session import AsyncSessions
from db.snapshots import job_from_snapshot
from db.tenants import Principal
from tasks.registry import get_kind
from tensorq.core.broker import queue_for
from tensorq.core.events import EventListener
from tensorq.core.settings import Settings

log = logging.getLogger(__name__)

router = APIRouter(
    prefix="/v1/jobs", tags=["jobs"], dependencies=[Depends(current_principal)], responses=UNAUTHORIZED
)

SUBMIT_RESPONSES: dict[int | str, dict[str, Any]] = {
    413: {"model": ErrorOut, "description": "Body too large"},
    429: {
        "model": ErrorOut,
        "description": "Over the tenant's submission rate or active-job quota; see Retry-After",
    },
}

SSE_KEEPALIVE_SECONDS = 15
# The longest a request waits for a job (`?wait=` on GET, `Prefer: wait` on POST).
MAX_WAIT_S = 60.0
# Jobs per page of GET /v1/jobs when the request names no `limit`.
DEFAULT_PAGE = 50
# Listings with `include` read payloads (inputs, results: up to ~1.3 MB of JSON a job) a few at a
# time, this many bytes of JSON a read at most after the first, and at most this many such
# listings build at once per process, so the API's memory is bounded whatever the concurrency:
# about LIST_PAYLOAD_READERS x (TENSORQ_LIST_MAX_BYTES + the objects of one read), plus the
# answers being sent.
PAYLOAD_READ_BYTES = 512 * 1024
LIST_PAYLOAD_READERS = 2
_payload_readers = threading.BoundedSemaphore(LIST_PAYLOAD_READERS)

NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": ErrorOut, "description": "No such job"}}


PREFER_HELP = (
    "`wait` or `wait=N` (RFC 7240): hold the response until the job finishes, at most N seconds "
    f"(at most {MAX_WAIT_S:g}; `wait` alone means {MAX_WAIT_S:g}). Answers 201 with the final job, or "
    "202 with its state so far when time ran out; `Preference-Applied` says the wait used."
)


def preferred_wait(prefer: str | None) -> float | None:
    """Seconds asked for by a `Prefer: wait[=N]` header, capped; None when not asked."""
    for preference in (prefer or "").split(","):
        name, _, value = preference.split(";")[0].strip().partition("=")
        if name.strip().lower() != "wait":
            continue
        value = value.strip().strip('"')
        if not value:
            return MAX_WAIT_S
        try:
            seconds = float(value)
        except ValueError:
            seconds = -1.0
        if not 0 <= seconds < float("inf"):
            raise RequestValidationError(
                [
                    {
                        "loc": ("header", "prefer"),
                        "msg": "wait must be a number of seconds",
                        "type": "value_error",
                    }
                ]
            )
        return min(seconds, MAX_WAIT_S)
    return None


@router.post(
    "",
    status_code=202,
    response_model=JobOut,
    responses={
        **SUBMIT_RESPONSES,
        201: {"model": JobOut, "description": "With `Prefer: wait`: the job finished within the wait"},
        422: {"model": ErrorOut, "description": "Invalid body; `detail[].loc` names the field"},
    },
    summary="Submit a job (with `Prefer: wait`, and get its result in the same request)",
)
async def submit_job(
    request: Request,
    body: JobCreate,
    prefer: str | None = Header(default=None, description=PREFER_HELP),
    db: AsyncSessions = Depends(get_db),
    settings: Settings = Depends(get_settings),
    principal: Principal = Depends(current_principal),
    events: EventListener = Depends(get_events),
) -> Response:
    wait = preferred_wait(prefer)
    job_id = uuid.uuid4()

    def prepare(session: Session) -> Job:
        check_items(request, session, settings, principal, [body], ("body",))
        return build_job(session, body, settings, principal, job_id)

    async def submit() -> Job:
        job = await db.run(prepare)
        await admit(request, db, settings, principal.tenant, 1)
        await group_commit(request).commit([job])
        return job

    headers = {"Location": f"/v1/jobs/{job_id}"}
    if wait is None:
        job = await submit()
        return model_response(JobOut.from_row(job), 202, headers)

    async def load() -> Job | None:
        return await db.run(fetch_job, job_id, principal.tenant)

    # Submitted inside the watch, so not even a job finished at once can slip past it.
    found = await follow_job(events, db, job_id, submit, load, wait, until="finished")
    assert found is not None  # our own job, just committed
    headers["Preference-Applied"] = f"wait={wait:g}"
    return model_response(JobOut.from_row(found), 201 if found.status.terminal else 202, headers)


def group_commit(request: Request) -> GroupCommit:
    committer: GroupCommit = request.app.state.group_commit
    return committer


def store_job(
    session: Session, body: Any, settings: Settings, principal: Principal, job_id: uuid.UUID | None = None
) -> Job:
    """`build_job`, added to the session (stored by its commit)."""
    job = build_job(session, body, settings, principal, job_id)
    session.add(job)
    return job


def build_job(
    session: Session, body: Any, settings: Settings, principal: Principal, job_id: uuid.UUID | None = None
) -> Job:
    """The new job's row for a validated body (in no session); `session` reads a registered
    model's alias."""
    kind = get_kind(body.kind)
    job_id = job_id or uuid.uuid4()
    model = kind.model_of(body.input)
    # A registered model named through an alias gets its version (and shadow) now, by the job's id.
    registered = kind.category == "inference" and kind.reads_tenant_data
    version, shadow = assign(session, principal.tenant, model, job_id) if registered else (None, None)
    return new_job(
        job_id=job_id,
        tenant=principal.tenant,
        kind=kind.name,
        params=body.input.model_dump(mode="json"),
        queue=queue_for(kind.category, body.device),
        max_attempts=settings.max_attempts,
        model=model,
        webhook_url=None if body.webhook is None else str(body.webhook),
        batch_cost=kind.batch_cost(body.input),
        model_version=version,
        shadow_version=shadow,
    )


@router.post(
    ":batch",
    status_code=202,
    response_model=JobBatchOut,
    responses={
        **SUBMIT_RESPONSES,
        422: {"model": ErrorOut, "description": "Invalid item; `detail[].loc` names its index and field"},
    },
    summary="Submit many jobs in one request, stored in one transaction",
)
async def submit_jobs(
    request: Request,
    body: JobBatchCreate,
    db: AsyncSessions = Depends(get_db),
    settings: Settings = Depends(get_settings),
    principal: Principal = Depends(current_principal),
) -> Response:
    def prepare(session: Session) -> list[Job]:
        check_items(request, session, settings, principal, body.jobs, ("body", "jobs"))
        return [build_job(session, item, settings, principal) for item in body.jobs]

    jobs = await db.run(prepare)
    await admit(request, db, settings, principal.tenant, len(jobs))
    # Stored in one transaction, with whatever POST /v1/jobs requests are waiting to be.
    await group_commit(request).commit(jobs)
    return model_response(JobBatchOut(ids=[job.id for job in jobs]), 202)


@router.get("/{job_id}", response_model=JobOut, responses=NOT_FOUND, summary="Get a job")
async def read_job(
    job_id: uuid.UUID,
    wait: float = Query(default=0, ge=0, le=MAX_WAIT_S, description="Seconds to wait for the job to change"),
    until: Literal["change", "finished"] = Query(
        default="change",
        description="With `wait`: answer on any change of state or progress, or only when finished",
    ),
    db: AsyncSessions = Depends(get_db),
    events: EventListener = Depends(get_events),
    principal: Principal = Depends(current_principal),
) -> Response:
    async def load() -> Job | None:
        return await db.run(fetch_job, job_id, principal.tenant)

    job = await follow_job(events, db, job_id, load, load, wait, until)
    if job is None:
        raise HTTPException(status_code=404, detail="job not found")
    return model_response(JobOut.from_row(job))


async def follow_job(
    events: EventListener,
    db: AsyncSessions,
    job_id: uuid.UUID,
    first: Callable[[], Awaitable[Job | None]],
    load: Callable[[], Awaitable[Job | None]],
    wait: float,
    until: Literal["change", "finished"],
) -> Job | None:
    """`first()` the job, then re-`load()` it on each change event until it changed (or finished,
    with until="finished") or `wait` seconds passed; the job as last read."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    # Subscribed before the first read, so a change in between is not missed.
    with events.watch(job_id, end_only=until == "finished") as changed:
        job = await first()
        seen = None if job is None else (job.status, job.updated_at)
        while job is not None and not job.status.terminal and wait > 0:
            if until == "change" and (job.status, job.updated_at) != seen:
                break
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), remaining)
            row = changed.row
            changed.clear()
            job = job_from_event(row, db) or await load()
    return job


def job_from_event(row: dict[str, Any] | None, db: AsyncSessions) -> Job | None:
    """The committed row a finished event carried (see db.snapshots), or None: then the caller
    reads the job (no row sent, or one this version cannot read, as in a rolling upgrade)."""
    if row is None:
        return None
    try:
        return job_from_snapshot(row, db.engine.sync_engine)
    except (KeyError, ValueError, TypeError, AttributeError):
        log.warning("job event row unreadable; reading the job instead", exc_info=True)
        return None


@router.get(
    "/{job_id}/events",
    responses={
        200: {
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
            "description": "Server-sent events: `event: job` with the job object (JobOut) as `data`, one per "
            "change of state or progress, ending after the final status; `: keep-alive` comments meanwhile.",
        },
        **NOT_FOUND,
    },
    response_class=StreamingResponse,
    summary="Stream a job's changes (Server-Sent Events)",
)
async def job_events(
    request: Request,
    job_id: uuid.UUID,
    events: EventListener = Depends(get_events),
    principal: Principal = Depends(current_principal),
    db: AsyncSessions = Depends(get_db),
) -> StreamingResponse:
    # A short session per read: a watcher pins no pooled connection for a whole job.
    async def load() -> Job | None:
        return await db.run(get_job, job_id, principal.tenant)

    if await load() is None:
        raise HTTPException(status_code=404, detail="job not found")

    async def stream() -> AsyncIterator[str]:
        with events.watch(job_id) as changed:
            last: tuple[Any, ...] | None = None
            number = 0
            while True:
                job = await load()
                if job is None:
                    return
                if (job.status, job.updated_at) != last:
                    last = (job.status, job.updated_at)
                    number += 1
                    yield f"event: job\nid: {number}\ndata: {JobOut.from_row(job).model_dump_json()}\n\n"
                if job.status.terminal:
                    return
                try:
                    await asyncio.wait_for(changed.wait(), SSE_KEEPALIVE_SECONDS)
                except TimeoutError:
                    yield ": keep-alive\n\n"
                changed.clear()

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


INCLUDE_PATTERN = "^(input|result)(,(input|result))*$"


@router.get("", response_model=JobList, summary="List jobs, newest first")
def read_jobs(
    status: JobStatus | None = None,
    kind: str | None = Query(default=None, max_length=64),
    limit: int | None = Query(
        default=None,
        ge=1,
        description=f"Jobs per page: {DEFAULT_PAGE} unless given, at most TENSORQ_LIST_PAGE_MAX (200 by default)",
    ),
    cursor: str | None = Query(default=None, max_length=200, description="next_cursor of the previous page"),
    include: str | None = Query(
        default=None,
        pattern=INCLUDE_PATTERN,
        description="`input`, `result` or `input,result`: add them to each job. A page then ends "
        "where its JSON would pass TENSORQ_LIST_MAX_BYTES (4 MiB by default; at least one job).",
    ),
    session: Session = Depends(get_session),
    settings: Settings = Depends(get_settings),
    principal: Principal = Depends(current_principal),
) -> Response:
    # The bound is a setting, so it is checked here rather than by the parameter; a page asked
    # for is refused above it, the default one is cut to it.
    if limit is None:
        limit = min(DEFAULT_PAGE, settings.list_page_max)
    elif limit > settings.list_page_max:
        raise RequestValidationError(
            [
                {
                    "loc": ("query", "limit"),
                    "msg": f"Input should be less than or equal to {settings.list_page_max}",
                    "type": "less_than_equal",
                    "input": limit,
                    "ctx": {"le": settings.list_page_max},
                }
            ]
        )
    try:
        jobs, next_cursor = list_jobs(
            session, tenant=principal.tenant, status=status, kind=kind, limit=limit, cursor=cursor
        )
    except ValueError:
        raise RequestValidationError(
            [{"loc": ("query", "cursor"), "msg": "malformed cursor", "type": "value_error"}]
        ) from None
    fields = [f for f in LISTED_PAYLOADS if f in (include or "").split(",")]
    if not fields:
        return page_response(session, jobs, next_cursor, [], settings.list_max_bytes)
    with _payload_readers:
        response = page_response(session, jobs, next_cursor, fields, settings.list_max_bytes)
        # The payloads' objects were freed, but glibc keeps such memory in the thread's arena; give
        # it back, or each of the threadpool's threads would keep its largest listing's worth.
        _trim_heap()
    return response


def _trim_heap() -> None:
    if _malloc_trim is not None:
        _malloc_trim(0)


try:
    _malloc_trim: Callable[[int], int] | None = ctypes.CDLL(None).malloc_trim
    # Buffers of 256 KiB and more are always mmapped, so they go back to the system when freed.
    # glibc otherwise raises this threshold after each large free (up to 32 MiB), and opening
    # sealed results (docs/security.md: base64 text -> bytes -> plaintext, ~1-2 MB each) then
    # left their copies in the heap: 174 MB of growth in test_hardening's listings, 150 allowed.
    ctypes.CDLL(None).mallopt(-3, 256 * 1024)  # M_MMAP_THRESHOLD
except (OSError, AttributeError):  # not glibc
    _malloc_trim = None


def page_response(
    session: Session, jobs: list[Job], next_cursor: str | None, fields: list[str], max_bytes: int
) -> Response:
    """The page's JSON, built job by job: it ends before the job that would take it past
    `max_bytes` (with a cursor to go on from there), so one answer stays under the bound."""
    # Built in place: a list of parts joined at the end would hold the page twice.
    body = bytearray(b'{"items":[')
    reserve = 64  # the closing bytes and a cursor
    count = 0
    batch = 1
    cut = False
    while count < len(jobs) and not cut:
        chunk = jobs[count : count + batch]
        payloads = job_payloads(session, [j.id for j in chunk], fields) if fields else {}
        for job in chunk:
            part = JobSummary.from_row(job, payloads.pop(job.id, None)).model_dump_json().encode()
            if count and len(body) + len(part) + 1 + reserve > max_bytes:
                cut = True
                break
            if count:
                body += b","
            body += part
            count += 1
        del payloads, part
        # Read as many payloads at once as fit PAYLOAD_READ_BYTES at the sizes seen so far.
        batch = max(1, min(50, PAYLOAD_READ_BYTES * count // len(body)))
    if cut:
        last = jobs[count - 1]
        next_cursor = encode_cursor(last.created_at, last.id)
    body += b'],"next_cursor":' + json.dumps(next_cursor).encode() + b"}"
    return Response(content=memoryview(body), media_type="application/json")


@router.post(
    "/{job_id}/cancel",
    response_model=JobOut,
    responses={**NOT_FOUND, 409: {"model": ErrorOut, "description": "The job already finished"}},
    summary="Cancel a job: at once if queued, at its next check if running",
)
def cancel(
    request: Request,
    job_id: uuid.UUID,
    session: Session = Depends(get_session),
    principal: Principal = Depends(current_principal),
) -> JobOut:
    job, cancelled = cancel_job(session, job_id, principal.tenant)
    session.commit()
    if cancelled:
        request.app.state.active_counter.finished([principal.tenant])
    if job is None:
        raise HTTPException(status_code=404, detail="job not found")
    # A job cancelled by an earlier call is as finished as a succeeded one; nothing changed to announce.
    if job.status.terminal and not cancelled:
        raise HTTPException(status_code=409, detail=f"job already {job.status.value}")
    # Wake long-polls and event streams on every API replica (a queued job just became final).
    request.app.state.event_publisher.changed([job_id], final=job.status.terminal)
    return JobOut.from_row(job)
