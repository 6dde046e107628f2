"""Python clients for the tensorq HTTP API: `Client` (blocking) and `AsyncClient` (asyncio).

Both have the same methods and return the API's JSON as plain dicts (the job object is described
in README.md). Every HTTP error status becomes a `TensorqError` carrying the status code and the
API's `detail`; a failure to reach the API becomes its subclass `TensorqConnectionError`.

    with Client() as tq:
        job = tq.submit("embed", {"texts": ["hello"]})
        job = tq.wait(job["id"], timeout=60)
        job = tq.run("embed", {"texts": ["hello"]})  # both at once, in one request if quick
"""

from __future__ import annotations

import builtins
import contextlib
import inspect
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self
from urllib.parse import quote

import httpx

from tensorq.core.settings import get_settings

Job = dict[str, Any]
Device = Literal["any", "gpu", "cpu"]
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
# The API's own ceiling for `?wait=`; longer waits are several requests.
MAX_WAIT_S = 60.0
# A long-poll request may legitimately take `wait` seconds; the read timeout must outlast it.
WAIT_SLACK_S = 15.0
DEFAULT_TIMEOUT_S = 30.0


class TensorqError(Exception):
    """The API answered 4xx/5xx (`status_code`), or, in subclasses, could not be reached.

    `detail` is the API's JSON `detail`: a message string, or FastAPI's list of
    `{"loc": [...], "msg": ..., "type": ...}` naming each bad field."""

    def __init__(self, status_code: int | None, detail: Any, *, method: str = "", url: str = "") -> None:
        self.status_code = status_code
        self.detail = detail
        self.method = method
        self.url = url
        super().__init__(self._message())

    def _message(self) -> str:
        where = f"{self.method} {self.url}: " if self.method else ""
        status = f"{self.status_code} " if self.status_code is not None else ""
        return f"{where}{status}{format_detail(self.detail)}"

    @property
    def fields(self) -> builtins.list[str]:
        """Dotted locations of the bad fields in a validation error, e.g. `body.input.texts`."""
        if not isinstance(self.detail, builtins.list):
            return []
        return [
            ".".join(str(part) for part in item.get("loc", ()))
            for item in self.detail
            if isinstance(item, dict)
        ]


class TensorqConnectionError(TensorqError):
    """The API could not be reached, or did not answer in time (`status_code` is None)."""


class WaitTimeout(TensorqError):
    """`wait` ran out of time before the job finished; `job` is the last state seen."""

    def __init__(self, job: Job, timeout: float) -> None:
        self.job = job
        super().__init__(None, f"job {job['id']} still {job['status']} after {timeout:g} s")


def page_cap(exc: TensorqError) -> int | None:
    """The API's largest page, when `exc` is its refusal of a list's `limit` (the 422 names it)."""
    if exc.status_code != 422 or not isinstance(exc.detail, builtins.list):
        return None
    for d in exc.detail:
        if isinstance(d, dict) and builtins.list(d.get("loc", ())) == ["query", "limit"]:
            with contextlib.suppress(TypeError, ValueError, KeyError):
                return int(d["ctx"]["le"])
    return None


def format_detail(detail: Any) -> str:
    """One line per validation error (`loc: msg`), or the message as it is."""
    if isinstance(detail, builtins.list) and all(isinstance(d, dict) for d in detail):
        return "; ".join(
            f"{'.'.join(str(p) for p in d.get('loc', ()))}: {d.get('msg', d.get('type', '?'))}"
            for d in detail
        )
    return str(detail)


def default_base_url() -> str:
    settings = get_settings()
    # The API's bind address may be a wildcard, which is not an address to connect to.
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(settings.api_host, settings.api_host)
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{settings.api_port}"


def auth_headers(api_key: str | None) -> dict[str, str]:
    """`Authorization: Bearer` with `api_key`, else TENSORQ_API_KEY; none when neither is set."""
    if api_key is None:
        configured = get_settings().api_key
        api_key = configured.get_secret_value() if configured else None
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _seg(value: str) -> str:
    """One path segment: a name holding '/' or '..' must not reach another route.

    Dots are escaped too, since httpx resolves a bare `..` segment before sending."""
    return quote(str(value), safe="").replace(".", "%2E")


