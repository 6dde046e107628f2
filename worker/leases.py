"""One heartbeat thread per worker process keeps the leases of the jobs it holds alive."""

from __future__ import annotations

import logging
import threading
import uuid

from db.jobs import extend_leases
from db.session import session_scope

log = logging.getLogger(__name__)


class LeaseKeeper:
    def __init__(self, database_url: str, lease_seconds: float) -> None:
        self.database_url = database_url
        self.lease_seconds = lease_seconds
        self._held: dict[uuid.UUID, uuid.UUID] = {}
        self._cancel_requested: set[uuid.UUID] = set()
        self._lost: set[uuid.UUID] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def hold(self, job_id: uuid.UUID, claim_token: uuid.UUID) -> None:
        with self._lock:
            self._held[job_id] = claim_token
            if self._thread is None or not self._thread.is_alive():
                # Started lazily in the process that runs jobs (never before a prefork fork).
                self._thread = threading.Thread(target=self._loop, name="lease-keeper", daemon=True)
                self._thread.start()

    def release(self, job_id: uuid.UUID) -> None:
        with self._lock:
            self._held.pop(job_id, None)
            self._cancel_requested.discard(job_id)
            self._lost.discard(job_id)

    def cancel_requested(self, job_id: uuid.UUID) -> bool:
        """Whether the job should stop: its cancellation was requested, or its claim was lost."""
        return job_id in self._cancel_requested or job_id in self._lost

    def lost(self, job_id: uuid.UUID) -> bool:
        """Whether a heartbeat found the job no longer held under this worker's claim: the lease ran
        out (a pause, a database outage longer than the lease), the job was reaped and may be
        running elsewhere already, so this copy must stop and write nothing."""
        return job_id in self._lost

    def beat(self) -> None:
        with self._lock:
            claims = list(self._held.items())
        if not claims:
            return
        with session_scope(self.database_url) as session:
            held = extend_leases(session, claims, lease_seconds=self.lease_seconds)
        with self._lock:
            for job_id, token in claims:
                if self._held.get(job_id) != token:
                    continue  # released since (finished), or held again under a new claim
                if job_id not in held:
                    self._lost.add(job_id)
                elif held[job_id]:
                    self._cancel_requested.add(job_id)

    def _loop(self) -> None:
        interval = max(self.lease_seconds / 3, 0.2)
        while not self._wake.wait(interval):
            try:
                self.beat()
            except Exception:
                # A database blip must not kill the heartbeat; the lease has slack for a few misses.
                log.exception("lease heartbeat failed")
