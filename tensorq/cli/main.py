"""The `tensorq` command."""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from tensorq.cli.crypto import register as register_crypto
from tensorq.cli.crypto import require_master_key
from tensorq.cli.datasets import register as register_datasets
from tensorq.cli.extras import needs
from tensorq.cli.jobs import register as register_client_commands
from tensorq.cli.keys import keys_app
from tensorq.cli.keys import register as register_keys
from tensorq.cli.retention import register as register_retention
from tensorq.core.logs import configure_logging
from tensorq.core.settings import get_settings

app = typer.Typer(no_args_is_help=True, help="tensorq: PyTorch training and inference jobs.")
db_app = typer.Typer(no_args_is_help=True, help="Database schema (Alembic migrations).")
app.add_typer(db_app, name="db")


@db_app.command("upgrade")
@needs("server")
def db_upgrade(revision: str = "head") -> None:
    """Create or migrate the schema to REVISION (default: head)."""
    from migrations.run import upgrade

    settings = get_settings()
    configure_logging(settings.log_level, settings.log_format)
    upgrade(settings.sqlalchemy_url, revision)
    typer.echo(f"database at {revision}")


@app.command()
@needs("server")
def api(
    host: Annotated[str | None, typer.Option(help="Default: TENSORQ_API_HOST")] = None,
    port: Annotated[int | None, typer.Option(help="Default: TENSORQ_API_PORT")] = None,
) -> None:
    """Run the HTTP API."""
    import uvicorn

    from api.server import protocol_class

    settings = get_settings()
    configure_logging(settings.log_level, settings.log_format)
    require_master_key(settings)
    uvicorn.run(
        "api.app:create_app",
        factory=True,
        host=host or settings.api_host,
        port=port or settings.api_port,
        log_level=settings.log_level.lower(),
        # uvicorn's own lines go through tensorq's handler, in the configured format (its default
        # config printed them, tracebacks included, as plain text beside the JSON lines).
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=30,
        timeout_keep_alive=settings.keep_alive_timeout_seconds,
        http=protocol_class(settings.request_header_timeout_seconds),
    )


@app.command()
@needs("worker")
def worker(
    gpus: Annotated[
        str, typer.Option(help="'all' (or 'auto'), 'none' (CPU), or indices like '0,2'")
    ] = "auto",
    queues: Annotated[
        str | None, typer.Option(help="Comma-separated queues (default: those that fit the device)")
    ] = None,
    concurrency: Annotated[int, typer.Option(min=1, help="Pool processes per device")] = 1,
    pool: Annotated[str | None, typer.Option(help="Celery pool (default: TENSORQ_WORKER_POOL)")] = None,
) -> None:
    """Run Celery workers: one process per selected GPU, or one on CPU."""
    from worker.devices import detect_gpu_count, plan_devices

    try:
        plans = plan_devices(gpus, detect_gpu_count())
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--gpus") from None
    if len(plans) > 1:
        raise typer.Exit(
            _supervise_gpu_workers([p.cuda_visible_devices for p in plans], queues, concurrency, pool)
        )
    plan = plans[0]
    # Pin before torch is imported anywhere in this process or the pool it forks.
    os.environ["CUDA_VISIBLE_DEVICES"] = plan.cuda_visible_devices
    os.environ["TENSORQ_WORKER_DEVICE"] = plan.device
    get_settings.cache_clear()
    settings = get_settings()
    if settings.omp_spin_count is not None:
        # libgomp reads it once, when torch loads it (not yet imported here).
        os.environ["GOMP_SPINCOUNT"] = str(settings.omp_spin_count)
    configure_logging(settings.log_level, settings.log_format)
    require_master_key(settings)
    from tensorq.core.broker import queues_for_worker
    from worker.celery_app import app as celery_app

    celery_app.worker_main(
        [
            "worker",
            "--pool",
            pool or settings.worker_pool,
            "--concurrency",
            str(concurrency),
            "--hostname",
            f"{plan.node}@%h",
            "--queues",
            queues or ",".join(queues_for_worker(plan.device != "cpu")),
            "--task-events",
            "--without-gossip",
            "--without-mingle",
            "--loglevel",
            settings.log_level,
        ]
    )


def _supervise_gpu_workers(indices: list[str], queues: str | None, concurrency: int, pool: str | None) -> int:
    """One child `tensorq worker --gpus i` per GPU, kept running (see tensorq/cli/supervisor.py)."""
    from tensorq.cli.supervisor import Supervisor

    args = (
        ["--concurrency", str(concurrency)]
        + (["--queues", queues] if queues else [])
        + (["--pool", pool] if pool else [])
    )
    command = [sys.executable, "-m", "tensorq.cli", "worker"]
    return Supervisor({i: [*command, "--gpus", i, *args] for i in indices}).run()


@app.command()
@needs("server")
def flower(
    port: Annotated[int | None, typer.Option(help="Default: TENSORQ_FLOWER_PORT")] = None,
    address: Annotated[str, typer.Option(help="Interface to listen on")] = "127.0.0.1",
) -> None:
    """Run Flower against the same broker, behind basic auth (TENSORQ_FLOWER_BASIC_AUTH=user:password)."""
    settings = get_settings()
    if settings.flower_basic_auth is None:
        typer.echo("refusing to start Flower without TENSORQ_FLOWER_BASIC_AUTH=user:password", err=True)
        raise typer.Exit(2)
    env = {**os.environ, "FLOWER_BASIC_AUTH": settings.flower_basic_auth.get_secret_value()}
    argv = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker.celery_app:app",
        "flower",
        f"--port={port or settings.flower_port}",
        f"--address={address}",
    ]
    os.execve(sys.executable, argv, env)


@app.command()
@needs("server", "worker", "all")
def up(flower: Annotated[bool, typer.Option(help="Start Flower too")] = True) -> None:
    """Everything on this machine: migrate SQLite, embedded Redis, a worker, the API and Flower."""
    from tensorq.cli.embedded import run_embedded

    settings = get_settings()
    configure_logging(settings.log_level, settings.log_format)
    raise typer.Exit(run_embedded(settings, flower=flower))


register_retention(app)
register_keys(app)
register_client_commands(app)
register_datasets(app)
register_crypto(app, keys_app)
