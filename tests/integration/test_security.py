"""A locked-down service: Redis with a password, Flower behind basic auth, signed webhooks to a local
receiver (allowed by the allowlist), keys managed with the CLI; then the logs, the job rows and
Flower are searched for the secrets."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import psycopg
import pytest

from tests.conftest import POSTGRES_ADMIN_URL
from tests.helpers import (
    ROOT,
    Proc,
    RedisServer,
    Service,
    create_database,
    drop_database,
    free_port,
    responds,
    service_env,
    start_service,
    tenant_of,
    wait_job,
    wait_until,
)

pytestmark = pytest.mark.integration

REDIS_PASSWORD = "redis-" + os.urandom(8).hex()
FLOWER_AUTH = ("ops", "flower-" + os.urandom(6).hex())
URL_TOKEN = "urltoken-" + os.urandom(6).hex()


@dataclass
class Receiver:
    """A local webhook receiver: /flaky fails its first call, /slow answers after 10 s, /ok at once."""

    port: int
    calls: list[tuple[str, dict[str, str], bytes]] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None

    def start(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                path = self.path.split("?")[0]
                receiver.calls.append((path, dict(self.headers), body))
                if path == "/slow":
                    time.sleep(10)
                failing = path == "/flaky" and sum(1 for c in receiver.calls if c[0] == "/flaky") == 1
                self.send_response(500 if failing else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def to(self, path: str) -> list[tuple[dict[str, str], bytes]]:
        return [(h, b) for p, h, b in self.calls if p == path]


@dataclass
class Secured:
    svc: Service
    flower: Proc
    flower_url: str
    receiver: Receiver
    pg_url: str


def tensorq(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tensorq.cli", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    tmp = tmp_path_factory.mktemp("secured")
    redis_server = RedisServer(tmp, password=REDIS_PASSWORD)
    redis_server.start()
    pg_url = create_database(POSTGRES_ADMIN_URL)
    receiver = Receiver(free_port())
    receiver.start()
    env = service_env(
        pg_url,
        redis_server.url,
        tmp,
        TENSORQ_WEBHOOK_ALLOWED_NETWORKS='["127.0.0.0/8"]',
        TENSORQ_WEBHOOK_RETRY_BASE_SECONDS="0.3",
        TENSORQ_WEBHOOK_MAX_ATTEMPTS="3",
        TENSORQ_WEBHOOK_TIMEOUT_SECONDS="2",
        TENSORQ_FLOWER_BASIC_AUTH=":".join(FLOWER_AUTH),
        TENSORQ_LOG_LEVEL="DEBUG",
    )
    svc = start_service(env, tmp)
    flower_port = free_port()
    flower = Proc("flower", ["flower", "--port", str(flower_port)], env, tmp)
    flower_url = f"http://127.0.0.1:{flower_port}"
    wait_until(lambda: responds(flower_url), timeout=60, what="flower")
    yield Secured(svc, flower, flower_url, receiver, pg_url)
    for proc in (flower, svc.api, svc.worker):
        proc.stop()
    assert receiver.server is not None
    receiver.server.shutdown()
    redis_server.stop()
    drop_database(POSTGRES_ADMIN_URL, pg_url)


def test_keys_from_the_cli_work_until_revoked(secured: Secured) -> None:
    env = secured.svc.env
    made = tensorq(env, "keys", "create", "--tenant", "cli-team")
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    assert key.startswith("tq_") and "\n" not in key and key not in made.stderr
    with secured.svc.client(key) as client:
        assert client.get("/v1/whoami").json()["tenant"] == "cli-team"
        listed = tensorq(env, "keys", "list", "--tenant", "cli-team")
        assert key[:11] in listed.stdout and key not in listed.stdout
        revoked = tensorq(env, "keys", "revoke", key[:11])
        assert revoked.returncode == 0, revoked.stderr
        r = client.get("/v1/whoami")
        assert r.status_code == 401 and r.json() == {"detail": "unknown or revoked API key"}
    assert tensorq(env, "keys", "create", "--tenant", "../etc").returncode == 2


def test_webhooks_are_signed_retried_and_match_the_job(secured: Secured) -> None:
    svc, receiver = secured.svc, secured.receiver
    secret = tensorq(svc.env, "keys", "webhook-secret", "--tenant", _tenant(svc)).stdout.strip()
    assert secret.startswith("whsec_")
    hook = f"http://127.0.0.1:{receiver.port}/flaky?token={URL_TOKEN}"
    with svc.client() as client:
        job = client.post(
            "/v1/jobs", json={"kind": "embed", "input": {"texts": ["hook me"]}, "webhook": hook}
        )
        assert job.status_code == 202, job.text
        done = wait_job(client, job.json()["id"])
        final = wait_until(
            lambda: (
                (j := client.get(f"/v1/jobs/{done['id']}").json())["webhook"]["state"] == "delivered" and j
            ),
            timeout=30,
            what="webhook delivered",
        )
    assert final["webhook"]["attempts"] == 2 and final["webhook"]["error"] is None
    calls = receiver.to("/flaky")
    assert len(calls) == 2  # the 500 was retried
    headers, body = calls[-1]
    # The receiver's check, written out: HMAC-SHA256 over "<timestamp>.<raw body>" with the tenant secret.
    fields = dict(part.split("=", 1) for part in headers["X-Tensorq-Signature"].split(","))
    assert fields["t"] == headers["X-Tensorq-Timestamp"] and abs(int(fields["t"]) - time.time()) < 60
    expected = hmac.new(secret.encode(), f"{fields['t']}.".encode() + body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(fields["v1"], expected)
    payload = json.loads(body)
    assert payload["id"] == done["id"] and payload["status"] == "succeeded"
    assert payload["result"] == done["result"] and headers["X-Tensorq-Event"] == "job.succeeded"
    assert headers["X-Tensorq-Delivery"] == f"{done['id']}.2"


def test_a_slow_or_dead_receiver_never_holds_up_jobs(secured: Secured) -> None:
    svc, receiver = secured.svc, secured.receiver
    dead = f"http://127.0.0.1:{free_port()}/gone"
    with svc.client() as client:
        slow = client.post(
            "/v1/jobs",
            json={
                "kind": "embed",
                "input": {"texts": ["s"]},
                "webhook": f"http://127.0.0.1:{receiver.port}/slow",
            },
        ).json()
        gone = client.post(
            "/v1/jobs", json={"kind": "embed", "input": {"texts": ["d"]}, "webhook": dead}
        ).json()
        wait_until(lambda: receiver.to("/slow"), timeout=30, what="the slow receiver called")
        # While that delivery hangs, later jobs run and finish as usual.
        started = time.monotonic()
        after = [
            client.post("/v1/jobs", json={"kind": "embed", "input": {"texts": [f"n{i}"]}}).json()
            for i in range(3)
        ]
        assert all(wait_job(client, j["id"], timeout=30)["status"] == "succeeded" for j in after)
        assert time.monotonic() - started < 8  # well before the slow receiver answers (10 s)
        failed = wait_until(
            lambda: (j := client.get(f"/v1/jobs/{gone['id']}").json())["webhook"]["state"] == "failed" and j,
            timeout=60,
            what="webhook to a dead port given up",
        )
        assert failed["status"] == "succeeded" and failed["webhook"]["attempts"] == 3
        assert "ConnectError" in failed["webhook"]["error"] and "/gone" not in failed["webhook"]["error"]
        assert client.get(f"/v1/jobs/{slow['id']}").json()["status"] == "succeeded"


def test_secrets_never_reach_logs_job_rows_or_flower(secured: Secured) -> None:
    svc = secured.svc
    secret = tensorq(svc.env, "keys", "webhook-secret", "--tenant", _tenant(svc)).stdout.strip()
    with svc.client() as client:
        # Some failures too: a bad key, a bad webhook, a job that fails.
        assert client.get("/v1/jobs", headers={"Authorization": f"Bearer {svc.api_key}x"}).status_code == 401
        assert (
            client.post(
                "/v1/jobs", json={"kind": "embed", "input": {"texts": ["x"]}, "webhook": "http://10.1.2.3/h"}
            ).status_code
            == 422
        )
        bad = client.post("/v1/jobs", json={"kind": "classify", "input": {"model": "nope", "texts": ["x"]}})
        assert wait_job(client, bad.json()["id"])["status"] == "failed"
    # Flower requires its password, and shows tasks by job id only.
    assert httpx.get(f"{secured.flower_url}/api/tasks", timeout=10).status_code == 401
    tasks = wait_until(
        lambda: (
            (r := httpx.get(f"{secured.flower_url}/api/tasks", auth=FLOWER_AUTH, timeout=10)).json()
            and r.text
        ),
        timeout=30,
        what="tasks in Flower",
    )
    with psycopg.connect(secured.pg_url) as conn:
        rows = json.dumps(conn.execute("SELECT * FROM jobs").fetchall(), default=str)
        keys = json.dumps(conn.execute("SELECT * FROM api_keys").fetchall(), default=str)
    logs = {p.name: p.read_text(errors="replace") for p in svc.log_dir.glob("*.log")}
    assert {"api.log", "worker.log", "flower.log"} <= set(logs) and all(logs.values())
    for name, text in {
        **logs,
        "flower /api/tasks": tasks,
        "jobs table": rows,
        "api_keys table": keys,
    }.items():
        for what, value in (
            ("API key", svc.api_key),
            ("webhook secret", secret),
            ("Redis password", REDIS_PASSWORD),
        ):
            assert value not in text, f"{what} found in {name}"
    for name, text in logs.items():
        assert URL_TOKEN not in text, f"a webhook URL's query found in {name}"


def _tenant(svc: Service) -> str:
    with svc.client() as client:
        return tenant_of(client)


def test_the_worker_refuses_a_pickled_message(secured: Secured) -> None:
    from celery import Celery

    sender = Celery(
        broker=secured.svc.env["TENSORQ_REDIS_URL"]
    )  # a client that pickles, as an attacker's might
    sender.send_task("tensorq.embed", args=["not-a-job"], queue="inference", serializer="pickle")
    wait_until(
        lambda: "untrusted content of type pickle" in secured.svc.worker.log(),
        timeout=30,
        what="refusal logged",
    )
    assert secured.svc.worker.alive()
    sender.close()
