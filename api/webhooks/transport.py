"""Sending one webhook: a POST to a checked address whose whole exchange ends by a deadline.

Receivers are not trusted to answer promptly: the delivery's budget bounds connecting, sending and
the answer together, and only the answer's first few KiB are read.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Iterable
from typing import Any

import httpcore
import httpx

MAX_ANSWER_BYTES = 4096

_delivery = threading.local()  # .deadline: time.monotonic() by which this thread's delivery ends


def _time_left(timeout: float | None, expired: type[Exception]) -> float | None:
    """An operation's own timeout, cut to what is left of the delivery it serves."""
    deadline: float | None = getattr(_delivery, "deadline", None)
    if deadline is None:
        return timeout
    left = deadline - time.monotonic()
    if left <= 0:
        raise expired("the webhook delivery ran out of time")
    return left if timeout is None else min(timeout, left)


class _DeadlineStream(httpcore.NetworkStream):
    """A connection whose every read, write and TLS handshake ends by the delivery's deadline.

    httpcore's timeouts apply to each operation anew, so a receiver sending a byte at a time, each
    within the timeout, could hold a delivery forever.
    """

    def __init__(self, inner: httpcore.NetworkStream) -> None:
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, _time_left(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        # Send by send here: the inner stream gives each send the full timeout again, so a receiver
        # that takes a few bytes at a time could stretch one write.
        sock: socket.socket = self._inner.get_extra_info("socket")
        view = memoryview(buffer)
        while view:
            sock.settimeout(_time_left(timeout, httpcore.WriteTimeout))
            try:
                sent = sock.send(view)
            except TimeoutError as exc:
                raise httpcore.WriteTimeout(exc) from exc
            except OSError as exc:
                raise httpcore.WriteError(exc) from exc
            view = view[sent:]

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.NetworkStream:
        timeout = _time_left(timeout, httpcore.ConnectTimeout)
        return _DeadlineStream(self._inner.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _DeadlineBackend(httpcore.SyncBackend):
    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        timeout = _time_left(timeout, httpcore.ConnectTimeout)
        return _DeadlineStream(super().connect_tcp(host, port, timeout, local_address, socket_options))


class Transport:
    """POSTs on a pool that keeps no connection for a later delivery: requests go to a checked IP
    address, so a pool would key a kept TLS connection by that address, and a delivery to another
    host name on the same address would ride a connection whose certificate was checked for the
    first one."""

    def __init__(self, max_connections: int, budget: float) -> None:
        self.budget = budget
        self.http = httpcore.ConnectionPool(
            ssl_context=httpx.create_ssl_context(),
            max_connections=max_connections,
            max_keepalive_connections=0,
            network_backend=_DeadlineBackend(),
        )

    def post(self, url: str, body: bytes, headers: dict[str, str], sni: str, deadline: float) -> int:
        """The status of the receiver's answer, all by `deadline`. Redirects are not followed."""
        _delivery.deadline = deadline
        try:
            timeouts = dict.fromkeys(("connect", "read", "write", "pool"), self.budget)
            with self.http.stream(
                "POST",
                url,
                headers=list(headers.items()),
                content=body,
                extensions={"timeout": timeouts, "sni_hostname": sni},
            ) as response:
                # The status is the answer. A long, endless or slow body is dropped with its connection.
                read = 0
                try:
                    for chunk in response.iter_stream():
                        read += len(chunk)
                        if read >= MAX_ANSWER_BYTES:
                            break
                except (httpcore.TimeoutException, httpcore.NetworkError, httpcore.RemoteProtocolError):
                    pass
                return response.status
        finally:
            _delivery.deadline = None

    def close(self) -> None:
        self.http.close()
