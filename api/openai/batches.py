"""Batches: input files checked line by line, lines turned into jobs a chunk at a time, and output
and error files written once every job is final.

Validation is in two steps, as with OpenAI. An upload (POST /files) is refused with a 400 naming
the line when the file is not a batch file at all: a line that is not a JSON object, a missing or
repeated `custom_id`, a `method` other than POST, a `url` other than /v1/embeddings, a missing
`body`, more lines or bytes than the settings allow. A line whose `body` the embeddings endpoint
would refuse (an unknown model, an empty input, a bad `dimensions`...) is not the file's fault: it
becomes a line of the batch's error file with the 400 or 404 the endpoint would have answered,
and the other lines run.

The work after POST /batches is the API's batch loop's (api/background/openai_batches.py): every
step is one transaction on the locked batch row, so a crash (of the API, a worker, Redis) leaves
the batch where its last commit put it and the next step goes on from there; jobs are durable in
SQL like any other. Lines become jobs through `store_job` and `publish_after_commit`, the path of
POST /v1/jobs:batch.

Files are sealed with the tenant's data key, whole (api/files.py): an output or error file is
built in memory and sealed, and the input file is opened whole, kept open (in memory) from one
step of its batch to the next, and read from `submitted_bytes` (a plaintext offset) on.
"""

from __future__ import annotations

import io
import json
import logging
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import IO, Any

import orjson
from pydantic import BaseModel
from sqlalchemy.orm import Session

from api.files import tenant_files
from api.openai.embeddings import check_request, embeddings_body, parse_request, unix
from api.openai.errors import OpenAIError
from api.routes.jobs import store_job
from api.submitting import publish_after_commit
from db.models import Job, JobStatus, OpenAIBatch, OpenAIBatchRequest, OpenAIFile, utcnow
from db.openai_batches import (
    BatchStatus,
    active_job_count,
    cancel_batch_jobs,
    line_counts,
    lock_batch,
    new_file_id,
    request_page,
    set_timestamp,
)
from db.session import session_scope
from db.tenants import Principal
from tensorq.core.active_jobs import ActiveJobCounter
from tensorq.core.artifacts import ArtifactStore
from tensorq.core.broker import Publisher
from tensorq.core.crypto import DataIntegrityError
from tensorq.core.sealed_files import SealedFiles
from tensorq.core.settings import Settings

log = logging.getLogger(__name__)

ENDPOINT = "/v1/embeddings"
COMPLETION_WINDOW = "24h"
MAX_CUSTOM_ID = 512
PAGE = 500


@dataclass(frozen=True)
class JobSpec:
    """What `store_job` and `check_limits` read of a POST /v1/jobs item."""

    kind: str
    input: BaseModel
    device: str = "any"
    webhook: None = None


def _bad_line(line: int, message: str, param: str | None = None) -> OpenAIError:
    return OpenAIError(400, f"Line {line}: {message}", param=param, code="invalid_batch_file")


def check_batch_file(data: bytes, settings: Settings) -> int:
    """The number of requests in a batch input file; raises a 400 for a file that is not one."""
    if len(data) > settings.openai_file_max_bytes:
        raise OpenAIError(
            400, f"The file is larger than {settings.openai_file_max_bytes} bytes.", param="file"
        )
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()  # the final newline
    if not lines:
        raise OpenAIError(400, "The file is empty.", param="file")
    if len(lines) > settings.openai_file_max_lines:
        raise OpenAIError(
            400, f"The file has more than {settings.openai_file_max_lines} lines.", param="file"
        )
    seen: set[str] = set()
    for number, raw in enumerate(lines, start=1):
        try:
            item = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise _bad_line(number, "not valid JSON.") from None
        if not isinstance(item, dict):
            raise _bad_line(number, "not a JSON object.")
        custom_id = item.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id or len(custom_id) > MAX_CUSTOM_ID:
            raise _bad_line(
                number, f"`custom_id` must be a string of 1 to {MAX_CUSTOM_ID} characters.", "custom_id"
            )
        if "\x00" in custom_id:
            raise _bad_line(number, "`custom_id` must not contain NUL.", "custom_id")
        if custom_id in seen:
            raise _bad_line(
                number, f"duplicate custom_id {custom_id!r}; each must be unique in the file.", "custom_id"
            )
        seen.add(custom_id)
        if item.get("method") != "POST":
            raise _bad_line(number, "`method` must be POST.", "method")
        if item.get("url") != ENDPOINT:
            raise _bad_line(number, f"`url` must be {ENDPOINT} (the only endpoint batches run here).", "url")
        if not isinstance(item.get("body"), dict):
            raise _bad_line(number, "`body` must be a JSON object (an embeddings request).", "body")
        extra = set(item) - {"custom_id", "method", "url", "body"}
        if extra:
            raise _bad_line(number, f"unknown field(s) {sorted(extra)}.")
    return len(lines)


