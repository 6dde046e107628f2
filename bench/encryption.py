"""What encryption at rest costs: `:batch` embed jobs through the service with tenants' data sealed
(the default) and through an identical one storing it unencrypted (the benchmark-only
TENSORQ_BENCHMARK_UNENCRYPTED control), rounds alternating between the two in one run.

    python -m bench.encryption [--jobs 600] [--rounds 3]

Prints the figures and the ratio (target: encrypted >= 0.95 of unencrypted), and appends them to
docs/performance.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import tempfile
from pathlib import Path
from typing import Any

from bench.harness import ROOT, drop_database
from bench.run import machine, run_service, stop, throughput


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=600)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--postgres-url", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--redis-urls", default="redis://127.0.0.1:6379/7,redis://127.0.0.1:6379/8")
    parser.add_argument("--doc", default=str(ROOT / "docs" / "performance.md"))
    args = parser.parse_args()
    sealed_redis, plain_redis = args.redis_urls.split(",")
    rates: dict[str, list[float]] = {"encrypted": [], "unencrypted": []}
    cpu: dict[str, list[dict[str, float]]] = {"encrypted": [], "unencrypted": []}
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        sealed, sealed_pg = run_service(args.postgres_url, sealed_redis, tmp)
        plain, plain_pg = run_service(
            args.postgres_url, plain_redis, tmp, TENSORQ_BENCHMARK_UNENCRYPTED="true"
        )
        try:
            throughput(sealed, 100, via_batch=True)  # warm both: model loaded, pools filled
            throughput(plain, 100, via_batch=True)
            for i in range(args.rounds):
                order = [("encrypted", sealed), ("unencrypted", plain)]
                for name, svc in order if i % 2 == 0 else order[::-1]:
                    run = throughput(svc, args.jobs, via_batch=True)
                    assert run["failed"] == 0, run
                    rates[name].append(run["sentences_per_s"])
                    cpu[name].append(run["cpu_ms_per_job"])
                    print(f"round {i + 1} {name}: {run['sentences_per_s']:.0f} jobs/s", flush=True)
        finally:
            stop(sealed)
            stop(plain)
            drop_database(args.postgres_url, sealed_pg)
            drop_database(args.postgres_url, plain_pg)
    report(args, rates, cpu)


def report(
    args: argparse.Namespace, rates: dict[str, list[float]], cpu: dict[str, list[dict[str, float]]]
) -> None:
    median = {k: statistics.median(v) for k, v in rates.items()}
    ratio = median["encrypted"] / median["unencrypted"]

    def cpu_line(name: str) -> str:
        groups = sorted({g for run in cpu[name] for g in run})
        return ", ".join(f"{g} {statistics.median(run.get(g, 0.0) for run in cpu[name]):.2f}" for g in groups)

    m: dict[str, Any] = machine()
    text = (
        f"\n## Encryption at rest: `:batch` embed throughput, sealed vs unencrypted ({dt.date.today()}, issue #21)\n\n"
        f"`python -m bench.encryption --jobs {args.jobs} --rounds {args.rounds}` on {m.get('cpu', '?')} "
        f"({m.get('cores', '?')} cores); two services side by side (own PostgreSQL databases, own Redis "
        "databases), rounds alternating, median of the rounds.\n\n"
        "| service | jobs/s (median) | every round | CPU ms per job outside the model |\n|---|---|---|---|\n"
        + "".join(
            f"| {name} | {median[name]:.0f} | {', '.join(f'{r:.0f}' for r in rates[name])} | {cpu_line(name)} |\n"
            for name in ("encrypted", "unencrypted")
        )
        + f"\nRatio encrypted / unencrypted: **{ratio:.3f}** (target >= 0.95).\n"
    )
    print(text)
    with open(args.doc, "a") as f:
        f.write(text)


if __name__ == "__main__":
    main()
