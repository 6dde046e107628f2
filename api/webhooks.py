"""Webhooks: a job's final state POSTed to the URL it was submitted with, signed, retried.

Signature (per-tenant secret, `tensorq keys webhook-secret`):
    X-Tensorq-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>." + body)>
Receivers recompute it over the raw body and reject old timestamps (see `verify_signature`).

Destinations are checked twice: at submission (literal addresses, `localhost`) and before every
delivery, when the host is resolved and the request is sent to the checked address itself, so a
DNS answer that changes in between cannot point a delivery inside the network.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import random
import socket
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit, urlunsplit

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


class WebhookDispatcher:
    """Runs in the API process: delivers due webhooks on a small thread pool, off the request path.

    Woken when a worker reports finished jobs; also polls, so nothing waits on a lost wake-up.
    """

    LEASE_SECONDS = 60.0

    def __init__(self, settings: Settings, *, poll_seconds: float = 1.0, concurrency: int = 8) -> None:
        self.settings = settings
        self.poll_seconds = poll_seconds
        self.concurrency = concurrency
        self.allowed: list[IPNetwork] = list(settings.webhook_allowed_networks)
        self.http = httpx.Client(timeout=settings.webhook_timeout_seconds, follow_redirects=False)
        self.pool = ThreadPoolExecutor(concurrency, thread_name_prefix="webhook")
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="webhook-dispatcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wake(self, *_: Any) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.http.close()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                sent = self.dispatch_due()
            except Exception as exc:  # the database may be away; the next round tries again
                log.warning("webhook dispatch round failed: %s", exc)
                sent = 0
            if sent == 0:
                self._wake.wait(self.poll_seconds)
                self._wake.clear()

    def dispatch_due(self) -> int:
        """Claim due deliveries, send them concurrently, record each; returns how many were tried."""
        with session_scope(self.settings.sqlalchemy_url) as session:
            jobs = claim_due_webhooks(session, limit=self.concurrency * 4, lease_seconds=self.LEASE_SECONDS)
            tenants = {job.tenant for job in jobs}
            rows = session.scalars(select(Tenant).where(Tenant.name.in_(tenants)))
            secrets = {t.name: t.webhook_secret for t in rows}
            deliveries = [(job, JobOut.from_row(job).model_dump_json().encode()) for job in jobs]
        if not deliveries:
            return 0
        list(self.pool.map(lambda d: self._deliver(d[0], d[1], secrets.get(d[0].tenant)), deliveries))
        return len(deliveries)

    def _deliver(self, job: Job, body: bytes, secret: str | None) -> None:
        assert job.webhook_url is not None
        attempt = job.webhook_attempts + 1
        error: str | None = None
        permanent = False
        try:
            if secret is None:
                raise UnsafeDestination(f"tenant {job.tenant!r} has no webhook secret")
            url, host_header, sni = resolve_destination(job.webhook_url, self.allowed)
            timestamp = int(time.time())
            headers = {
                "Content-Type": "application/json",
                "User-Agent": f"tensorq-webhook/{__version__}",
                "Host": host_header,
                "X-Tensorq-Event": f"job.{job.status.value}",
                "X-Tensorq-Delivery": f"{job.id}.{attempt}",
                "X-Tensorq-Timestamp": str(timestamp),
                SIGNATURE_HEADER: sign(secret, body, timestamp),
            }
            response = self.http.post(url, content=body, headers=headers, extensions={"sni_hostname": sni})
            if not response.is_success:
                error = f"HTTP {response.status_code} from {host_of(job.webhook_url)}"
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
