"""The API process's background loops, started and stopped together with the app.

- `sweeper`: reaps expired leases and publishes jobs whose message never left;
- `webhooks`: delivers due webhooks off the request path.

Each loop is a thread with `start()` / `stop()`; a new loop is added here, once.
"""

from __future__ import annotations

from api.background.sweeper import Sweeper
from api.background.webhooks import WebhookDispatcher
from tensorq.core.broker import Publisher
from tensorq.core.settings import Settings


class BackgroundLoops:
    def __init__(self, settings: Settings, publisher: Publisher) -> None:
        self.sweeper = Sweeper(settings, publisher)
        self.webhooks = WebhookDispatcher(settings)

    def start(self) -> None:
        self.sweeper.start()
        self.webhooks.start()

    def wake_webhooks(self) -> None:
        self.webhooks.wake()

    def stop(self) -> None:
        # Webhooks first: a delivery under way records itself before the process goes.
        self.webhooks.stop()
        self.sweeper.stop()
