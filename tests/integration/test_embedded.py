"""The embedded default: `tensorq up` on SQLite with its own redis-server, as the README runs it."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import httpx
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.helpers import ROOT, free_port, responds, wait_until

pytestmark = pytest.mark.integration


def test_tensorq_up_runs_a_job_on_sqlite_and_embedded_redis(tmp_path: Path) -> None:
    api_port, flower_port, redis_port = free_port(), free_port(), free_port()
    up, log, output = _start_up(tmp_path, api_port, flower_port, redis_port)
    try:
        wait_until(
            lambda: "tensorq is up" in output() or up.poll() is not None, timeout=180, what="tensorq up"
        )
        assert up.poll() is None, output()
        # Flower is up against the same broker and refuses anonymous access.
        flower = f"http://127.0.0.1:{flower_port}"
        wait_until(lambda: responds(f"{flower}/api/workers"), timeout=60, what="flower")
        assert httpx.get(f"{flower}/api/workers", timeout=10).status_code == 401
        auth = re.search(r"user:password (\S+?):(\S+)\)", output())
        assert auth, output()
        user, password = auth.groups()

        # A first admin key was made and printed; without it the API refuses work.
        key_match = re.search(r"API key  (tq_\S+)", output())
        assert key_match, output()
        key = key_match[1]
        # The printed curl line works as printed.
        curl = re.search(
            r"curl -s -X POST (\S+) -H '([^']+)' \\\n\s+-H \"([^\"]+)\" \\\n\s+-d '([^']+)'", output()
        )
        assert curl, output()
        url, header, auth_header, body = curl.groups()
        headers = dict(h.split(": ", 1) for h in (header, auth_header))
        assert headers["Authorization"] == f"Bearer {key}"
        refused = httpx.post(url, headers={"Content-Type": "application/json"}, content=body, timeout=10)
        assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
        r = httpx.post(url, headers=headers, content=body, timeout=10)
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        job_url = f"http://127.0.0.1:{api_port}{r.headers['location']}"

        def finished() -> dict[str, object] | None:
            job: dict[str, object] = httpx.get(job_url, headers=headers, timeout=10).json()
            return job if job["status"] in ("succeeded", "failed") else None

        job = wait_until(finished, timeout=120, interval=0.2, what="embedded job")
        assert job["status"] == "succeeded", job
        assert len(job["result"]["embeddings"][0]) == 384  # type: ignore[index]
        assert (tmp_path / "var" / "tensorq.db").exists()
        # Encryption at rest: a first start made the master key, readable by its owner only, and
        # the job's input is sealed in the database.
        master = tmp_path / "var" / "master.key"
        assert oct(master.stat().st_mode & 0o777) == "0o600" and "created the master key" in output()
        for db_file in (tmp_path / "var").glob("tensorq.db*"):  # the WAL too
            assert b"hello world" not in db_file.read_bytes(), db_file

        # Flower shows the worker and the finished task under its readable name and the job id.
        workers = httpx.get(
            f"{flower}/api/workers", params={"refresh": "1"}, auth=(user, password), timeout=30
        )
        assert workers.status_code == 200 and any(w.startswith("cpu@") for w in workers.json()), workers.text

        def flower_task() -> dict[str, object] | None:
            tasks = httpx.get(f"{flower}/api/tasks", auth=(user, password), timeout=10).json()
            task: dict[str, object] | None = tasks.get(job_id)
            return task if task and task.get("state") == "SUCCESS" else None

        task = wait_until(flower_task, timeout=30, what="the task in Flower")
        assert task["name"] == "tensorq.embed"
        # The task's arguments are the job id alone: no key, no input, in Flower or in the broker.
        assert task["args"] in (f"['{job_id}']", f"('{job_id}',)"), task["args"]
        assert key not in httpx.get(f"{flower}/api/tasks", auth=(user, password), timeout=10).text
    finally:
        up.terminate()
        up.wait(timeout=60)
        log.close()
    # Stopping `tensorq up` stops what it started, its redis-server included.
    assert up.returncode == 0, output()
    # The key appears only in the banner
    # (the "API key" line and the two curl examples), never in what the services logged.
    assert output().count(key) == 3, output()
    assert not _listening(redis_port) and not _listening(api_port)


def _start_up(
    tmp_path: Path, api_port: int, flower_port: int, redis_port: int, **extra: str
) -> tuple[subprocess.Popen[bytes], BinaryIO, Callable[[], str]]:
    """`tensorq up` in `tmp_path`, on this checkout's code (the venv's editable install may be another's)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TENSORQ_")}
    env.update(
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
        TENSORQ_API_PORT=str(api_port),
        TENSORQ_FLOWER_PORT=str(flower_port),
        TENSORQ_EMBEDDED_REDIS_PORT=str(redis_port),
        TENSORQ_WORKER_METRICS_PORT="0",  # 9101 may be another test's
        **extra,
    )
    log = (tmp_path / "up.log").open("wb")
    up = subprocess.Popen(
        [sys.executable, "-m", "tensorq.cli", "up"],
        cwd=tmp_path,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    return up, log, lambda: (tmp_path / "up.log").read_text(errors="replace")


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


MARKERS = {
    "redis": "redis-server",
    "worker": "tensorq.cli\0worker",
    "api": "tensorq.cli\0api",
    "flower": "flower",
}


def _child(parent: int, name: str) -> int | None:
    """The pid of `tensorq up`'s live child `name`, found in /proc by its command line."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            state, ppid = stat.read_text().rpartition(") ")[2].split()[:2]
            cmdline = (stat.parent / "cmdline").read_text(errors="replace")
            if state != "Z" and int(ppid) == parent and MARKERS[name] in cmdline:
                return int(stat.parent.name)
    return None


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def test_tensorq_up_restarts_a_killed_worker_redis_api_and_flower_while_the_api_answers(
    tmp_path: Path,
) -> None:
    api_port, flower_port, redis_port = free_port(), free_port(), free_port()
    up, log, output = _start_up(
        tmp_path,
        api_port,
        flower_port,
        redis_port,
        TENSORQ_SWEEP_INTERVAL_SECONDS="1",
        TENSORQ_LEASE_SECONDS="10",
    )
    base = f"http://127.0.0.1:{api_port}"
    health_failures: list[str] = []
    polls = 0
    polling = threading.Event()
    figures: dict[str, float] = {}

    def poll_health() -> None:
        nonlocal polls
        with httpx.Client(timeout=5) as http:
            while polling.is_set():
                try:
                    r = http.get(f"{base}/healthz")
                    if r.status_code != 200:
                        health_failures.append(f"{r.status_code} {r.text[:200]}")
                except httpx.HTTPError as exc:
                    health_failures.append(repr(exc))
                polls += 1
                time.sleep(0.1)

    seen: set[int] = set()  # every pid of every part, to show that none outlives `tensorq up`

    def pid(name: str) -> int:
        found = wait_until(lambda: _child(up.pid, name), timeout=10, what=f"{name}'s process")
        seen.add(found)
        return found

    def restarted(name: str, since: float, old_pid: int) -> float:
        """Seconds from `since` to a new `name` process; `tensorq up` said so, naming it."""

        def new_child() -> bool:
            assert up.poll() is None, output()  # today's code: "worker exited; stopping"
            return (_child(up.pid, name) or old_pid) != old_pid

        wait_until(new_child, timeout=30, interval=0.05, what=f"{name} restarted")
        took = time.monotonic() - since
        new_pid = pid(name)
        line = f"tensorq: {name} restarted (pid {new_pid})"
        wait_until(lambda: line in output(), timeout=5, what=line)
        return took

    accepted: list[str] = []
    answers: list[int] = []
    down_submissions = 0
    try:
        wait_until(
            lambda: "tensorq is up" in output() or up.poll() is not None, timeout=180, what="tensorq up"
        )
        assert up.poll() is None, output()
        key_match = re.search(r"API key  (tq_\S+)", output())
        assert key_match, output()
        headers = {"Authorization": f"Bearer {key_match[1]}"}
        http = httpx.Client(base_url=base, headers=headers, timeout=30)

        def submit(text: str) -> None:
            r = http.post("/v1/jobs", json={"kind": "embed", "input": {"texts": [text]}})
            answers.append(r.status_code)
            assert r.status_code == 202, r.text
            accepted.append(r.json()["id"])

        def statuses() -> list[str]:
            return [http.get(f"/v1/jobs/{job_id}").json()["status"] for job_id in accepted]

        polling.set()
        poller = threading.Thread(target=poll_health, daemon=True)
        poller.start()
        for i in range(3):
            submit(f"before the kills {i}")
        wait_until(lambda: set(statuses()) == {"succeeded"}, timeout=60, interval=0.2, what="the first jobs")

        # The worker's main process, SIGKILLed: started again after 1 s; jobs submitted meanwhile wait.
        worker = pid("worker")
        os.kill(worker, signal.SIGKILL)
        killed = time.monotonic()
        for i in range(3):
            submit(f"while the worker is down {i}")
        figures["worker_restart_s"] = restarted("worker", killed, worker)
        assert "tensorq: worker exited (code -9); restarting in 1.0s" in output(), output()

        # Redis, SIGKILLed, then (back after 1 s) shut down again at once: the second restart waits
        # 2 s, since it had not run a minute. Submissions while it is down are answered 202.
        for n, stop in enumerate(("kill", "shutdown")):
            redis_pid = pid("redis")
            if stop == "kill":
                os.kill(redis_pid, signal.SIGKILL)
            else:
                # No retry: redis-py's default would reconnect and shut the restarted one down too.
                client = redis.Redis(port=redis_port, retry=Retry(NoBackoff(), 0))
                client.set("tensorq-test:kept", "1")  # the append-only file in var/redis keeps it
                with contextlib.suppress(redis.ConnectionError):
                    client.shutdown(nosave=True)
                client.close()
            stopped = time.monotonic()
            wait_until(lambda: not _listening(redis_port), timeout=10, interval=0.02, what="redis down")
            for i in range(3):
                down = not _listening(redis_port)
                submit(f"while redis is down {n}.{i}")
                down_submissions += down and not _listening(redis_port)
            figures[f"redis_{stop}_restart_s"] = restarted("redis", stopped, redis_pid)
            wait_until(lambda: _listening(redis_port), timeout=20, interval=0.05, what="redis back")
            figures[f"redis_{stop}_listening_s"] = time.monotonic() - stopped
        assert "tensorq: redis exited (code -9); restarting in 1.0s" in output(), output()
        assert "tensorq: redis exited (code 0); restarting in 2.0s" in output(), output()
        assert output().count("tensorq: redis restarted") == 2, output()
        # Started again on the same port and data directory: it came back with what it had.
        with redis.Redis(port=redis_port) as client:
            assert client.get("tensorq-test:kept") == b"1"
        assert down_submissions >= 3, (down_submissions, output())

        for i in range(3):
            submit(f"after the kills {i}")
        wait_until(
            lambda: set(statuses()) <= {"succeeded", "failed"} and statuses(),
            timeout=150,
            interval=0.5,
            what=f"every job finished: {statuses()}",
        )
        assert statuses() == ["succeeded"] * len(accepted), statuses()
        polling.clear()
        poller.join(timeout=10)
        assert health_failures == [], health_failures
        assert polls > 50 and set(answers) == {202}

        # The API and Flower are kept too (the API, of course, does not answer while it restarts).
        for name, port in (("api", api_port), ("flower", flower_port)):
            old = pid(name)
            os.kill(old, signal.SIGKILL)
            killed = time.monotonic()
            figures[f"{name}_restart_s"] = restarted(name, killed, old)
            wait_until(lambda port=port: _listening(port), timeout=60, interval=0.1, what=f"{name} back")
            figures[f"{name}_listening_s"] = time.monotonic() - killed
        submit("after the API came back")
        wait_until(lambda: statuses()[-1] == "succeeded", timeout=60, interval=0.2, what="the last job")
        http.close()
    finally:
        polling.clear()
        shutdown_from = len(output())
        up.send_signal(signal.SIGINT)  # Ctrl-C
        with contextlib.suppress(subprocess.TimeoutExpired):
            up.wait(timeout=90)
        if up.poll() is None:
            up.kill()
        log.close()
    print(
        f"embedded heal: jobs={len(accepted)} succeeded={len(accepted)} submitted_while_redis_down={down_submissions} "
        f"health_polls={polls} health_failures=0 " + " ".join(f"{k}={v:.2f}" for k, v in figures.items())
    )
    assert up.returncode == 0, output()
    # Nothing was started again during the shutdown, and nothing it started outlives it.
    assert "restart" not in output()[shutdown_from:], output()[shutdown_from:]
    assert len(seen) == 4 + 5 and not [p for p in seen if _alive(p)], seen
    assert not _listening(redis_port) and not _listening(api_port) and not _listening(flower_port)
