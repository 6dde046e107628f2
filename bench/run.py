"""tensorq benchmark: the bare model, the service without and with batching, submit rates, latency.

Everything is measured in one run on one machine against real PostgreSQL, real Redis and real
worker processes; the lone-job latency in blocks alternating with a bare Celery round trip and the
bare model on the same input, the two figures its overhead is judged against:

    python -m bench.run [--jobs 600] [--latency-n 100] [--repeat 3]

It prints a table, writes JSON to bench/results/latest.json and the table to docs/performance.md
(between the bench markers).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg
import redis

from bench.harness import Service, create_database, drop_database, service_env, start_service
from tasks import minilm
from tensorq.core.events import channel

ROOT = Path(__file__).resolve().parent.parent
SENTENCES = [
    f"{subject} {verb} {obj} on day {i}."
    for i, (subject, verb, obj) in enumerate(
        (s, v, o)
        for s in ("The cat", "A customer", "My neighbour", "The new model", "Our team", "The old bridge")
        for v in ("likes", "reviewed", "ignored", "painted", "measured", "described")
        for o in ("the report", "a red bicycle", "the quiet lake", "every invoice", "the final match")
    )
]
LONE_TEXT = "hello world"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def lone_model_ms(encoder: minilm.Encoder, n: int, pause_s: float = 0.0) -> list[float]:
    """The bare model's time for the lone job's input, `n` calls, each `pause_s` after the last."""
    times = []
    for _ in range(n):
        time.sleep(pause_s)
        start = time.perf_counter()
        minilm.embed_texts(encoder, [LONE_TEXT])
        times.append((time.perf_counter() - start) * 1000)
    return times


def bare_model(n: int) -> dict[str, Any]:
    encoder = minilm.load_encoder("cpu")
    texts = (SENTENCES * (n // len(SENTENCES) + 1))[:n]
    minilm.embed_texts(encoder, texts[:32])
    rates, cpu_ms = {}, {}
    for bs in (1, 8, 32, 64, 128):
        start, cpu_start = time.perf_counter(), time.process_time()
        for i in range(0, n, bs):
            minilm.embed_texts(encoder, texts[i : i + bs])
        rates[bs] = n / (time.perf_counter() - start)
        cpu_ms[bs] = (time.process_time() - cpu_start) * 1000 / n
    # The service's lone jobs reach the model every ~30 ms, not back to back: the same call after
    # an idle pause of that length, as a diagnostic (the overhead is taken against the same call back
    # to back, measured between the service's lone jobs: see `interleaved_latency`).
    after_pause = lone_model_ms(encoder, 50, pause_s=0.025)
    after_idle = lone_model_ms(encoder, 30, pause_s=0.2)
    best = max(rates, key=lambda b: rates[b])
    return {
        "rates_by_batch": rates,
        "best_batch": best,
        "sentences_per_s": rates[best],
        "cpu_ms_per_sentence": cpu_ms[best],
        "lone_after_pause_ms_p50": pct(after_pause, 50),
        "lone_after_idle_ms_p50": pct(after_idle, 50),
    }


def cpu_seconds(svc: Service) -> dict[tuple[str, int], float]:
    """CPU seconds (user + system) used so far by each process of the machine's parts, from /proc,
    keyed by (part, pid)."""
    tick = os.sysconf("SC_CLK_TCK")
    groups: dict[tuple[str, int], float] = {("client", os.getpid()): time.process_time()}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if int(pid) == os.getpid():
            continue
        fields = stat.rsplit(")", 1)[1].split()
        used = (int(fields[11]) + int(fields[12])) / tick
        if int(pid) == svc.worker.popen.pid:
            group = "worker parent"
        elif "tensorq.cli worker" in cmd:
            group = "worker child"
        elif "tensorq.cli api" in cmd:
            group = "api"
        elif cmd.startswith("postgres"):
            group = "postgres"
        elif "redis-server" in cmd:
            group = "redis"
        else:
            continue
        groups[(group, int(pid))] = used
    return groups


def cpu_ms_per_job(
    before: dict[tuple[str, int], float], after: dict[tuple[str, int], float], n: int
) -> dict[str, float]:
    """Each part's CPU between the two readings, per job. By process: one that started in between
    counts from zero; one that ended in between (a PostgreSQL backend whose connection closed) is
    left out, which undercounts it a little (summing parts had given PostgreSQL negative figures)."""
    out: dict[str, float] = {}
    for (group, pid), used in after.items():
        out[group] = out.get(group, 0.0) + (used - before.get((group, pid), 0.0)) * 1000 / n
    return out


@contextlib.contextmanager
def noop_worker(redis_url: str, log_dir: Path) -> Iterator[Callable[[int], list[float]]]:
    """A bare Celery worker (prefork, one child) with a no-op task; yields a function that times
    n `apply_async().get()` round trips of it."""
    env = {**os.environ, "BENCH_REDIS_URL": redis_url}
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "bench.noop_app",
            "worker",
            "-P",
            "prefork",
            "-c",
            "1",
            "--without-gossip",
            "--without-mingle",
            "-l",
            "WARNING",
        ],
        env=env,
        cwd=ROOT,
        stdout=(log_dir / "noop.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    os.environ["BENCH_REDIS_URL"] = redis_url
    from bench.noop_app import noop

    def round_trips(n: int) -> list[float]:
        times = []
        for _ in range(n):
            start = time.perf_counter()
            noop.apply_async().get(timeout=10)
            times.append((time.perf_counter() - start) * 1000)
        return times

    try:
        noop.apply_async().get(timeout=60)
        round_trips(20)
        yield round_trips
    finally:
        worker.terminate()
        worker.wait(timeout=30)


def wait_terminal(client: httpx.Client, job_id: str) -> dict[str, Any]:
    while True:
        job: dict[str, Any] = client.get(
            f"/v1/jobs/{job_id}", params={"wait": 30, "until": "finished"}
        ).json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job


def in_threads(n_threads: int, work: Callable[[int], None]) -> None:
    threads = [threading.Thread(target=work, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def throughput(svc: Service, n: int, via_batch: bool, n_threads: int = 8) -> dict[str, Any]:
    """n one-sentence jobs: first submit -> every result read back through the API (list pages)."""
    texts = (SENTENCES * (n // len(SENTENCES) + 1))[:n]
    submitted: list[str] = []
    # Clients are made before the clock starts: an httpx.Client costs ~20 ms to build (its SSL
    # context), and eight of them had delayed the first submission by 0.1-0.19 s.
    clients = [svc.client() for _ in range(n_threads + 1)]
    cpu_before = cpu_seconds(svc)
    start = time.perf_counter()

    def work(t: int) -> None:
        mine = texts[t::n_threads]
        with clients[t] as client:
            if via_batch:
                for i in range(0, len(mine), 100):
                    body = {"jobs": [{"kind": "embed", "input": {"texts": [x]}} for x in mine[i : i + 100]]}
                    submitted.extend(client.post("/v1/jobs:batch", json=body).json()["ids"])
            else:
                for x in mine:
                    submitted.append(
                        client.post("/v1/jobs", json={"kind": "embed", "input": {"texts": [x]}}).json()["id"]
                    )

    in_threads(n_threads, work)
    submit_seconds = time.perf_counter() - start
    with clients[-1] as client:
        # Wait on the last job submitted, then until nothing is queued or running, then read all.
        wait_terminal(client, submitted[-1])
        while any(
            client.get("/v1/jobs", params={"status": s, "limit": 1}).json()["items"]
            for s in ("queued", "running")
        ):
            time.sleep(0.02)
        wanted, results, cursor = set(submitted), 0, None
        while results < len(wanted):
            params: dict[str, Any] = {
                "status": "succeeded",
                "kind": "embed",
                "limit": 200,
                "include": "result",
            }
            if cursor:
                params["cursor"] = cursor
            page = client.get("/v1/jobs", params=params).json()
            results += sum(1 for job in page["items"] if job["id"] in wanted and job["result"]["embeddings"])
            cursor = page["next_cursor"]
            if not cursor:
                break
    elapsed = time.perf_counter() - start
    # Messages of jobs that another message's batch already finished are still consumed and
    # acknowledged after the last result is readable: their cost belongs to this run, and the
    # next run should start with an empty queue.
    quiesce(svc)
    cpu_after = cpu_seconds(svc)
    cpu_ms = cpu_ms_per_job(cpu_before, cpu_after, n)
    return {
        "jobs": n,
        "seconds": elapsed,
        "submit_seconds": submit_seconds,
        "sentences_per_s": n / elapsed,
        "results_read": results,
        "failed": n - results,
        "cpu_ms_per_job": cpu_ms,
    }


def median_throughput(svc: Service, n: int, via_batch: bool, repeat: int) -> dict[str, Any]:
    """`repeat` throughput runs back to back; the median run, with every run's rate beside it
    (runs minutes apart on this VM move by 10-30%)."""
    runs = sorted((throughput(svc, n, via_batch) for _ in range(repeat)), key=lambda r: r["sentences_per_s"])
    return {**runs[len(runs) // 2], "runs_sentences_per_s": [r["sentences_per_s"] for r in runs]}


def quiesce(svc: Service, timeout: float = 120) -> None:
    """Until the worker has consumed and acknowledged every message (kombu's Redis layout)."""
    broker = redis.Redis.from_url(svc.env["TENSORQ_REDIS_URL"])
    deadline = time.monotonic() + timeout
    try:
        while broker.llen("inference") or broker.hlen("unacked"):
            if time.monotonic() > deadline:
                raise TimeoutError("the worker did not drain its queue")
            time.sleep(0.05)
    finally:
        broker.close()


def submit_rate(svc: Service, n: int, n_threads: int = 8) -> dict[str, Any]:
    """Jobs/s accepted, with the worker paused (SIGSTOP) so only the API, DB and Redis work."""
    os.killpg(svc.worker.popen.pid, signal.SIGSTOP)
    try:
        body = {"kind": "embed", "input": {"texts": [LONE_TEXT]}}
        clients = [svc.client() for _ in range(2 * n_threads)]  # built before the clocks start
        start = time.perf_counter()

        def single(t: int) -> None:
            with clients[t] as client:
                for _ in range(n // n_threads):
                    client.post("/v1/jobs", json=body).raise_for_status()

        in_threads(n_threads, single)
        per_request = (n // n_threads * n_threads) / (time.perf_counter() - start)

        start = time.perf_counter()

        def batched(t: int) -> None:
            with clients[n_threads + t] as client:
                for _ in range(n // n_threads // 100 or 1):
                    client.post("/v1/jobs:batch", json={"jobs": [body] * 100}).raise_for_status()

        in_threads(n_threads, batched)
        per_batch = ((n // n_threads // 100 or 1) * 100 * n_threads) / (time.perf_counter() - start)
    finally:
        os.killpg(svc.worker.popen.pid, signal.SIGCONT)
    return {"post_jobs_per_s": per_request, "batch_jobs_per_s": per_batch}


class RawConnection:
    """One keep-alive HTTP/1.1 connection that POSTs JSON: the concurrent runs' load generator.
    httpx's AsyncClient had cost 15-19 ms of CPU per request at 64 connections on this 2-core
    machine, taking a core from the service it measures; this costs a fraction of that."""

    def __init__(self, base_url: str, api_key: str) -> None:
        host_port = base_url.removeprefix("http://")
        self.host, _, port = host_port.partition(":")
        self.port = int(port)
        self.head = (
            f"Host: {host_port}\r\nAuthorization: Bearer {api_key}\r\nContent-Type: application/json\r\n"
        )
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    async def post(self, path: str, body: bytes, extra: str = "") -> tuple[int, bytes]:
        if self.reader is None or self.writer is None:
            await self.open()
        assert self.reader is not None and self.writer is not None
        self.writer.write(
            f"POST {path} HTTP/1.1\r\n{self.head}{extra}Content-Length: {len(body)}\r\n\r\n".encode() + body
        )
        await self.writer.drain()
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = next(
            (
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            ),
            None,
        )
        if length is None:
            raise ValueError("response without Content-Length")
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


def concurrent_posts(svc: Service, n_conns: int, n_jobs: int) -> dict[str, Any]:
    """`n_conns` client connections at once, each posting one one-sentence job per request with
    `Prefer: wait` (so a request ends when its job has), until `n_jobs` were sent: jobs/s, the
    requests' p50/p99 and the errors (anything but a 201 with a succeeded job, by status or
    exception name). One asyncio client process holds every connection."""
    texts = (SENTENCES * (n_jobs // len(SENTENCES) + 1))[:n_jobs]
    latencies: list[float] = []
    errors: Counter[str] = Counter()

    async def run() -> float:
        connections = [RawConnection(svc.base_url, svc.api_key) for _ in range(n_conns)]
        await asyncio.gather(
            *(c.open() for c in connections)
        )  # every connection open before the clock starts
        pending = iter(texts)

        async def connection(conn: RawConnection) -> None:
            for text in pending:
                body = json.dumps({"kind": "embed", "input": {"texts": [text]}}).encode()
                start = time.perf_counter()
                try:
                    status, data = await conn.post("/v1/jobs", body, "Prefer: wait=30\r\n")
                    if status != 201 or json.loads(data).get("status") != "succeeded":
                        errors[str(status)] += 1
                except (OSError, ValueError, asyncio.IncompleteReadError) as exc:
                    errors[type(exc).__name__] += 1
                    conn.close()
                latencies.append((time.perf_counter() - start) * 1000)

        start = time.perf_counter()
        try:
            await asyncio.gather(*(connection(c) for c in connections))
        finally:
            for c in connections:
                c.close()
        return time.perf_counter() - start

    cpu_before = cpu_seconds(svc)
    elapsed = asyncio.run(run())
    quiesce(svc)
    cpu_after = cpu_seconds(svc)
    return {
        "connections": n_conns,
        "jobs": n_jobs,
        "seconds": elapsed,
        "jobs_per_s": n_jobs / elapsed,
        "p50_ms": pct(latencies, 50),
        "p99_ms": pct(latencies, 99),
        "errors": dict(errors),
        "cpu_ms_per_job": cpu_ms_per_job(cpu_before, cpu_after, n_jobs),
    }


def outside_model(cpu_ms: dict[str, float]) -> float:
    """CPU per job outside the model: every process but the worker's pool child (the issue's
    measure; the child's own share beyond the model is shown by the capacity runs)."""
    return sum(v for g, v in cpu_ms.items() if g != "worker child")


def drain(svc: Service, pg_url: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with psycopg.connect(pg_url) as conn:
            left = conn.execute("SELECT count(*) FROM jobs WHERE status IN ('queued', 'running')").fetchone()
        if left and left[0] == 0:
            return
        time.sleep(0.5)
    raise TimeoutError("jobs did not drain")


class FinalEvents:
    """When each job's final event reached a subscriber of the deployment's events channel (as it
    reaches the API's listener): splits a lone job's answer into the worker's part (final UPDATE,
    commit, publish) and the API's (event to the client's bytes)."""

    def __init__(self, redis_url: str) -> None:
        self.seen: dict[str, float] = {}
        self._pubsub = redis.Redis.from_url(redis_url).pubsub(ignore_subscribe_messages=True)
        self._pubsub.subscribe(**{channel(redis_url): self._on_message})
        self._thread = self._pubsub.run_in_thread(sleep_time=0.5, daemon=True)  # a wait, not a poll

    def _on_message(self, message: dict[str, Any]) -> None:
        at = time.time()
        event = json.loads(message["data"])
        if event.get("final"):
            for job_id in event["ids"]:
                self.seen.setdefault(job_id, at)

    def close(self) -> None:
        self._thread.stop()
        self._thread.join(timeout=2)  # it closes the subscription as it ends


def lone_jobs(
    client: httpx.Client, n: int, prefer_wait: bool, idle_s: float = 0.0, events: FinalEvents | None = None
) -> dict[str, list[float]]:
    """n lone one-sentence jobs, submit -> result readable: one POST with `Prefer: wait`, or a POST
    followed by a long-poll GET; each `idle_s` after the previous answer (0: back to back)."""
    samples: dict[str, list[float]] = {
        k: [] for k in ("total", "run_ms", "submit", "queue", "run", "answer", "publish", "reply")
    }
    body = {"kind": "embed", "input": {"texts": [LONE_TEXT]}}
    for _ in range(n):
        time.sleep(idle_s)
        sent, start = time.time(), time.perf_counter()
        if prefer_wait:
            job = client.post("/v1/jobs", json=body, headers={"Prefer": "wait=30"}).json()
        else:
            job = wait_terminal(client, client.post("/v1/jobs", json=body).json()["id"])
        elapsed, answered = (time.perf_counter() - start) * 1000, time.time()
        assert job["status"] == "succeeded", job
        samples["total"].append(elapsed)
        samples["run_ms"].append(job["metrics"]["run_ms"])
        # Where the time went, from the job's own timestamps (one machine, one clock).
        created, started, finished = (
            datetime.fromisoformat(job[k]).timestamp() for k in ("created_at", "started_at", "finished_at")
        )
        for stage, ms in (
            ("submit", created - sent),
            ("queue", started - created),
            ("run", finished - started),
            ("answer", answered - finished),
        ):
            samples[stage].append(ms * 1000)
        seen = events.seen.pop(job["id"], None) if events is not None else None
        if seen is not None:
            samples["publish"].append((seen - finished) * 1000)
            samples["reply"].append((answered - seen) * 1000)
    return samples


def summary(samples: dict[str, list[float]]) -> dict[str, Any]:
    times = samples["total"]
    return {
        "p50_ms": pct(times, 50),
        "p99_ms": pct(times, 99),
        "mean_ms": statistics.fmean(times),
        "n": len(times),
        "worker_run_ms_p50": pct(samples["run_ms"], 50),
        "stages_ms_p50": {k: pct(samples[k], 50) for k in ("submit", "queue", "run", "answer")},
        # The answer's two parts: final UPDATE -> its event heard; event -> the client's bytes.
        "answer_ms_p50": {k: pct(samples[k], 50) for k in ("publish", "reply") if samples[k]},
    }


def interleaved_latency(
    svc: Service, round_trips: Callable[[int], list[float]], n: int, rounds: int = 5
) -> dict[str, Any]:
    """The lone-job latency and the two figures it is compared with, measured in alternating
    blocks (bare Celery round trips, the bare model on the same input, lone jobs with `Prefer:
    wait`, lone jobs with a long-poll), so a drift in the machine's speed over the minutes of a run
    reaches all of them alike."""
    encoder = minilm.load_encoder("cpu")
    for _ in range(20):
        minilm.embed_texts(encoder, [LONE_TEXT])
    celery: list[float] = []
    model: list[float] = []
    waits: dict[str, list[float]] = {}
    polls: dict[str, list[float]] = {}
    events = FinalEvents(svc.env["TENSORQ_REDIS_URL"])
    with svc.client() as client:
        lone_jobs(client, 10, prefer_wait=True)  # warm-up
        for _ in range(rounds):
            celery += round_trips(300 // rounds)
            model += lone_model_ms(encoder, 50 // rounds)
            time.sleep(0.05)  # the bench's own OpenMP threads stop spinning before the service runs
            for merged, prefer_wait in ((waits, True), (polls, False)):
                for key, values in lone_jobs(client, n // rounds, prefer_wait, events=events).items():
                    merged.setdefault(key, []).extend(values)
    events.close()
    return {
        "bare_celery": {"p50_ms": pct(celery, 50), "p99_ms": pct(celery, 99), "n": len(celery)},
        "lone_ms_p50": pct(model, 50),
        "latency": summary(waits),
        "latency_long_poll": summary(polls),
    }


def run_service(pg_admin: str, redis_url: str, tmp: Path, **env: str) -> tuple[Service, str]:
    pg_url = create_database(pg_admin, prefix="tensorq_bench")
    redis.Redis.from_url(redis_url).flushdb()
    log_dir = tmp / f"svc-{uuid.uuid4().hex[:6]}"
    log_dir.mkdir()
    # The benchmark measures the service, not the per-tenant rate limit: lift it.
    env = {"TENSORQ_TENANT_SUBMIT_RATE": "1000000", "TENSORQ_TENANT_SUBMIT_BURST": "1000000", **env}
    return start_service(service_env(pg_url, redis_url, log_dir, **env), log_dir), pg_url


def stop(svc: Service) -> None:
    svc.api.stop()
    svc.worker.stop()


def table(r: dict[str, Any]) -> str:
    """The measures this run took (`--sections`), one row each."""
    rows: list[tuple[str, str]] = []
    b = r.get("bare")
    if b:
        rows += [
            (f"bare model, best batch ({b['best_batch']})", f"{b['sentences_per_s']:.0f} sentences/s"),
            (
                "bare model, one at a time",
                f"{dict((int(k), v) for k, v in b['rates_by_batch'].items())[1]:.0f} sentences/s",
            ),
        ]
    if "naive" in r:
        rows.append(("naive (batching off, POST per job)", rate(r["naive"])))
    if "tensorq" in r:
        t, tb = r["tensorq"], r["tensorq_batch_submit"]
        lat, lp, cel, sub = r["latency"], r["latency_long_poll"], r["bare_celery"], r["submit"]
        idle = r["latency_after_idle"]
        rows += [
            ("tensorq (batching on, POST per job)", rate(t)),
            ("tensorq (batching on, POST /v1/jobs:batch)", rate(tb)),
            ("submit: POST /v1/jobs", f"{sub['post_jobs_per_s']:.0f} jobs/s"),
            ("submit: POST /v1/jobs:batch (100/request)", f"{sub['batch_jobs_per_s']:.0f} jobs/s"),
            (
                "latency, lone job, POST with Prefer: wait",
                f"p50 {lat['p50_ms']:.1f} ms, p99 {lat['p99_ms']:.1f} ms",
            ),
            (
                "latency, lone job, POST then long-poll GET",
                f"p50 {lp['p50_ms']:.1f} ms, p99 {lp['p99_ms']:.1f} ms",
            ),
            ("model time inside the worker (metrics.run_ms)", f"p50 {lat['worker_run_ms_p50']:.1f} ms"),
            (
                "latency, lone job 200 ms after the previous, Prefer: wait",
                f"p50 {idle['p50_ms']:.1f} ms, p99 {idle['p99_ms']:.1f} ms (model p50 {idle['worker_run_ms_p50']:.1f} ms)",
            ),
            ("Prefer: wait stages (p50 each)", stage_line(lat["stages_ms_p50"])),
        ]
        if lat.get("answer_ms_p50"):
            rows.append(("Prefer: wait answer, split (p50 each)", stage_line(lat["answer_ms_p50"])))
        rows.append(
            ("bare model, same input (between the lone jobs)", f"p50 {r['lone_model_ms_p50']:.1f} ms")
        )
        if b:
            rows += [
                ("bare model, same input after a 25 ms pause", f"p50 {b['lone_after_pause_ms_p50']:.1f} ms"),
                ("bare model, same input after a 200 ms pause", f"p50 {b['lone_after_idle_ms_p50']:.1f} ms"),
            ]
        rows += [
            ("service overhead (Prefer: wait p50 - model p50)", f"{r['overhead_ms']:.1f} ms"),
            ("service overhead (POST + long-poll p50 - model p50)", f"{r['overhead_long_poll_ms']:.1f} ms"),
        ]
        rows.append(
            (
                "bare Celery apply_async().get() no-op (between them)",
                f"p50 {cel['p50_ms']:.2f} ms, p99 {cel['p99_ms']:.2f} ms",
            )
        )
        for label, run in (("tensorq POST", t), ("tensorq :batch", tb)):
            rows.append((f"CPU ms per job, {label}", cpu_breakdown(run["cpu_ms_per_job"])))
            rows.append(
                (f"CPU ms per job outside the model, {label}", f"{outside_model(run['cpu_ms_per_job']):.2f}")
            )
    for conc in r.get("concurrent", []):
        rows.append(
            (
                f"{conc['connections']} concurrent connections, POST + Prefer: wait, one job each",
                concurrent_line(conc),
            )
        )
    cap = r.get("capacity")
    if cap:
        label = "capacity (BENCHMARK-ONLY mode: no forward pass)"
        for name, run in (("POST per job", cap["post"]), (":batch", cap["batch"])):
            rows.append((f"{label}, {name}", f"{run['sentences_per_s']:.0f} jobs/s"))
            rows.append((f"CPU ms per job, {label}, {name}", cpu_breakdown(run["cpu_ms_per_job"])))
        for conc in cap.get("concurrent", []):
            rows.append((f"{label}, {conc['connections']} connections, Prefer: wait", concurrent_line(conc)))
    if b:
        rows.append(("CPU ms per sentence, bare model best batch", f"{b['cpu_ms_per_sentence']:.1f}"))
    targets = {
        "tensorq/bare": ("ratio tensorq/bare", "target >= 0.6"),
        "tensorq:batch/bare": ("ratio tensorq/bare, jobs via :batch", "target >= 0.8"),
        "tensorq/naive": ("ratio tensorq/naive", "target >= 2.5"),
        "latency/bare-celery": ("ratio latency overhead/bare-celery", "target <= 4"),
    }
    for key, value in r.get("ratios", {}).items():
        name, target = targets[key]
        rows.append((name, f"{value:.2f} ({target})"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"| {k.ljust(width)} | {v} |" for k, v in rows)


def concurrent_line(conc: dict[str, Any]) -> str:
    errors = ", ".join(f"{k}: {v}" for k, v in conc["errors"].items()) or "none"
    return (
        f"{conc['jobs_per_s']:.0f} jobs/s, p50 {conc['p50_ms']:.1f} ms, p99 {conc['p99_ms']:.1f} ms, "
        f"errors {errors}; CPU outside the model {outside_model(conc['cpu_ms_per_job']):.2f} ms/job"
    )


def rate(run: dict[str, Any]) -> str:
    runs = run.get("runs_sentences_per_s", [run["sentences_per_s"]])
    if len(runs) == 1:
        return f"{run['sentences_per_s']:.0f} sentences/s"
    return f"{run['sentences_per_s']:.0f} sentences/s (median of {len(runs)} runs: {', '.join(f'{x:.0f}' for x in runs)})"


def stage_line(stages: dict[str, float]) -> str:
    names = {
        "submit": "request -> row created",
        "queue": "created -> claimed (started_at)",
        "run": "claimed -> final state written",
        "answer": "written -> client has it",
        "publish": "written -> its event heard (commit, publish, pub/sub)",
        "reply": "event heard -> client has it (API, HTTP, client)",
    }
    return ", ".join(f"{names[k]} {v:.1f} ms" for k, v in stages.items())


def cpu_breakdown(cpu_ms: dict[str, float]) -> str:
    parts = sorted(cpu_ms.items(), key=lambda kv: -kv[1])
    return f"{sum(cpu_ms.values()):.1f} = " + ", ".join(f"{g} {v:.1f}" for g, v in parts)


SECTIONS = ("bare", "naive", "tensorq", "concurrency", "capacity")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=600)
    parser.add_argument("--latency-n", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=3, help="throughput runs per measure (median reported)")
    parser.add_argument("--connections", default="16,64", help="concurrent-client runs: connections each")
    parser.add_argument(
        "--sections", default=",".join(SECTIONS), help=f"which measures to take, of {', '.join(SECTIONS)}"
    )
    parser.add_argument("--postgres-url", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/12")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "latest.json"))
    parser.add_argument("--doc", default=str(ROOT / "docs" / "performance.md"))
    args = parser.parse_args()
    sections = set(args.sections.split(","))
    if unknown := sections - set(SECTIONS):
        parser.error(f"unknown sections: {', '.join(sorted(unknown))}")
    connections = [int(n) for n in args.connections.split(",") if n]

    results: dict[str, Any] = {"machine": machine(), "jobs": args.jobs, "sections": sorted(sections)}
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        if "bare" in sections:
            print("bare model ...", flush=True)
            results["bare"] = bare_model(512)
        if "naive" in sections:
            print("naive service ...", flush=True)
            svc, pg = run_service(args.postgres_url, args.redis_url, tmp, TENSORQ_BATCHING="false")
            try:
                results["naive"] = median_throughput(svc, args.jobs, via_batch=False, repeat=args.repeat)
            finally:
                stop(svc)
                drop_database(args.postgres_url, pg)
        if sections & {"tensorq", "concurrency"}:
            print("tensorq service ...", flush=True)
            svc, pg = run_service(args.postgres_url, args.redis_url, tmp, TENSORQ_BATCHING="true")
            try:
                if "tensorq" in sections:
                    tensorq_measures(svc, pg, args, tmp, results)
                if "concurrency" in sections:
                    print("concurrent clients ...", flush=True)
                    results["concurrent"] = [concurrent_posts(svc, n, args.jobs) for n in connections]
            finally:
                stop(svc)
                drop_database(args.postgres_url, pg)
        if "capacity" in sections:
            print("queue capacity (benchmark-only mode: no forward pass) ...", flush=True)
            svc, pg = run_service(
                args.postgres_url, args.redis_url, tmp, TENSORQ_BENCHMARK_SKIP_FORWARD_PASS="true"
            )
            try:
                results["capacity"] = {
                    "post": median_throughput(svc, args.jobs, via_batch=False, repeat=args.repeat),
                    "batch": median_throughput(svc, args.jobs, via_batch=True, repeat=args.repeat),
                    "concurrent": [concurrent_posts(svc, n, args.jobs) for n in connections],
                }
            finally:
                stop(svc)
                drop_database(args.postgres_url, pg)

    results["ratios"] = ratios(results)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    text = table(results)
    m = results["machine"]
    print(f"\n{m['cpu']}, {m['cores']} cores, {m['date']}\n{text}")
    doc = Path(args.doc)
    if doc.exists() and sections == set(SECTIONS):
        body = doc.read_text()
        begin, end = "<!-- bench:start -->", "<!-- bench:end -->"
        if begin in body and end in body:
            block = (
                f"{begin}\nMeasured {m['date']} on {m['cpu']} ({m['cores']} cores), Python {m['python']}, "
                f"{args.jobs} one-sentence jobs per throughput run, {args.repeat} runs per throughput measure.\n\n| measure | result |\n|---|---|\n{text}\n{end}"
            )
            doc.write_text(body[: body.index(begin)] + block + body[body.index(end) + len(end) :])


def tensorq_measures(
    svc: Service, pg: str, args: argparse.Namespace, tmp: Path, results: dict[str, Any]
) -> None:
    print("latency, bare Celery and the bare model, interleaved ...", flush=True)
    with noop_worker(args.redis_url, tmp) as round_trips:
        interleaved = interleaved_latency(svc, round_trips, args.latency_n)
    results["bare_celery"] = interleaved["bare_celery"]
    results["lone_model_ms_p50"] = interleaved["lone_ms_p50"]
    results["latency"] = interleaved["latency"]
    results["latency_long_poll"] = interleaved["latency_long_poll"]
    # Sporadic jobs: every process (and, on a VM, every vCPU) has gone idle in between.
    with svc.client() as client:
        idle = lone_jobs(client, args.latency_n // 2, prefer_wait=True, idle_s=0.2)
    results["latency_after_idle"] = summary(idle)
    results["overhead_ms"] = results["latency"]["p50_ms"] - results["lone_model_ms_p50"]
    results["overhead_long_poll_ms"] = results["latency_long_poll"]["p50_ms"] - results["lone_model_ms_p50"]
    print("throughput ...", flush=True)
    results["tensorq"] = median_throughput(svc, args.jobs, via_batch=False, repeat=args.repeat)
    results["tensorq_batch_submit"] = median_throughput(svc, args.jobs, via_batch=True, repeat=args.repeat)
    results["submit"] = submit_rate(svc, 800)
    drain(svc, pg)


def ratios(results: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    bare = results.get("bare", {}).get("sentences_per_s")
    if "tensorq" in results:
        if bare:
            out["tensorq/bare"] = results["tensorq"]["sentences_per_s"] / bare
            out["tensorq:batch/bare"] = results["tensorq_batch_submit"]["sentences_per_s"] / bare
        if "naive" in results:
            out["tensorq/naive"] = results["tensorq"]["sentences_per_s"] / results["naive"]["sentences_per_s"]
        out["latency/bare-celery"] = results["overhead_ms"] / results["bare_celery"]["p50_ms"]
    return out


if __name__ == "__main__":
    main()
