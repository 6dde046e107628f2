"""This checkout's service against another checkout's (an earlier commit, say), side by side on
one machine, rounds alternating, so a drift in the machine's speed reaches both alike: on a shared
2-vCPU VM the same measure moves 30-50% between runs minutes apart, more than most changes.

    git worktree add /tmp/base <commit>
    python -m bench.compare --base /tmp/base [--rounds 3] [--jobs 600] [--lone 40]

Both services run with this checkout's Python environment, each from its own tree (`python -m
tensorq.cli` from the checkout's root). Per round and service: lone jobs with `Prefer: wait`,
then POST-per-job and `:batch` embed throughput with the CPU per job of each part. Prints the
medians and the ratios this/base, and appends them to docs/performance.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import statistics
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench import harness
from bench.harness import ROOT, Service, drop_database
from bench.run import lone_jobs, machine, pct, run_service, stop, throughput

MODEL_PART = "worker child"  # where the forward pass runs (prefork)


@contextlib.contextmanager
def started_from(tree: Path) -> Iterator[None]:
    """Services started inside run `python -m tensorq.cli` from `tree` (cwd first on sys.path)."""
    saved = harness.ROOT
    harness.ROOT = tree
    try:
        yield
    finally:
        harness.ROOT = saved


def measure(svc: Service, jobs: int, lone: int) -> dict[str, float]:
    with svc.client() as client:
        samples = lone_jobs(client, lone, prefer_wait=True)
    post = throughput(svc, jobs, via_batch=False)
    batch = throughput(svc, jobs, via_batch=True)
    assert post["failed"] == 0 and batch["failed"] == 0, (post, batch)

    def outside(run: dict[str, Any]) -> float:
        return sum(v for part, v in run["cpu_ms_per_job"].items() if part != MODEL_PART)

    return {
        "lone p50 ms": pct(samples["total"], 50),
        "lone: model p50 ms": pct(samples["run_ms"], 50),
        "POST per job, jobs/s": post["sentences_per_s"],
        ":batch, jobs/s": batch["sentences_per_s"],
        "POST: API CPU ms/job": post["cpu_ms_per_job"].get("api", 0.0),
        "POST: CPU ms/job outside the model": outside(post),
        ":batch: API CPU ms/job": batch["cpu_ms_per_job"].get("api", 0.0),
        ":batch: CPU ms/job outside the model": outside(batch),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base", required=True, help="the other checkout's root")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=600)
    parser.add_argument("--lone", type=int, default=40)
    parser.add_argument("--postgres-url", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--redis-urls", default="redis://127.0.0.1:6379/2,redis://127.0.0.1:6379/3")
    parser.add_argument("--doc", default=str(ROOT / "docs" / "performance.md"))
    args = parser.parse_args()
    base_tree = Path(args.base).resolve()
    runs: dict[str, list[dict[str, float]]] = {"base": [], "this": []}
    with tempfile.TemporaryDirectory() as tmpdir:
        services: dict[str, tuple[Service, str]] = {}
        try:
            base_redis, this_redis = args.redis_urls.split(",")
            with started_from(base_tree):
                services["base"] = run_service(args.postgres_url, base_redis, Path(tmpdir))
            services["this"] = run_service(args.postgres_url, this_redis, Path(tmpdir))
            for svc, _ in services.values():  # warm: model loaded, pools filled
                throughput(svc, 100, via_batch=True)
            for r in range(args.rounds):
                for name in ("base", "this") if r % 2 == 0 else ("this", "base"):
                    runs[name].append(measure(services[name][0], args.jobs, args.lone))
                    print(f"round {r + 1} {name}: {runs[name][-1]}", flush=True)
        finally:
            for svc, pg in services.values():
                stop(svc)
                drop_database(args.postgres_url, pg)
    report(args, base_tree, runs)


def report(args: argparse.Namespace, base_tree: Path, runs: dict[str, list[dict[str, float]]]) -> None:
    m: dict[str, Any] = machine()
    rows = ""
    for measure_name in runs["this"][0]:
        base = statistics.median(r[measure_name] for r in runs["base"])
        this = statistics.median(r[measure_name] for r in runs["this"])
        every = " / ".join(
            f"{', '.join(f'{r[measure_name]:.1f}' for r in runs[name])}" for name in ("base", "this")
        )
        rows += f"| {measure_name} | {base:.2f} | {this:.2f} | {this / base:.2f} | {every} |\n"
    text = (
        f"\n## This checkout against {base_tree.name} ({dt.date.today()})\n\n"
        f"`python -m bench.compare --base {base_tree} --rounds {args.rounds} --jobs {args.jobs} "
        f"--lone {args.lone}` on {m.get('cpu', '?')} ({m.get('cores', '?')} cores), {m['date']}; two "
        "services side by side (own PostgreSQL and Redis databases), rounds alternating; medians.\n\n"
        "| measure | base | this | this / base | every round (base / this) |\n|---|---|---|---|---|\n" + rows
    )
    print(text)
    with open(args.doc, "a") as f:
        f.write(text)


if __name__ == "__main__":
    main()
