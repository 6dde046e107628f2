"""uvicorn's HTTP protocol with a bound on how long and how large a request's headers may be.

uvicorn bounds the idle time between requests (`timeout_keep_alive`) but not the time a client
takes to send a request's headers: a client sending a header line every few seconds held its
connection, and a slot of the server, for as long as it liked (a "slowloris"). Here the headers
of each request must be complete within `header_timeout` seconds of the connection opening or the
previous response ending, and within `max_header_bytes`; otherwise the connection is closed.
The body has its own bound (api.errors.BodyLimit, 408).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger(__name__)

# What a request's line and headers may take together (httptools itself sets no limit).
MAX_HEADER_BYTES = 64 * 1024


class HeaderTimeoutProtocol(HttpToolsProtocol):
    header_timeout: float = 10.0
    max_header_bytes: int = MAX_HEADER_BYTES

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None
        self._header_bytes = 0
        self._awaiting_headers = False

    def _await_headers(self) -> None:
        self._stop_header_timer()
        self._awaiting_headers = True
        self._header_bytes = 0
        self._header_timer = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def _stop_header_timer(self) -> None:
        self._awaiting_headers = False
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self._awaiting_headers and not self.transport.is_closing():
            log.info("closing a connection whose request headers took over %gs", self.header_timeout)
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_header_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._awaiting_headers:
            self._header_bytes += len(data)
        super().data_received(data)
        if self._awaiting_headers and self._header_bytes > self.max_header_bytes:
            log.info("closing a connection whose request headers passed %d bytes", self.max_header_bytes)
            self._stop_header_timer()
            self.transport.close()

    def on_headers_complete(self) -> None:
        self._stop_header_timer()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # The next request on this connection (unless one is already under way, pipelined).
        if not self.transport.is_closing() and not self.pipeline and self.cycle.response_complete:
            self._await_headers()


def protocol_class(header_timeout: float) -> type[HeaderTimeoutProtocol]:
    """The protocol class for `uvicorn.run(http=...)`, with this header timeout."""
    return type("HeaderTimeoutProtocol", (HeaderTimeoutProtocol,), {"header_timeout": header_timeout})
