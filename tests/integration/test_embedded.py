"""The embedded default: `tensorq up` on SQLite with its own redis-server, as the README runs it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.helpers import free_port, responds, wait_until

pytestmark = pytest.mark.integration


def test_tensorq_up_runs_a_job_on_sqlite_and_embedded_redis(tmp_path: Path) -> None:
    api_port, flower_port, redis_port = free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TENSORQ_")}
    env.update(
        TENSORQ_API_PORT=str(api_port),
        TENSORQ_FLOWER_PORT=str(flower_port),
        TENSORQ_EMBEDDED_REDIS_PORT=str(redis_port),
    )
    log = (tmp_path / "up.log").open("wb")
    up = subprocess.Popen(
        [sys.executable, "-m", "tensorq.cli", "up"],
        cwd=tmp_path,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    output = lambda: (tmp_path / "up.log").read_text(errors="replace")  # noqa: E731
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


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0
