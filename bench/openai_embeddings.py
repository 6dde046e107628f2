"""One-text POST /openai/v1/embeddings beside native POST /v1/jobs with `Prefer: wait`, one run.

Starts the service like bench/run.py (API + one CPU worker on a fresh PostgreSQL database and
Redis), then measures, for each of the two endpoints on the same service:

- latency: `--latency-n` sequential requests, the two endpoints alternating request by request;
- throughput: `--threads` clients sending `--requests` requests in all, each endpoint in turn.

    python -m bench.openai_embeddings [--latency-n 100] [--requests 400] [--threads 8]

Prints the figures as JSON (and writes them to bench/results/openai_embeddings.json).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from bench.harness import drop_database
from bench.run import ROOT, machine, pct, run_service, stop

TEXT = "hello world"


def openai_call(client: httpx.Client) -> None:
    r = client.post("/openai/v1/embeddings", json={"model": "all-MiniLM-L6-v2", "input": TEXT})
    assert r.status_code == 200 and len(r.json()["data"][0]["embedding"]) == 384, r.text


def native_call(client: httpx.Client) -> None:
    r = client.post(
        "/v1/jobs", json={"kind": "embed", "input": {"texts": [TEXT]}}, headers={"Prefer": "wait"}
    )
    assert r.status_code == 201 and r.json()["status"] == "succeeded", r.text


CALLS: dict[str, Callable[[httpx.Client], None]] = {"openai": openai_call, "native": native_call}


def latency(client: httpx.Client, n: int) -> dict[str, dict[str, float]]:
    samples: dict[str, list[float]] = {name: [] for name in CALLS}
    for _ in range(n):
        for name, call in CALLS.items():
            start = time.perf_counter()
            call(client)
            samples[name].append((time.perf_counter() - start) * 1000)
    return {
        name: {"p50_ms": pct(v, 50), "p95_ms": pct(v, 95), "mean_ms": statistics.fmean(v), "n": len(v)}
        for name, v in samples.items()
    }


def throughput(
    make_client: Callable[[], httpx.Client], call: Callable[[httpx.Client], None], n: int, threads: int
) -> dict[str, float]:
    per_thread = n // threads
    times: list[float] = []
    lock = threading.Lock()

    def work() -> None:
        with make_client() as client:
            for _ in range(per_thread):
                start = time.perf_counter()
                call(client)
                with lock:
                    times.append((time.perf_counter() - start) * 1000)

    started = time.perf_counter()
    workers = [threading.Thread(target=work) for _ in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    elapsed = time.perf_counter() - started
    return {
        "requests_per_s": len(times) / elapsed,
        "p50_ms": pct(times, 50),
        "p95_ms": pct(times, 95),
        "n": len(times),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--latency-n", type=int, default=100)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--postgres-url", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/12")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "openai_embeddings.json"))
    args = parser.parse_args()

    results: dict[str, Any] = {"machine": machine()}
    with tempfile.TemporaryDirectory() as tmpdir:
        svc, pg = run_service(args.postgres_url, args.redis_url, Path(tmpdir))
        try:
            with svc.client() as client:
                for call in CALLS.values():  # warm both paths
                    for _ in range(5):
                        call(client)
                results["latency"] = latency(client, args.latency_n)
            results["throughput"] = {
                name: throughput(svc.client, call, args.requests, args.threads)
                for name, call in CALLS.items()
            }
            results["threads"] = args.threads
        finally:
            stop(svc)
            drop_database(args.postgres_url, pg)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
