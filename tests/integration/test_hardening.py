"""Issue #24 against real services: the API's memory under concurrent large listings, slow
headers and bodies cut, one JSON log line per error, dataset quotas under concurrent uploads,
and a device no worker has refused while a real CPU worker runs."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg
import pytest

from tests.conftest import POSTGRES_ADMIN_URL, Service
from tests.helpers import (
    Proc,
    create_api_key,
    create_database,
    drop_database,
    free_port,
    sealed_column,
    service_env,
    wait_job,
    wait_until,
)

pytestmark = pytest.mark.integration

TEXTS = 256
JOBS = 100


@dataclass
class Api:
    proc: Proc
    base: str
    port: int
    key: str
    db_url: str
    tenant: str

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.base, timeout=120, headers={"Authorization": f"Bearer {self.key}"})


@pytest.fixture(scope="module")
def api(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """An API process of its own (JSON logs, short timeouts, small quotas) on a database of its own."""
    tmp = tmp_path_factory.mktemp("hardening")
    db_url = create_database(POSTGRES_ADMIN_URL)
    port = free_port()
    env = service_env(
        db_url,
        redis_url,
        tmp,
        TENSORQ_LOG_FORMAT="json",
        TENSORQ_REQUEST_HEADER_TIMEOUT_SECONDS="2",
        TENSORQ_REQUEST_BODY_TIMEOUT_SECONDS="2",
        TENSORQ_TENANT_MAX_DATASET_BYTES=str(3 * 4096),
        TENSORQ_TENANT_SUBMIT_RATE="100000",
        TENSORQ_TENANT_SUBMIT_BURST="100000",
    )
    proc = Proc("api", ["api", "--port", str(port)], env, tmp)
    base = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert proc.alive(), proc.log()
        try:
            return httpx.get(f"{base}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(ready, 60, 0.3, "api ready")
    tenant = f"h-{os.urandom(3).hex()}"
    yield Api(proc, base, port, create_api_key(db_url, tenant), db_url, tenant)
    proc.stop()
    drop_database(POSTGRES_ADMIN_URL, db_url)


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def insert_finished_embed_jobs(db_url: str, tenant: str, n: int, texts: int) -> None:
    """Succeeded embed jobs with results of the real size (384 floats a text), as a worker leaves
    them: sealed with the tenant's data key."""
    result = {"model": "all-MiniLM-L6-v2", "dim": 384, "embeddings": [[0.0123456789] * 384] * texts}
    params = {"texts": [f"a text of some length, number {i}" for i in range(texts)]}
    with psycopg.connect(db_url) as conn:
        for _ in range(n):
            job_id = uuid.uuid4()
            conn.execute(
                "INSERT INTO jobs (id, tenant, kind, model, queue, status, params, result, attempts,"
                " max_attempts, cancel_requested, created_at, updated_at, finished_at, webhook_attempts,"
                " batch_cost) VALUES (%s, %s, 'embed', 'all-MiniLM-L6-v2', 'inference',"
                " 'succeeded', %s, %s, 1, 3, false, clock_timestamp(), now(), now(), 0, %s)",
                (
                    job_id,
                    tenant,
                    json.dumps(sealed_column(db_url, tenant, job_id, "params", params)),
                    json.dumps(sealed_column(db_url, tenant, job_id, "result", result)),
                    texts,
                ),
            )


def test_concurrent_large_listings_keep_the_api_memory_flat(api: Api) -> None:
    insert_finished_embed_jobs(api.db_url, api.tenant, JOBS, TEXTS)
    pid = api.proc.popen.pid
    with api.client() as c:
        c.get("/v1/jobs", params={"limit": 1})  # warm
        before = rss_kb(pid)
        sizes: dict[str, int] = {}
        peak = before

        def listing(include: str | None) -> int:
            params = {"limit": 200, **({"include": include} if include else {})}
            r = c.get("/v1/jobs", params=params)
            assert r.status_code == 200, r.text[:300]
            page = r.json()
            if include:
                assert page["items"] and all(len(j["result"]["embeddings"]) == TEXTS for j in page["items"])
                assert page["next_cursor"]  # cut by bytes, not by the 200 asked for
            else:
                assert len(page["items"]) == JOBS and all(j["result"] is None for j in page["items"])
            sizes[include or "summary"] = max(sizes.get(include or "summary", 0), len(r.content))
            return len(r.content)

        stop = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not stop.is_set():
                peak = max(peak, rss_kb(pid))
                time.sleep(0.05)

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            with ThreadPoolExecutor(10) as pool:
                for _ in range(3):
                    list(pool.map(listing, [None, "result", "input,result", "result", None] * 2))
        finally:
            stop.set()
            sampler.join()
        after = rss_kb(pid)
    growth_mb = (peak - before) / 1024
    print(
        f"RSS before {before / 1024:.0f} MB, peak {peak / 1024:.0f} MB, after {after / 1024:.0f} MB; sizes {sizes}"
    )
    assert sizes["summary"] < 200 * 1024
    assert sizes["result"] <= 4 * 1024 * 1024
    assert growth_mb < 150, f"API RSS grew {growth_mb:.0f} MB"


