"""Webhooks: a job's final state POSTed to the URL it was submitted with, signed, retried.

Signature (per-tenant secret, `tensorq keys webhook-secret`):
    X-Tensorq-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>." + body)>
Receivers recompute it over the raw body and reject old timestamps (see `verify_signature`).

Destinations are checked twice: at submission (literal addresses, `localhost`) and before every
delivery, when the host is resolved and the request is sent to the checked address itself, so a
DNS answer that changes in between cannot point a delivery inside the network.

Receivers are not trusted to answer promptly: `webhook_timeout_seconds` bounds a whole delivery
(connecting, sending, the answer), and only the answer's first few KiB are read.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import random
import socket
import ssl
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpcore
import httpx
from sqlalchemy import select

from api.schemas import JobOut
from db.models import Job, Tenant, utcnow
from db.session import session_scope
from db.webhooks import claim_due_webhooks, record_webhook_attempt
from tensorq import __version__
from tensorq.settings import Settings

log = logging.getLogger(__name__)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
SIGNATURE_HEADER = "X-Tensorq-Signature"
MAX_ERROR_CHARS = 500
MAX_ANSWER_BYTES = 4096


class UnsafeDestination(ValueError):
    pass


# IPv6 addresses that reach an IPv4 host: Python calls the NAT64 and IPv4-compatible ones global
# whatever IPv4 address they carry, so `[64:ff9b::a9fe:a9fe]` would reach 169.254.169.254.
NAT64 = ipaddress.ip_network("64:ff9b::/96")
IPV4_COMPATIBLE = ipaddress.ip_network("::/96")
# Local-use NAT64 (RFC 8215): where the IPv4 address sits is the translator's choice, so it cannot be read.
NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in NAT64 or ip in IPV4_COMPATIBLE:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip.sixtofour


def _allowed(ip: IPAddress, allowed: Sequence[IPNetwork]) -> bool:
    if any(ip.version == net.version and ip in net for net in allowed):
        return True
    if isinstance(ip, ipaddress.IPv6Address):
        inner = _embedded_ipv4(ip)
        if inner is not None:
            return _allowed(inner, allowed)
        if ip in NAT64_LOCAL:
            return False
    return ip.is_global and not ip.is_multicast


def check_url(url: str, allowed: Sequence[IPNetwork]) -> str | None:
    """What is wrong with a webhook URL at submission, or None. Names are resolved at delivery."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        return "must be an http or https URL"
    if parts.username is not None or parts.password is not None:
        return "must not carry credentials (user:password@); authenticate the call by its signature"
    host = parts.hostname
    if not host:
        return "has no host"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        if host == "localhost" or host.endswith(".localhost"):
            ip = ipaddress.ip_address("127.0.0.1")
        else:
            try:
                host.encode("idna")  # as the resolver will at delivery; URL parsers accept `a..b.com`
            except UnicodeError:
                return "has a host name that cannot be looked up (an empty or over-long label)"
            return None
    if not _allowed(ip, allowed):
        return f"points at a private, loopback or link-local address ({ip}); not allowed here"
    return None


def resolve_destination(url: str, allowed: Sequence[IPNetwork]) -> tuple[str, str, str]:
    """(URL with the host replaced by a checked address, Host header, host name for TLS)."""
    problem = check_url(url, allowed)
    if problem:
        raise UnsafeDestination(f"webhook URL {problem}")
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise ConnectionError(f"cannot resolve the webhook host: {exc}") from None
    addresses = [ipaddress.ip_address(info[4][0]) for info in infos]
    bad = [ip for ip in addresses if not _allowed(ip, allowed)]
    if bad or not addresses:
        raise UnsafeDestination(
            f"webhook host resolves to a non-public address ({bad[0] if bad else 'none'})"
        )
    ip = addresses[0]
    literal = f"[{ip}]" if ip.version == 6 else str(ip)
    netloc = literal if parts.port is None else f"{literal}:{parts.port}"
    host_header = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=netloc)), host_header, host


def sign(secret: str, body: bytes, timestamp: int) -> str:
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def verify_signature(
    secret: str, body: bytes, header: str, *, tolerance: float = 300, now: float | None = None
) -> bool:
    """For receivers: the signature matches this body and is at most `tolerance` seconds old."""
    try:
        fields = dict(part.split("=", 1) for part in header.split(","))
        timestamp = int(fields["t"])
    except (ValueError, KeyError):
        return False
    if abs((time.time() if now is None else now) - timestamp) > tolerance:
        return False
    return hmac.compare_digest(sign(secret, body, timestamp), header)