@dataclass(frozen=True)
class _Call:
    """One request, built once and sent by either client."""

    method: str
    path: str
    params: dict[str, Any] = field(default_factory=dict)
    json: Any = None
    content: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    timeout: float | None = None  # None: the client's own


def _submit_call(
    kind: str, input: dict[str, Any], device: Device, webhook: str | None, wait: float | None = None
) -> _Call:
    body: dict[str, Any] = {"kind": kind, "input": input, "device": device}
    if webhook is not None:
        body["webhook"] = webhook
    if wait is None:
        return _Call("POST", "/v1/jobs", json=body)
    # Prefer: wait holds the response until the job finishes: one request for a quick job.
    wait = round(min(MAX_WAIT_S, max(0.0, wait)), 3)
    return _Call(
        "POST", "/v1/jobs", json=body, headers={"Prefer": f"wait={wait:g}"}, timeout=wait + WAIT_SLACK_S
    )


def _submit_many_call(jobs: Sequence[tuple[str, dict[str, Any]]], device: Device) -> _Call:
    items = [{"kind": kind, "input": input, "device": device} for kind, input in jobs]
    return _Call("POST", "/v1/jobs:batch", json={"jobs": items})


def _list_call(
    status: str | None, kind: str | None, limit: int, cursor: str | None, include: Sequence[str] = ()
) -> _Call:
    # Listed jobs carry no input or result unless `include` names them ("input", "result").
    params = {
        "status": status,
        "kind": kind,
        "limit": limit,
        "cursor": cursor,
        "include": ",".join(include) or None,
    }
    return _Call("GET", "/v1/jobs", params={k: v for k, v in params.items() if v is not None})


def _upload_call(data: str | os.PathLike[str] | bytes, name: str | None) -> _Call:
    # A str is a path, never content: JSONL content is passed as bytes.
    body = data if isinstance(data, bytes) else Path(data).read_bytes()
    return _Call(
        "POST",
        "/v1/datasets",
        params={"name": name} if name is not None else {},
        content=body,
        headers={"content-type": "application/x-ndjson"},
    )


def _alias_path(name: str, alias: str) -> str:
    return f"/v1/models/{_seg(name)}/aliases/{_seg(alias)}"


def _alias_call(name: str, alias: str, version: int) -> _Call:
    return _Call("PUT", _alias_path(name, alias), json={"version": version})


def _split_call(
    name: str,
    alias: str,
    split: dict[int, int],
    shadow: tuple[int, int] | None,
    guard: tuple[float, int] | None,
) -> _Call:
    body: dict[str, Any] = {"split": {str(v): p for v, p in split.items()}}
    if shadow is not None:
        body["shadow"] = {"version": shadow[0], "percent": shadow[1]}
    if guard is not None:
        body["guard"] = {"max_failure_rate": guard[0], "min_jobs": guard[1]}
    return _Call("PUT", _alias_path(name, alias), json=body)


def _rollback_call(name: str, alias: str, reason: str | None) -> _Call:
    return _Call(
        "POST", f"{_alias_path(name, alias)}/rollback", json={"reason": reason} if reason is not None else {}
    )


def _run_wait(timeout: float | None) -> float:
    return MAX_WAIT_S if timeout is None else min(timeout, MAX_WAIT_S)


def _time_left(job: Job, timeout: float | None, started: float) -> float | None:
    """What is left of `run`'s timeout after its submit; WaitTimeout when nothing is."""
    if timeout is None:
        return None
    left = timeout - (time.monotonic() - started)
    if left <= 0:
        raise WaitTimeout(job, timeout)
    return left


class _Waiter:
    """The long-poll loop's decisions, shared by both clients: what to ask next, when to stop."""

    def __init__(self, job_id: str, timeout: float | None, follow_changes: bool) -> None:
        self.job_id = job_id
        self.timeout = timeout
        self.deadline = None if timeout is None else time.monotonic() + timeout
        # until=change answers on every progress update too, which only a watcher needs.
        self.until = "change" if follow_changes else "finished"
        self.last: Job | None = None

    def call(self) -> _Call:
        remaining = MAX_WAIT_S if self.deadline is None else max(0.0, self.deadline - time.monotonic())
        wait = round(min(MAX_WAIT_S, remaining), 3)
        return _Call(
            "GET",
            f"/v1/jobs/{_seg(self.job_id)}",
            params={"wait": wait, "until": self.until},
            timeout=wait + WAIT_SLACK_S,
        )

    def changed(self, job: Job) -> bool:
        new = job != self.last
        self.last = job
        return new

    def finished(self, job: Job) -> bool:
        """True when the job is final; raises WaitTimeout when time is up first."""
        if job["status"] in TERMINAL:
            return True
        if self.deadline is not None and time.monotonic() >= self.deadline:
            raise WaitTimeout(job, self.timeout or 0.0)
        return False


