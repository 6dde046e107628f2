"""The OpenAI-compatible batches' loop (api/openai/batches.py): turns their lines into jobs a
chunk at a time and finalises each batch (writes its output and error files) once its jobs are
all final. Every step is a transaction on the locked batch row, so the loop may stop anywhere and
any API replica's loop goes on from the last commit."""

from __future__ import annotations

import logging
import threading

from api.openai.batches import BatchWork
from db.openai_batches import open_batch_ids
from db.session import session_scope
from tensorq.core.broker import Publisher
from tensorq.core.settings import Settings

log = logging.getLogger(__name__)


class OpenAIBatchLoop:
    def __init__(self, settings: Settings, publisher: Publisher) -> None:
        self.settings = settings
        self.work = BatchWork(settings, publisher)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="openai-batches", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def run_once(self) -> bool:
        """One round over the open batches; whether any moved (then the next round runs at once)."""
        with session_scope(self.settings.sqlalchemy_url) as session:
            ids = open_batch_ids(session)
        moved = False
        for batch_id in ids:
            if self._stop.is_set():
                break
            try:
                moved = self.work.step(batch_id) or moved
            except Exception:
                log.exception("batch %s: step failed; tried again next round", batch_id)
        return moved

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                moved = self.run_once()
            except Exception as exc:  # the database may be away; the next round tries again
                log.warning("batch round failed: %s", exc)
                moved = False
            if not moved:
                self._wake.wait(self.settings.openai_batch_poll_seconds)
                self._wake.clear()