def test_slow_headers_are_cut(api: Api) -> None:
    with socket.create_connection(("127.0.0.1", api.port), timeout=10) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        start = time.monotonic()
        closed = False
        for i in range(40):  # a header line every 0.25 s: 10 s if nothing cut it
            try:
                s.sendall(b"X-Slow-%d: y\r\n" % i)
                s.settimeout(0.25)
                if s.recv(1024) == b"":
                    closed = True
                    break
            except TimeoutError:
                continue
            except OSError:
                closed = True
                break
        assert closed, "the connection stayed open while its headers trickled"
        assert time.monotonic() - start < 5


def test_a_trickled_body_is_cut_with_408(api: Api) -> None:
    with socket.create_connection(("127.0.0.1", api.port), timeout=10) as s:
        head = (
            f"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {api.key}\r\n"
            "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
        )
        s.sendall(head.encode())
        start = time.monotonic()
        answer = b""
        s.settimeout(0.25)
        for _ in range(40):
            try:
                s.sendall(b" ")
                answer += s.recv(4096)
                if answer:
                    break
            except TimeoutError:
                continue
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert time.monotonic() - start < 5
        s.settimeout(5)
        while b"not received within" not in answer:  # the body may come in a later segment
            chunk = s.recv(4096)
            if not chunk:
                break
            answer += chunk
        assert b"not received within" in answer


def test_concurrent_uploads_cannot_pass_the_byte_quota(api: Api) -> None:
    # The quota is 3 x 4096 bytes; eight uploads of ~4000 bytes race for it.
    row = b'{"text": "%s", "label": "%s"}\n'
    body = b"".join(row % (b"x" * 70, b"ab"[i % 2 : i % 2 + 1]) for i in range(42))
    assert 3900 < len(body) <= 4096
    with api.client() as c, ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda _: c.post("/v1/datasets", content=body).status_code, range(8)))
        me = c.get("/v1/whoami").json()
    assert sorted(codes) == [201] * 3 + [413] * 5, codes
    assert me["usage"]["datasets"] == 3 and me["usage"]["dataset_bytes"] == 3 * len(body)


def test_an_unexpected_error_is_one_json_log_line(api: Api) -> None:
    # Runs last in this module: the datasets table goes away under the running API.
    offset = len(api.proc.log())
    with psycopg.connect(api.db_url) as conn:
        conn.execute("ALTER TABLE datasets RENAME TO datasets_gone")
    with api.client() as c:
        r = c.get("/v1/datasets")
    assert r.status_code == 500 and "internal error" in r.json()["detail"]
    time.sleep(0.5)
    lines = [line for line in api.proc.log()[offset:].splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line is JSON
    errors = [rec for rec in records if rec["level"] in ("ERROR", "CRITICAL")]
    assert len(errors) == 1 and "unhandled error" in errors[0]["message"], lines
    assert "datasets" in errors[0]["exc_info"]
    # and so is what uvicorn itself logged since the start
    assert all(json.loads(line) for line in api.proc.log().splitlines() if line.strip())


def test_a_device_no_worker_serves_is_refused_while_a_cpu_worker_runs(service: Service) -> None:
    with service.client() as c:
        gpu = c.post("/v1/jobs", json={"kind": "embed", "input": {"texts": ["x"]}, "device": "gpu"})
        assert gpu.status_code == 422 and gpu.json()["detail"][0]["loc"] == ["body", "device"], gpu.text
        assert "no live worker" in gpu.json()["detail"][0]["msg"]
        cpu = c.post("/v1/jobs", json={"kind": "embed", "input": {"texts": ["x"]}, "device": "cpu"})
        assert cpu.status_code == 202, cpu.text
        assert wait_job(c, cpu.json()["id"])["status"] == "succeeded"