def file_relpath(file_id: str) -> str:
    return f"openai/files/{file_id}.jsonl"


def store_file(
    session: Session,
    files: SealedFiles,
    *,
    tenant: str,
    purpose: str,
    filename: str,
    data: bytes,
    lines: int,
    file_id: str | None = None,
) -> OpenAIFile:
    file_id = file_id or new_file_id()
    rel = file_relpath(file_id)
    files.write(files.store.path(rel), data)
    row = OpenAIFile(
        id=file_id,
        tenant=tenant,
        purpose=purpose,
        filename=filename[:255] or "upload.jsonl",
        bytes=len(data),
        lines=lines,
        path=rel,
        created_at=utcnow(),
    )
    session.add(row)
    return row


def file_out(row: OpenAIFile) -> dict[str, Any]:
    return {
        "id": row.id,
        "object": "file",
        "bytes": row.bytes,
        "created_at": unix(row.created_at),
        "filename": row.filename,
        "purpose": row.purpose,
        "status": "processed",
        "expires_at": None,
        "status_details": None,
    }


def batch_out(session: Session, batch: OpenAIBatch) -> dict[str, Any]:
    if batch.status in (BatchStatus.COMPLETED, BatchStatus.CANCELLED, BatchStatus.FAILED):
        completed, failed = batch.completed_lines, batch.failed_lines
    else:
        completed, failed = line_counts(session, batch.id)
    return {
        "id": batch.id,
        "object": "batch",
        "endpoint": batch.endpoint,
        "errors": batch.errors,
        "input_file_id": batch.input_file_id,
        "completion_window": batch.completion_window,
        "status": batch.status,
        "output_file_id": batch.output_file_id,
        "error_file_id": batch.error_file_id,
        "created_at": unix(batch.created_at),
        "in_progress_at": unix(batch.in_progress_at),
        "expires_at": unix(batch.expires_at),
        "finalizing_at": unix(batch.finalizing_at),
        "completed_at": unix(batch.completed_at),
        "failed_at": unix(batch.failed_at),
        "expired_at": None,
        "cancelling_at": unix(batch.cancelling_at),
        "cancelled_at": unix(batch.cancelled_at),
        "request_counts": {"total": batch.total_lines, "completed": completed, "failed": failed},
        "metadata": batch.batch_metadata,
    }


def new_batch(
    session: Session, *, batch_id: str, tenant: str, input_file: OpenAIFile, metadata: dict[str, str] | None
) -> OpenAIBatch:
    now = utcnow()
    batch = OpenAIBatch(
        id=batch_id,
        tenant=tenant,
        endpoint=ENDPOINT,
        completion_window=COMPLETION_WINDOW,
        input_file_id=input_file.id,
        status=BatchStatus.VALIDATING.value,
        batch_metadata=metadata,
        total_lines=input_file.lines,
        submitted_lines=0,
        submitted_bytes=0,
        completed_lines=0,
        failed_lines=0,
        created_at=now,
        expires_at=now + timedelta(hours=24),
    )
    session.add(batch)
    return batch


def cancel_batch(session: Session, batch: OpenAIBatch) -> list[uuid.UUID]:
    """Cancelling: no more lines become jobs; queued jobs are cancelled now, running ones asked to
    stop; the loop finalises the batch (as cancelled, with what finished) once none is left."""
    if batch.status in (BatchStatus.CANCELLING, BatchStatus.CANCELLED):
        return []
    if batch.status not in (BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS):
        raise OpenAIError(400, f"Cannot cancel a batch with status '{batch.status}'.", param="batch_id")
    batch.status = BatchStatus.CANCELLING.value
    set_timestamp(batch, "cancelling_at")
    return cancel_batch_jobs(session, batch.id)


