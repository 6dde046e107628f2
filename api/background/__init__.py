"""The API process's background loops, started and stopped together with the app.

- `sweeper`: reaps expired leases and publishes jobs whose message never left;
- `webhooks`: delivers due webhooks off the request path;
- `openai_batches`: submits the OpenAI-compatible batches' lines as jobs and finalises them.

Each loop is a thread with `start()` / `stop()`; a new loop is added here, once.
"""

from __future__ import annotations

from api.background.openai_batches import OpenAIBatchLoop
from api.background.sweeper import Sweeper
from api.background.webhooks import WebhookDispatcher
from tensorq.core.broker import Publisher
from tensorq.core.settings import Settings


class BackgroundLoops:
    def __init__(self, settings: Settings, publisher: Publisher) -> None:
        self.sweeper = Sweeper(settings, publisher)
        self.webhooks = WebhookDispatcher(settings)
        self.openai_batches = OpenAIBatchLoop(settings, publisher)

    def start(self) -> None:
        self.sweeper.start()
        self.webhooks.start()
        self.openai_batches.start()

    def wake_webhooks(self) -> None:
        self.webhooks.wake()

    def wake_openai_batches(self) -> None:
        self.openai_batches.wake()

    def stop(self) -> None:
        # Webhooks first: a delivery under way records itself before the process goes.
        self.webhooks.stop()
        self.openai_batches.stop()
        self.sweeper.stop()
