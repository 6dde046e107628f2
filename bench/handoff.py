"""How a worker hands inference jobs to the model: Celery's prefork pool (the parent takes the
message and passes it to a child process over a pipe, the child runs the job) against the solo
pool (the main process runs it, no hop) and the threads pool (a thread of the main process).
Three services side by side, identical but for TENSORQ_WORKER_POOL, measured in alternating
rounds in one run:

    python -m bench.handoff [--lone 60] [--jobs 600] [--rounds 3]

Per pool: a lone job's latency through `POST /v1/jobs` with `Prefer: wait` (p50, p99, and
created -> finished from the job's timestamps), `:batch` embed throughput, and CPU per job of
every part (with solo the model runs in the worker's main process, so it is not split out). Prints a table and appends it to
docs/performance.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import tempfile
from pathlib import Path
from typing import Any

from bench.harness import ROOT, Service, drop_database
from bench.run import lone_jobs, machine, pct, run_service, stop, throughput

POOLS = ("prefork", "solo", "threads")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lone", type=int, default=60, help="lone jobs per pool per round")
    parser.add_argument("--jobs", type=int, default=600, help=":batch jobs per pool per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--postgres-url", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--redis-db", type=int, default=4, help="first of three Redis databases")
    parser.add_argument("--doc", default=str(ROOT / "docs" / "performance.md"))
    args = parser.parse_args()
    lone: dict[str, list[float]] = {p: [] for p in POOLS}
    answer: dict[str, list[float]] = {p: [] for p in POOLS}
    rates: dict[str, list[float]] = {p: [] for p in POOLS}
    cpu: dict[str, list[float]] = {p: [] for p in POOLS}
    with tempfile.TemporaryDirectory() as tmpdir:
        services: dict[str, tuple[Service, str]] = {}
        try:
            for i, pool in enumerate(POOLS):
                redis_url = f"redis://127.0.0.1:6379/{args.redis_db + i}"
                services[pool] = run_service(
                    args.postgres_url, redis_url, Path(tmpdir), TENSORQ_WORKER_POOL=pool
                )
            for svc, _ in services.values():  # warm: model loaded, pools filled
                throughput(svc, 100, via_batch=True)
                with svc.client() as client:
                    lone_jobs(client, 10, prefer_wait=True)
            for r in range(args.rounds):
                order = POOLS if r % 2 == 0 else POOLS[::-1]
                for pool in order:
                    svc = services[pool][0]
                    with svc.client() as client:
                        samples = lone_jobs(client, args.lone, prefer_wait=True)
                    lone[pool] += samples["total"]
                    answer[pool] += [q + run for q, run in zip(samples["queue"], samples["run"], strict=True)]
                    run = throughput(svc, args.jobs, via_batch=True)
                    assert run["failed"] == 0, run
                    rates[pool].append(run["sentences_per_s"])
                    cpu[pool].append(sum(run["cpu_ms_per_job"].values()))
                    print(
                        f"round {r + 1} {pool}: lone p50 {pct(samples['total'], 50):.1f} ms, "
                        f":batch {run['sentences_per_s']:.0f} jobs/s",
                        flush=True,
                    )
        finally:
            for svc, pg in services.values():
                stop(svc)
                drop_database(args.postgres_url, pg)
    report(args, lone, answer, rates, cpu)


def report(
    args: argparse.Namespace,
    lone: dict[str, list[float]],
    claim_to_finish: dict[str, list[float]],
    rates: dict[str, list[float]],
    cpu: dict[str, list[float]],
) -> None:
    m: dict[str, Any] = machine()
    base = pct(lone["prefork"], 50)
    rows = "".join(
        f"| {pool} | {pct(lone[pool], 50):.1f} ({pct(lone[pool], 50) - base:+.1f}) | "
        f"{pct(lone[pool], 99):.1f} | {pct(claim_to_finish[pool], 50):.1f} | "
        f"{statistics.median(rates[pool]):.0f} ({', '.join(f'{x:.0f}' for x in rates[pool])}) | "
        f"{statistics.median(cpu[pool]):.2f} |\n"
        for pool in POOLS
    )
    text = (
        f"\n## Worker hand-off for inference: prefork vs solo vs threads ({dt.date.today()}, issue #23)\n\n"
        f"`python -m bench.handoff --lone {args.lone} --jobs {args.jobs} --rounds {args.rounds}` on "
        f"{m.get('cpu', '?')} ({m.get('cores', '?')} cores), {m['date']}; three services side by side "
        "(own PostgreSQL and Redis databases), identical but for TENSORQ_WORKER_POOL, rounds alternating.\n\n"
        "| pool | lone job, Prefer: wait, p50 ms (vs prefork) | p99 ms | created -> finished p50 ms "
        "| `:batch` jobs/s, median (rounds) | CPU ms per `:batch` job, all parts, model included |\n|---|---|---|---|---|---|\n"
        + rows
    )
    print(text)
    with open(args.doc, "a") as f:
        f.write(text)


if __name__ == "__main__":
    main()
