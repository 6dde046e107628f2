"""Webhooks: a job's final state POSTed to the URL it was submitted with, signed, retried.

Signed with the tenant's secret (`tensorq.core.signing`; receivers use
`tensorq.client.verify_signature`), sent to a checked destination (`api.webhooks.policy`) within
a total deadline (`api.webhooks.transport`), retried with the shared backoff.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from datetime import timedelta
from typing import Any

from sqlalchemy import select

from api.schemas import JobOut
from api.webhooks.policy import IPNetwork, UnsafeDestination, host_of, resolve_destination
from api.webhooks.transport import Transport
from db.models import Job, Tenant, utcnow
from db.session import session_scope
from db.webhooks import claim_due_webhooks, record_webhook_attempt
from tensorq import __version__
from tensorq.core.backoff import backoff_delay
from tensorq.core.settings import Settings
from tensorq.core.signing import SIGNATURE_HEADER, sign

log = logging.getLogger(__name__)

MAX_ERROR_CHARS = 500


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
        self.transport = Transport(concurrency, self.budget)
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
        self.transport.close()

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
            status = self.transport.post(url, body, headers, sni, deadline)
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
            delay = backoff_delay(
                attempt - 1, base=s.webhook_retry_base_seconds, cap=s.webhook_retry_cap_seconds, floor=0.5
            )
            retry_at = utcnow() + timedelta(seconds=delay)
        if error is not None:
            log.warning(
                "webhook for job %s, attempt %d: %s%s", job.id, attempt, error,
                "" if retry_at else " (giving up)", extra={"job_id": str(job.id)},
            )  # fmt: skip
        with session_scope(self.settings.sqlalchemy_url) as session:
            record_webhook_attempt(
                session, job.id, error=error[:MAX_ERROR_CHARS] if error else None, retry_at=retry_at
            )
