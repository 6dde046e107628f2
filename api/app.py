"""The FastAPI application factory."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.background import BackgroundLoops
from api.errors import BodyLimit, CatchAll, install_error_handlers
from api.keycache import KeyCache
from api.limits import ActiveJobCounts
from api.metrics import ApiMetrics
from api.openai import routes as openai_routes
from api.ratelimit import RateLimiter
from api.routes import datasets, health, jobs, keys, models
from api.submitting import GroupCommit
from db.keys import check_master_key
from db.session import AsyncSessions
from tensorq import __version__
from tensorq.core.active_jobs import ActiveJobCounter
from tensorq.core.broker import Publisher
from tensorq.core.events import EventListener, EventPublisher
from tensorq.core.presence import Presence
from tensorq.core.settings import Settings, get_settings

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None, *, run_background: bool = True) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # No API without the right master key (MasterKeyError; `tensorq api` says it in one line).
        # A database not reachable or not migrated yet is /readyz's to report, not a reason to die.
        try:
            check_master_key(settings)
        except SQLAlchemyError as exc:
            log.warning("master key not checked against the database yet: %s", type(exc).__name__)
        publisher = Publisher(settings)
        app.state.publisher = publisher
        db = AsyncSessions(settings.sqlalchemy_url)
        app.state.db = db
        metrics = ApiMetrics(settings, publisher)
        app.state.metrics = metrics
        app.state.group_commit = GroupCommit(
            settings, db, publisher, metrics, ActiveJobCounter(settings.redis_url)
        )
        app.state.presence = Presence(settings.redis_url, settings.worker_presence_cache_seconds)
        app.state.rate_limiter = RateLimiter(
            settings.redis_url, rate=settings.tenant_submit_rate, burst=settings.tenant_submit_burst
        )
        loops = BackgroundLoops(settings, publisher) if run_background else None
        app.state.background = loops

        def on_finished(info: dict[str, object]) -> None:
            metrics.observe_finished(info)
            # A dispatch round is a claiming UPDATE and a commit; jobs without a webhook need none.
            if loops and info.get("webhook", True):
                loops.wake_webhooks()

        listener = EventListener(settings.redis_url, on_finished=on_finished)
        listener.start()
        app.state.events = listener
        app.state.event_publisher = EventPublisher(settings.redis_url)
        app.state.active_counter = ActiveJobCounter(settings.redis_url)
        key_cache = KeyCache(settings.redis_url, settings.api_key_cache_seconds)
        key_cache.start()
        app.state.key_cache = key_cache
        if loops:
            loops.start()
        try:
            yield
        finally:
            if loops:
                loops.stop()
            await app.state.rate_limiter.close()
            app.state.presence.close()
            await listener.stop()
            await key_cache.stop()
            app.state.active_counter.close()
            publisher.close()
            await db.close()

    # /docs and /redoc with their Swagger UI and ReDoc assets served from the fastapi-offline
    # package: from a CDN, the pages were blank on an air-gapped cluster.
    app = FastAPIOffline(
        title="tensorq",
        version=__version__,
        description="Submit PyTorch training and inference jobs; poll their state and results.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.active_jobs = ActiveJobCounts()
    install_error_handlers(app)
    app.add_exception_handler(StarletteHTTPException, openai_routes.http_error)
    app.include_router(health.router)
    app.include_router(jobs.router)
    app.include_router(datasets.router)
    app.include_router(models.router)
    app.include_router(keys.router)
    app.include_router(openai_routes.router)
    app.add_middleware(
        BodyLimit,
        max_bytes=settings.max_body_bytes,
        upload_paths={
            "/v1/datasets": settings.dataset_max_bytes,
            # The multipart envelope around the file, on top of the file's own limit.
            f"{openai_routes.PREFIX}/files": settings.openai_file_max_bytes + 64 * 1024,
        },
        timeout=settings.request_body_timeout_seconds,
    )
    app.add_middleware(CatchAll)  # added last: outermost, so it sees what the others raise
    return app