def _decode(response: httpx.Response, call: _Call) -> Any:
    if response.is_error:
        try:
            detail = response.json().get("detail", response.text)
        except (ValueError, AttributeError):
            # Not the API's JSON (a proxy's error page, say): keep the start of the body.
            detail = response.text[:500] or response.reason_phrase
        raise TensorqError(response.status_code, detail, method=call.method, url=str(response.url))
    try:
        return response.json()
    except ValueError:
        raise TensorqError(
            response.status_code, "response is not JSON", method=call.method, url=str(response.url)
        ) from None


def _request_kwargs(call: _Call) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"params": call.params, "headers": call.headers}
    if call.json is not None:
        kwargs["json"] = call.json
    if call.content is not None:
        kwargs["content"] = call.content
    if call.timeout is not None:
        kwargs["timeout"] = call.timeout
    return kwargs


def _connection_error(exc: httpx.TransportError, call: _Call, base_url: str) -> TensorqConnectionError:
    reason = str(exc) or type(exc).__name__
    return TensorqConnectionError(
        None, f"cannot reach {base_url}: {reason}", method=call.method, url=call.path
    )


class Client:
    """Blocking client. `base_url` defaults to http://TENSORQ_API_HOST:TENSORQ_API_PORT and
    `api_key` to TENSORQ_API_KEY."""

    def __init__(
        self,
        base_url: str | None = None,
        *,
        api_key: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = (base_url or default_base_url()).rstrip("/")
        self._http = httpx.Client(
            base_url=self.base_url, timeout=timeout, transport=transport, headers=auth_headers(api_key)
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, call: _Call) -> Any:
        try:
            response = self._http.request(call.method, call.path, **_request_kwargs(call))
        except httpx.TransportError as exc:
            raise _connection_error(exc, call, self.base_url) from exc
        return _decode(response, call)

    def submit(
        self, kind: str, input: dict[str, Any], *, device: Device = "any", webhook: str | None = None
    ) -> Job:
        """Submit one job; returns the job object (status `queued`)."""
        job: Job = self._send(_submit_call(kind, input, device, webhook))
        return job

    def run(
        self, kind: str, input: dict[str, Any], *, device: Device = "any", timeout: float | None = None
    ) -> Job:
        """Submit one job and return it finished: one request (`Prefer: wait`) when it finishes
        within a minute, long-polls after that. Raises WaitTimeout after `timeout` seconds."""
        started = time.monotonic()
        job: Job = self._send(_submit_call(kind, input, device, None, wait=_run_wait(timeout)))
        if job["status"] in TERMINAL:
            return job
        return self.wait(job["id"], timeout=_time_left(job, timeout, started))

    def submit_many(
        self, jobs: Sequence[tuple[str, dict[str, Any]]], *, device: Device = "any"
    ) -> builtins.list[str]:
        """Submit up to 1000 `(kind, input)` jobs, stored all or none; returns their ids in order."""
        ids: builtins.list[str] = self._send(_submit_many_call(jobs, device))["ids"]
        return ids

    def get(self, job_id: str) -> Job:
        job: Job = self._send(_Call("GET", f"/v1/jobs/{_seg(job_id)}"))
        return job

    def wait(
        self, job_id: str, timeout: float | None = None, on_change: Callable[[Job], object] | None = None
    ) -> Job:
        """Long-poll until the job is succeeded, failed or cancelled, and return it.

        `on_change(job)` is called with the first state seen and every changed one (status or
        progress) after it, the final one included. Raises WaitTimeout after `timeout` seconds."""
        waiter = _Waiter(job_id, timeout, follow_changes=on_change is not None)
        while True:
            job: Job = self._send(waiter.call())
            if waiter.changed(job) and on_change is not None:
                on_change(job)
            if waiter.finished(job):
                return job

    def cancel(self, job_id: str) -> Job:
        """Cancel a queued job at once or ask a running one to stop; 409 if it already finished."""
        job: Job = self._send(_Call("POST", f"/v1/jobs/{_seg(job_id)}/cancel"))
        return job

    def list(
        self,
        status: str | None = None,
        kind: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
        include: Sequence[str] = (),
    ) -> dict[str, Any]:
        """One page, newest first: `{"items": [job, ...], "next_cursor": str | None}`; jobs without
        `input` and `result` unless `include` names them (the page may then hold fewer jobs)."""
        page: dict[str, Any] = self._send(_list_call(status, kind, limit, cursor, include))
        return page

    def iter_jobs(
        self,
        status: str | None = None,
        kind: str | None = None,
        page_size: int = 50,
        include: Sequence[str] = (),
    ) -> Iterator[Job]:
        """Every matching job, newest first, following `next_cursor` page by page (in pages no
        larger than the API allows, `TENSORQ_LIST_PAGE_MAX` there)."""
        cursor: str | None = None
        while True:
            try:
                page = self.list(status=status, kind=kind, limit=page_size, cursor=cursor, include=include)
            except TensorqError as exc:
                if (cap := page_cap(exc)) is None or cap >= page_size:
                    raise
                page_size = cap
                continue
            yield from page["items"]
            cursor = page["next_cursor"]
            if cursor is None:
                return

    def upload_dataset(self, data: str | os.PathLike[str] | bytes, name: str | None = None) -> dict[str, Any]:
        """Upload JSONL `{"text", "label"}` rows, from a file path or as bytes."""
        dataset: dict[str, Any] = self._send(_upload_call(data, name))
        return dataset

    def datasets(self, limit: int = 100) -> builtins.list[dict[str, Any]]:
        """The tenant's datasets, newest first."""
        items: builtins.list[dict[str, Any]] = self._send(
            _Call("GET", "/v1/datasets", params={"limit": limit})
        )["items"]
        return items

    def models(self) -> builtins.list[dict[str, Any]]:
        items: builtins.list[dict[str, Any]] = self._send(_Call("GET", "/v1/models"))["items"]
        return items

    def model(self, name: str) -> dict[str, Any]:
        model: dict[str, Any] = self._send(_Call("GET", f"/v1/models/{_seg(name)}"))
        return model

    def set_alias(self, name: str, alias: str, version: int) -> dict[str, Any]:
        """Point `alias` (e.g. production) of model `name` at `version`."""
        row: dict[str, Any] = self._send(_alias_call(name, alias, version))
        return row

    def set_split(
        self,
        name: str,
        alias: str,
        split: dict[int, int],
        *,
        shadow: tuple[int, int] | None = None,
        guard: tuple[float, int] | None = None,
    ) -> dict[str, Any]:
        """Split the alias's new jobs between versions (`{3: 90, 4: 10}`, percentages summing to
        100), optionally also running `shadow` = (version, percent) of them on a shadow version, and
        with `guard` = (max_failure_rate, min_jobs) rolling the split back when a candidate fails."""
        row: dict[str, Any] = self._send(_split_call(name, alias, split, shadow, guard))
        return row

    def alias(self, name: str, alias: str) -> dict[str, Any]:
        """The alias's assignment, its history (newest first) and per-version statistics."""
        detail: dict[str, Any] = self._send(_Call("GET", _alias_path(name, alias)))
        return detail

    def rollback(self, name: str, alias: str, reason: str | None = None) -> dict[str, Any]:
        """Restore the alias's previous assignment; returns the alias as `alias` does."""
        detail: dict[str, Any] = self._send(_rollback_call(name, alias, reason))
        return detail


class AsyncClient:
    """The asyncio twin of `Client`: the same methods, awaited."""

    def __init__(
        self,
        base_url: str | None = None,
        *,
        api_key: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = (base_url or default_base_url()).rstrip("/")
        self._http = httpx.AsyncClient(
            base_url=self.base_url, timeout=timeout, transport=transport, headers=auth_headers(api_key)
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, call: _Call) -> Any:
        try:
            response = await self._http.request(call.method, call.path, **_request_kwargs(call))
        except httpx.TransportError as exc:
            raise _connection_error(exc, call, self.base_url) from exc
        return _decode(response, call)

    async def submit(
        self, kind: str, input: dict[str, Any], *, device: Device = "any", webhook: str | None = None
    ) -> Job:
        job: Job = await self._send(_submit_call(kind, input, device, webhook))
        return job

    async def run(
        self, kind: str, input: dict[str, Any], *, device: Device = "any", timeout: float | None = None
    ) -> Job:
        started = time.monotonic()
        job: Job = await self._send(_submit_call(kind, input, device, None, wait=_run_wait(timeout)))
        if job["status"] in TERMINAL:
            return job
        return await self.wait(job["id"], timeout=_time_left(job, timeout, started))

    async def submit_many(
        self, jobs: Sequence[tuple[str, dict[str, Any]]], *, device: Device = "any"
    ) -> builtins.list[str]:
        ids: builtins.list[str] = (await self._send(_submit_many_call(jobs, device)))["ids"]
        return ids

    async def get(self, job_id: str) -> Job:
        job: Job = await self._send(_Call("GET", f"/v1/jobs/{_seg(job_id)}"))
        return job

    async def wait(
        self,
        job_id: str,
        timeout: float | None = None,
        on_change: Callable[[Job], object | Awaitable[object]] | None = None,
    ) -> Job:
        """As `Client.wait`; `on_change` may be a plain function or a coroutine function."""
        waiter = _Waiter(job_id, timeout, follow_changes=on_change is not None)
        while True:
            job: Job = await self._send(waiter.call())
            if waiter.changed(job) and on_change is not None:
                outcome = on_change(job)
                if inspect.isawaitable(outcome):
                    await outcome
            if waiter.finished(job):
                return job

    async def cancel(self, job_id: str) -> Job:
        job: Job = await self._send(_Call("POST", f"/v1/jobs/{_seg(job_id)}/cancel"))
        return job

    async def list(
        self,
        status: str | None = None,
        kind: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
        include: Sequence[str] = (),
    ) -> dict[str, Any]:
        page: dict[str, Any] = await self._send(_list_call(status, kind, limit, cursor, include))
        return page

    async def iter_jobs(
        self,
        status: str | None = None,
        kind: str | None = None,
        page_size: int = 50,
        include: Sequence[str] = (),
    ) -> AsyncIterator[Job]:
        cursor: str | None = None
        while True:
            try:
                page = await self.list(
                    status=status, kind=kind, limit=page_size, cursor=cursor, include=include
                )
            except TensorqError as exc:
                if (cap := page_cap(exc)) is None or cap >= page_size:
                    raise
                page_size = cap
                continue
            for job in page["items"]:
                yield job
            cursor = page["next_cursor"]
            if cursor is None:
                return

    async def upload_dataset(
        self, data: str | os.PathLike[str] | bytes, name: str | None = None
    ) -> dict[str, Any]:
        # The file is read in one go: uploads are capped (32 MiB by default) and sent whole anyway.
        dataset: dict[str, Any] = await self._send(_upload_call(data, name))
        return dataset

    async def datasets(self, limit: int = 100) -> builtins.list[dict[str, Any]]:
        """The tenant's datasets, newest first."""
        page = await self._send(_Call("GET", "/v1/datasets", params={"limit": limit}))
        items: builtins.list[dict[str, Any]] = page["items"]
        return items

    async def models(self) -> builtins.list[dict[str, Any]]:
        items: builtins.list[dict[str, Any]] = (await self._send(_Call("GET", "/v1/models")))["items"]
        return items

    async def model(self, name: str) -> dict[str, Any]:
        model: dict[str, Any] = await self._send(_Call("GET", f"/v1/models/{_seg(name)}"))
        return model

    async def set_alias(self, name: str, alias: str, version: int) -> dict[str, Any]:
        row: dict[str, Any] = await self._send(_alias_call(name, alias, version))
        return row

    async def set_split(
        self,
        name: str,
        alias: str,
        split: dict[int, int],
        *,
        shadow: tuple[int, int] | None = None,
        guard: tuple[float, int] | None = None,
    ) -> dict[str, Any]:
        row: dict[str, Any] = await self._send(_split_call(name, alias, split, shadow, guard))
        return row

    async def alias(self, name: str, alias: str) -> dict[str, Any]:
        detail: dict[str, Any] = await self._send(_Call("GET", _alias_path(name, alias)))
        return detail

    async def rollback(self, name: str, alias: str, reason: str | None = None) -> dict[str, Any]:
        detail: dict[str, Any] = await self._send(_rollback_call(name, alias, reason))
        return detail