class BatchWork:
    """The steps of the batch loop, each one transaction on the locked batch row."""

    def __init__(self, settings: Settings, publisher: Publisher) -> None:
        self.settings = settings
        self.publisher = publisher
        self.active_jobs = ActiveJobCounter(settings.redis_url)
        self.store = ArtifactStore(settings.artifact_dir)
        self.url = settings.sqlalchemy_url
        # The input file last opened (file id, its plaintext), for the batch's next chunk.
        self._input: tuple[str, bytes] | None = None

    def _open_input(self, source: OpenAIFile) -> bytes:
        """The opened content of a batch's input file (FileNotFoundError, DataIntegrityError)."""
        if self._input is not None and self._input[0] == source.id:
            return self._input[1]
        self._input = None
        data = tenant_files(self.settings, source.tenant).read(self.store.path(source.path))
        self._input = (source.id, data)
        return data

    def step(self, batch_id: str) -> bool:
        """Move the batch on by one step; whether anything changed (then step again soon)."""
        jobs: list[Job] = []
        finalise = False
        with session_scope(self.url) as session:
            batch = lock_batch(session, batch_id)
            if batch is None:
                return False
            status = BatchStatus(batch.status)
            if status in (BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS):
                if batch.submitted_lines < batch.total_lines:
                    jobs = self._submit_chunk(session, batch)
                    if batch.status == BatchStatus.FAILED:
                        return True
                    if not jobs and batch.submitted_lines < batch.total_lines:
                        return False  # the batch's jobs fill its allowance: wait for some to finish
                elif active_job_count(session, batch.id) == 0:
                    self._to_finalizing(batch)
                    finalise = True
            elif status == BatchStatus.CANCELLING:
                cancel_batch_jobs(session, batch.id)  # any a concurrent chunk added
                if active_job_count(session, batch.id) == 0:
                    self._to_finalizing(batch)
                    finalise = True
            elif status == BatchStatus.FINALIZING:
                finalise = True
            else:
                return False
        if jobs:
            with session_scope(self.url) as session:
                max_texts = self.settings.batch_max_texts if self.settings.batching else 1
                publish_after_commit(session, self.publisher, jobs, max_texts)
            for tenant, n in Counter(job.tenant for job in jobs).items():
                self.active_jobs.added(tenant, n)  # stored without the API's admission script
            return True
        if finalise:
            self._finalise(batch_id)
            return True
        return False

    def _to_finalizing(self, batch: OpenAIBatch) -> None:
        batch.status = BatchStatus.FINALIZING.value
        set_timestamp(batch, "finalizing_at")

    def _fail(self, batch: OpenAIBatch, code: str, message: str) -> None:
        batch.status = BatchStatus.FAILED.value
        batch.errors = {
            "object": "list",
            "data": [{"code": code, "message": message, "param": None, "line": None}],
        }
        set_timestamp(batch, "failed_at")
        batch.failed_lines = batch.total_lines - batch.submitted_lines

    def _submit_chunk(self, session: Session, batch: OpenAIBatch) -> list[Job]:
        room = self.settings.openai_batch_max_active_jobs - active_job_count(session, batch.id)
        n = min(room, self.settings.openai_batch_chunk_lines, batch.total_lines - batch.submitted_lines)
        if n <= 0:
            return []
        source = session.get(OpenAIFile, batch.input_file_id)
        try:
            if source is None:
                raise FileNotFoundError(batch.input_file_id)
            f = io.BytesIO(self._open_input(source))
            f.seek(batch.submitted_bytes)
            raw_lines = [f.readline() for _ in range(n)]
            offset = f.tell()
        except (OSError, DataIntegrityError) as exc:
            log.error("batch %s: input file unreadable: %s", batch.id, exc)
            self._fail(
                batch, "input_file_unreadable", f"The input file {batch.input_file_id} could not be read."
            )
            return []
        principal = Principal(tenant=batch.tenant, key_id=uuid.UUID(int=0), admin=False)
        jobs: list[Job] = []
        for i, raw in enumerate(raw_lines):
            number = batch.submitted_lines + i + 1
            item = json.loads(raw)  # checked at upload
            request = OpenAIBatchRequest(
                batch_id=batch.id, line=number, custom_id=item["custom_id"], options={}
            )
            try:
                call = check_request(session, self.settings, batch.tenant, parse_request(item["body"]))
            except OpenAIError as exc:
                request.error = {"status_code": exc.status_code, "body": exc.body()}
                body = item["body"]
                request.options = {"model": str(body.get("model"))[:200], "encoding_format": "float"}
            else:
                job = store_job(session, JobSpec(call.model.kind, call.params), self.settings, principal)
                jobs.append(job)
                request.job_id = job.id
                request.options = call.options
            session.add(request)
        batch.submitted_lines += n
        batch.submitted_bytes = offset
        batch.status = BatchStatus.IN_PROGRESS.value
        set_timestamp(batch, "in_progress_at")
        return jobs

    def _finalise(self, batch_id: str) -> None:
        """Write the output and error files, then record them and the final status, in one
        transaction; run again after a crash, it writes the same files under the same ids."""
        with session_scope(self.url) as session:
            batch = lock_batch(session, batch_id)
            if batch is None or batch.status != BatchStatus.FINALIZING:
                return
            hexid = batch.id.removeprefix("batch_")
            out_id, err_id = f"file-{hexid}o", f"file-{hexid}e"
            counts = {"out": 0, "err": 0}

            def lines(kind: str) -> Any:
                def write(f: IO[bytes]) -> None:  # into memory: sealed before it is written
                    after = 0
                    while page := request_page(session, batch.id, after, PAGE):
                        for req, job in page:
                            ok, line = self._result_line(batch, req, job)
                            if ok == (kind == "out"):
                                f.write(orjson.dumps(line) + b"\n")
                                counts[kind] += 1
                        after = page[-1][0].line
                    if kind == "err":
                        for line in self._unsubmitted_lines(session, batch):
                            f.write(orjson.dumps(line) + b"\n")
                            counts[kind] += 1

                return write

            sizes = {}
            files = tenant_files(self.settings, batch.tenant)
            for kind, file_id in (("out", out_id), ("err", err_id)):
                buffer = io.BytesIO()
                lines(kind)(buffer)
                files.write(self.store.path(file_relpath(file_id)), buffer.getvalue())
                sizes[kind] = len(buffer.getvalue())  # the content's size, as OpenAI reports it
            for kind, file_id in (("out", out_id), ("err", err_id)):
                rel = file_relpath(file_id)
                if counts[kind] == 0:
                    self.store.path(rel).unlink(missing_ok=True)
                    continue
                if session.get(OpenAIFile, file_id) is None:
                    session.add(
                        OpenAIFile(
                            id=file_id,
                            tenant=batch.tenant,
                            purpose="batch_output",
                            filename=f"{batch.id}_{'output' if kind == 'out' else 'error'}.jsonl",
                            bytes=sizes[kind],
                            lines=counts[kind],
                            path=rel,
                            created_at=utcnow(),
                        )
                    )
            batch.output_file_id = out_id if counts["out"] else None
            batch.error_file_id = err_id if counts["err"] else None
            batch.completed_lines, batch.failed_lines = counts["out"], counts["err"]
            if batch.cancelling_at is not None:
                batch.status = BatchStatus.CANCELLED.value
                set_timestamp(batch, "cancelled_at")
            else:
                batch.status = BatchStatus.COMPLETED.value
                set_timestamp(batch, "completed_at")
        if self._input is not None and batch.input_file_id == self._input[0]:
            self._input = None
        log.info("batch %s finalised: %d succeeded, %d failed", batch_id, counts["out"], counts["err"])

    @staticmethod
    def _result_line(
        batch: OpenAIBatch, req: OpenAIBatchRequest, job: Job | None
    ) -> tuple[bool, dict[str, Any]]:
        """(succeeded, the output or error file's line) for one submitted line."""
        line: dict[str, Any] = {
            "id": f"batch_req_{batch.id.removeprefix('batch_')}_{req.line}",
            "custom_id": req.custom_id,
        }
        if req.error is not None:
            response = {
                "status_code": req.error["status_code"],
                "request_id": None,
                "body": req.error["body"],
            }
            return False, {**line, "response": response, "error": None}
        if job is None:
            error = {"code": "request_lost", "message": "The request's job no longer exists (pruned)."}
            return False, {**line, "response": None, "error": error}
        if job.status == JobStatus.SUCCEEDED and job.result is not None:
            body = embeddings_body(job.result, req.options)
            return True, {
                **line,
                "response": {"status_code": 200, "request_id": str(job.id), "body": body},
                "error": None,
            }
        if job.status == JobStatus.CANCELLED:
            error = {"code": "batch_cancelled", "message": "The batch was cancelled before this request ran."}
            return False, {**line, "response": None, "error": error}
        message = f"{job.error_type or 'Error'}: {job.error_message or 'the job failed'}"
        body = {"error": {"message": message, "type": "server_error", "param": None, "code": None}}
        return False, {
            **line,
            "response": {"status_code": 500, "request_id": str(job.id), "body": body},
            "error": None,
        }

    def _unsubmitted_lines(self, session: Session, batch: OpenAIBatch) -> Iterator[dict[str, Any]]:
        """The lines the batch never turned into jobs (it was cancelled first), read from the file."""
        if batch.submitted_lines >= batch.total_lines:
            return
        source = session.get(OpenAIFile, batch.input_file_id)
        error = {"code": "batch_cancelled", "message": "The batch was cancelled before this request ran."}
        hexid = batch.id.removeprefix("batch_")
        try:
            assert source is not None
            f = io.BytesIO(self._open_input(source))
            f.seek(batch.submitted_bytes)
            for number, raw in enumerate(f, start=batch.submitted_lines + 1):
                custom_id = json.loads(raw)["custom_id"]
                yield {
                    "id": f"batch_req_{hexid}_{number}",
                    "custom_id": custom_id,
                    "response": None,
                    "error": error,
                }
        except (AssertionError, OSError, DataIntegrityError) as exc:
            log.error("batch %s: input file unreadable while finalising: %s", batch.id, exc)