def host_of(url: str) -> str:
    """What logs may say about a destination: scheme and host, never a path or query (tokens)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}"


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


class WebhookDispatcher:
    """Runs in the API process: delivers due webhooks on a small thread pool, off the request path.

    Woken when a worker reports finished jobs, and when a delivery ends and frees a sender; also
    polls, so nothing waits on a lost wake-up.
    """

    LEASE_SECONDS = 60.0
    # What stop() allows a delivery under way beyond its budget, to record its outcome.
    STOP_GRACE_SECONDS = 5.0

    def __init__(self, settings: Settings, *, poll_seconds: float = 1.0, concurrency: int = 8) -> None:
        self.settings = settings
        self.poll_seconds = poll_seconds
        self.concurrency = concurrency
        self.allowed: list[IPNetwork] = list(settings.webhook_allowed_networks)
        # Well inside the lease, so a delivery is recorded before another replica may claim it again.
        self.budget = min(settings.webhook_timeout_seconds, self.LEASE_SECONDS / 2)
        # No connection is kept for a later delivery: requests go to a checked IP address, so a pool
        # would key a kept TLS connection by that address, and a delivery to another host name on the
        # same address would ride a connection whose certificate was checked for the first one.
        self.http = httpcore.ConnectionPool(
            ssl_context=httpx.create_ssl_context(),
            max_connections=concurrency,
            max_keepalive_connections=0,
            network_backend=_DeadlineBackend(),
        )
        self.pool = ThreadPoolExecutor(concurrency, thread_name_prefix="webhook")
        self._in_flight: set[Future[None]] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="webhook-dispatcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wake(self, *_: Any) -> None:
        self._wake.set()

    def stop(self) -> None:
        """Waits for deliveries under way, which end within their budget, but no longer: one that
        is not recorded (its database write hangs) is sent again once its lease runs out."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        with self._lock:
            in_flight = list(self._in_flight)
        _, pending = wait(in_flight, timeout=self.budget + self.STOP_GRACE_SECONDS)
        if pending:
            log.warning(
                "stopping with %d webhook deliveries unrecorded; they will be sent again", len(pending)
            )
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.http.close()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                started = self.dispatch_due()
            except Exception as exc:  # the database may be away; the next round tries again
                log.warning("webhook dispatch round failed: %s", exc)
                started = 0
            if started == 0:
                self._wake.wait(self.poll_seconds)
                self._wake.clear()

    def dispatch_due(self) -> int:
        """Claim as many due deliveries as there are idle senders and start them; returns how many.

        Each records itself when it ends; nothing waits for the others, so a slow receiver keeps
        one sender busy, not everyone's webhooks. Claiming no more than can start at once also
        keeps a claimed delivery from waiting in a queue while its lease runs out.
        """
        with self._lock:
            idle = self.concurrency - len(self._in_flight)
        if idle <= 0:
            return 0
        with session_scope(self.settings.sqlalchemy_url) as session:
            jobs = claim_due_webhooks(session, limit=idle, lease_seconds=self.LEASE_SECONDS)
            tenants = {job.tenant for job in jobs}
            rows = session.scalars(select(Tenant).where(Tenant.name.in_(tenants)))
            secrets = {t.name: t.webhook_secret for t in rows}
            deliveries = [(job, JobOut.from_row(job).model_dump_json().encode()) for job in jobs]
        for job, body in deliveries:
            future = self.pool.submit(self._deliver, job, body, secrets.get(job.tenant))
            with self._lock:
                self._in_flight.add(future)
            future.add_done_callback(self._delivery_ended)
        return len(deliveries)

    def _delivery_ended(self, future: Future[None]) -> None:
        with self._lock:
            self._in_flight.discard(future)
        if not future.cancelled() and future.exception() is not None:
            # Only recording the attempt can fail here; the lease brings the delivery back.
            log.warning("webhook delivery not recorded: %s", future.exception())
        self._wake.set()

    def _deliver(self, job: Job, body: bytes, secret: str | None) -> None:
        assert job.webhook_url is not None
        attempt = job.webhook_attempts + 1
        error: str | None = None
        permanent = False
        deadline = time.monotonic() + self.budget
        try:
            if secret is None:
                raise UnsafeDestination(f"tenant {job.tenant!r} has no webhook secret")
            url, host_header, sni = resolve_destination(job.webhook_url, self.allowed)
            timestamp = int(time.time())
            headers = {
                "Content-Type": "application/json",
                "Content-Length": str(len(body)),
                "User-Agent": f"tensorq-webhook/{__version__}",
                "Host": host_header,
                "X-Tensorq-Event": f"job.{job.status.value}",
                "X-Tensorq-Delivery": f"{job.id}.{attempt}",
                "X-Tensorq-Timestamp": str(timestamp),
                SIGNATURE_HEADER: sign(secret, body, timestamp),
            }
            status = self._post(url, body, headers, sni, deadline)
            if not 200 <= status < 300:
                error = f"HTTP {status} from {host_of(job.webhook_url)}"
        except UnsafeDestination as exc:
            error, permanent = str(exc), True
        # Network errors, and anything unforeseen: an attempt that is not recorded repeats forever.
        except Exception as exc:
            error = f"{type(exc).__name__} posting to {host_of(job.webhook_url)}"
        retry_at = None
        if error is not None and not permanent and attempt < self.settings.webhook_max_attempts:
            s = self.settings
            delay = min(s.webhook_retry_cap_seconds, s.webhook_retry_base_seconds * 2 ** (attempt - 1))
            retry_at = utcnow() + timedelta(seconds=delay * random.uniform(0.5, 1.0))
        if error is not None:
            log.warning(
                "webhook for job %s, attempt %d: %s%s", job.id, attempt, error,
                "" if retry_at else " (giving up)", extra={"job_id": str(job.id)},
            )  # fmt: skip
        with session_scope(self.settings.sqlalchemy_url) as session:
            record_webhook_attempt(
                session, job.id, error=error[:MAX_ERROR_CHARS] if error else None, retry_at=retry_at
            )

    def _post(self, url: str, body: bytes, headers: dict[str, str], sni: str, deadline: float) -> int:
        """The status of the receiver's answer, all by `deadline`. Redirects are not followed."""
        _delivery.deadline = deadline
        try:
            timeouts = dict.fromkeys(("connect", "read", "write", "pool"), self.budget)
            with self.http.stream(
                "POST", url, headers=list(headers.items()), content=body,
                extensions={"timeout": timeouts, "sni_hostname": sni},
            ) as response:  # fmt: skip
                # The status is the answer. A short body is read so the connection can be used
                # again; a long, endless or slow one is dropped with its connection.
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
