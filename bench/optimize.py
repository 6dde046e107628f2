"""Benchmark of the optimize methods against their parent, on this machine, in one run.

    HF_HUB_OFFLINE=1 python -m bench.optimize [--per-label-domain 1900] [--out optimize-bench.json]

Trains (or reuses, with --reuse DIR) a sentiment classifier on a generated set large enough that
one point of accuracy is 20 examples (4 x 1250 rows, 40% held out: 2000 validation rows), then
runs every method through `tasks.optimize_jobs.run_optimize` (the same code a worker runs: the
job's comparison measures parent and child on the same held-out rows), the distil-then-int8 chain,
and int8 of the shipped MiniLM as an embedder. Finally every model's speed is measured again,
interleaved over several rounds (best of each), so that load from other processes on a shared
machine does not favour one model over another.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

from tasks import evaluation, minilm
from tasks import optimizing as opt
from tasks.context import JobContext, JobError, ResolvedModel
from tasks.data import make_sentiment
from tasks.optimize_jobs import OptimizeParams, OptimizeResult, run_optimize
from tasks.train_text_classifier import TrainParams
from tasks.train_text_classifier import run as train

TARGETS = {
    # method: (throughput ratio at least, accuracy points lost at most)
    "quantize-int8": (1.6, 1.0),
    "distill": (1.8, 2.0),
    "prune-ffn": (1.3, 1.5),
    "distill+quantize-int8": (2.6, 2.5),
}
EMBEDDER_TARGET = (1.5, 0.98)  # throughput ratio, mean cosine


class Bench:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.versions: dict[str, list[Path]] = {}
        self.datasets: dict[str, list[dict[str, Any]]] = {}

    def register(self, name: str, path: Path) -> int:
        self.versions.setdefault(name, []).append(path)
        return len(self.versions[name])

    def resolve(self, ref: str) -> ResolvedModel:
        name, _, version = ref.partition(":")
        if name not in self.versions:
            raise JobError("ModelNotFound", ref)
        v = int(version) if version else len(self.versions[name])
        return ResolvedModel(name=name, version=v, path=self.versions[name][v - 1])

    def ctx(self, job: str) -> JobContext:
        last = [0.0]

        def report(progress: dict[str, Any]) -> None:
            if time.monotonic() - last[0] > 15:
                last[0] = time.monotonic()
                print(f"  [{job}] {progress}", flush=True)

        return JobContext(
            work_dir=self.root / job,
            attempt=1,
            report=report,
            resolve_model=self.resolve,
            load_dataset=lambda dataset_id: self.datasets[dataset_id],
        )


def rows(per_label_domain: int) -> list[dict[str, Any]]:
    old = make_sentiment.PER_LABEL_AND_DOMAIN
    make_sentiment.PER_LABEL_AND_DOMAIN = per_label_domain
    try:
        return list(make_sentiment.make_rows(seed=20261201))
    finally:
        make_sentiment.PER_LABEL_AND_DOMAIN = old


def optimize(
    bench: Bench, job: str, ref: str, method: str, dataset: str, **kw: Any
) -> tuple[OptimizeResult, float]:
    print(f"== {job}: {method} of {ref}", flush=True)
    start = time.monotonic()
    params = OptimizeParams.model_validate({"model": ref, "method": method, "dataset_id": dataset, **kw})
    result = run_optimize(params, bench.ctx(job))
    took = time.monotonic() - start
    print(f"   done in {took:.0f}s: {json.dumps(result.comparison.ratios)}", flush=True)
    return result, took


def row_of(name: str, ev: Any) -> dict[str, Any]:
    c = ev.classifier
    return {
        "model": name,
        "accuracy": c.accuracy if c else None,
        "macro_f1": c.macro_f1 if c else None,
        "throughput": ev.speed.throughput_per_s,
        "p50_ms": ev.speed.latency_p50_ms,
        "p95_ms": ev.speed.latency_p95_ms,
        "memory_mb": ev.size.memory_bytes / 1e6,
        "disk_mb": ev.size.disk_bytes / 1e6,
        "parameters": ev.size.parameters,
        "mean_cosine": ev.cosine_to_parent.mean_cosine if ev.cosine_to_parent else None,
        "min_cosine": ev.cosine_to_parent.min_cosine if ev.cosine_to_parent else None,
        "recipe": "+".join(ev.recipe) or "fp32",
    }


def fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def print_table(rows_: list[dict[str, Any]]) -> None:
    print(
        f"{'model':28} {'acc':>7} {'F1':>7} {'texts/s':>8} {'p50 ms':>7} {'p95 ms':>7} {'mem MB':>7} {'disk MB':>7} {'cos':>7}"
    )
    for r in rows_:
        print(
            f"{r['model']:28} {fmt(r['accuracy'], '.4f'):>7} {fmt(r['macro_f1'], '.4f'):>7} {r['throughput']:8.0f} "
            f"{r['p50_ms']:7.1f} {r['p95_ms']:7.1f} {r['memory_mb']:7.1f} {r['disk_mb']:7.1f} {fmt(r['mean_cosine'], '.4f'):>7}"
        )


def remeasure(models: dict[str, Any], texts: list[str], rounds: int) -> dict[str, dict[str, float]]:
    best: dict[str, dict[str, float]] = {}
    for _ in range(rounds):
        for name, model in models.items():
            s = evaluation.speed(model, texts)
            b = best.setdefault(name, {"throughput": 0.0, "p50_ms": float("inf")})
            b["throughput"] = max(b["throughput"], s.throughput_per_s)
            b["p50_ms"] = min(b["p50_ms"], s.latency_p50_ms)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--per-label-domain", type=int, default=1250)
    ap.add_argument("--validation-split", type=float, default=0.4)
    ap.add_argument("--root", type=Path, default=Path("var/bench-optimize"))
    ap.add_argument(
        "--reuse", type=Path, default=None, help="A classifier directory trained by an earlier run."
    )
    ap.add_argument("--distill-epochs", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("var/bench-optimize/results.json"))
    args = ap.parse_args()

    import torch

    bench = Bench(args.root.absolute())
    data = rows(args.per_label_domain)
    bench.datasets["sentiment-big"] = data
    bench.datasets["sentiment-texts"] = [{"text": r["text"]} for r in data]
    print(
        f"{len(data)} rows; torch {torch.__version__}, {torch.get_num_threads()} threads, engine {torch.backends.quantized.engine}"
    )
    timings: dict[str, float] = {}

    record = {
        "dataset_id": "sentiment-big",
        "rule": "stratified",
        "seed": 0,
        "validation_split": args.validation_split,
    }
    if args.reuse is not None:
        parent_dir = args.reuse.absolute()
    else:
        start = time.monotonic()
        result = train(
            TrainParams.model_validate(
                {
                    "dataset_id": "sentiment-big",
                    "epochs": 1,
                    "batch_size": 32,
                    "learning_rate": 1e-4,
                    "max_seq_length": 32,
                    "validation_split": args.validation_split,
                    "seed": 0,
                    "model_name": "sentiment",
                }
            ),
            bench.ctx("train"),
        )
        timings["train"] = time.monotonic() - start
        assert result.artifact_dir is not None
        parent_dir = Path(result.artifact_dir)
        print(f"trained in {timings['train']:.0f}s: {result.metrics}", flush=True)
    (parent_dir / evaluation.TRAINING_FILE).write_text(json.dumps(record))  # what the worker records
    bench.register("sentiment", parent_dir)

    results: dict[str, OptimizeResult] = {}
    results["quantize-int8"], timings["quantize-int8"] = optimize(
        bench, "int8", "sentiment:1", "quantize-int8", "sentiment-big"
    )
    results["distill"], timings["distill"] = optimize(
        bench,
        "distill",
        "sentiment:1",
        "distill",
        "sentiment-big",
        options={"student_layers": 3, "epochs": args.distill_epochs, "batch_size": 32},
    )
    results["prune-ffn"], timings["prune-ffn"] = optimize(
        bench,
        "prune",
        "sentiment:1",
        "prune-ffn",
        "sentiment-big",
        options={"keep_fraction": 0.5, "recovery_epochs": 1, "batch_size": 32},
    )
    assert results["distill"].artifact_dir is not None
    bench.register("sentiment", Path(results["distill"].artifact_dir))  # sentiment:2
    results["distill+quantize-int8"], timings["distill+quantize-int8"] = optimize(
        bench, "distill-int8", "sentiment:2", "quantize-int8", "sentiment-big"
    )
    results["embedder-int8"], timings["embedder-int8"] = optimize(
        bench,
        "embedder-int8",
        minilm.MODEL_NAME,
        "quantize-int8",
        "sentiment-texts",
        model_name="minilm-int8",
    )

    parent_eval = results["quantize-int8"].comparison.parent
    print("\n=== classifier: parent and children, as each optimize job measured them (held-out rows)")
    print(
        f"held-out rows: {results['quantize-int8'].comparison.split.examples} ({results['quantize-int8'].comparison.split.source})"
    )
    table = [row_of("parent (fp32, 6 layers)", parent_eval)]
    for key in TARGETS:
        table.append(
            row_of(key, results[key].comparison.child)
            | {"job_parent_throughput": results[key].comparison.parent.speed.throughput_per_s}
        )
    print_table(table)
    print("\n=== embedder: shipped MiniLM vs int8 (held-out 20% of the texts)")
    emb = results["embedder-int8"].comparison
    print_table([row_of("all-MiniLM-L6-v2 fp32", emb.parent), row_of("minilm-int8", emb.child)])
    print("fp32 modules kept:", results["embedder-int8"].recipe.steps[-1].resolved["fp32_modules"])
    print("calibration trail:", json.dumps(results["embedder-int8"].recipe.steps[-1].resolved["calibration"]))
    print("classifier int8 fp32 modules:", results["quantize-int8"].recipe.steps[-1].resolved["fp32_modules"])

    print(
        f"\n=== speed re-measured, interleaved, best of {args.rounds} rounds (batch 64 throughput, p50 of one text)"
    )
    texts = [r["text"] for r in data[:256]]
    models = {"parent": opt.load_model(parent_dir)}
    for key in TARGETS:
        assert results[key].artifact_dir is not None
        models[key] = opt.load_model(str(results[key].artifact_dir))
    models["minilm fp32"] = opt.load_model(minilm.model_dir())
    models["minilm int8"] = opt.load_model(str(results["embedder-int8"].artifact_dir))
    fair = remeasure(models, texts, args.rounds)

    verdicts = []
    pacc = parent_eval.classifier.accuracy if parent_eval.classifier else 0.0
    print(
        f"{'model':24} {'texts/s':>8} {'ratio':>6} {'p50 ms':>7} {'acc lost (points)':>18} {'target':>16} verdict"
    )
    for key, (min_ratio, max_lost) in TARGETS.items():
        ratio = fair[key]["throughput"] / fair["parent"]["throughput"]
        child = results[key].comparison.child.classifier
        lost = 100 * (pacc - (child.accuracy if child else 0.0))
        ok = ratio >= min_ratio and lost <= max_lost
        verdicts.append(
            {
                "method": key,
                "ratio": ratio,
                "job_ratio": results[key].comparison.ratios["throughput"],
                "accuracy_lost_points": lost,
                "target_ratio": min_ratio,
                "target_lost": max_lost,
                "met": ok,
            }
        )
        print(
            f"{key:24} {fair[key]['throughput']:8.0f} {ratio:6.2f} {fair[key]['p50_ms']:7.1f} {lost:18.2f} "
            f"{'>=' + str(min_ratio) + 'x, <=' + str(max_lost):>16} {'met' if ok else 'MISSED'}"
        )
    eratio = fair["minilm int8"]["throughput"] / fair["minilm fp32"]["throughput"]
    ecos = emb.child.cosine_to_parent.mean_cosine if emb.child.cosine_to_parent else 0.0
    eok = eratio >= EMBEDDER_TARGET[0] and ecos >= EMBEDDER_TARGET[1]
    verdicts.append(
        {
            "method": "embedder-int8",
            "ratio": eratio,
            "job_ratio": emb.ratios["throughput"],
            "mean_cosine": ecos,
            "target_ratio": EMBEDDER_TARGET[0],
            "target_cosine": EMBEDDER_TARGET[1],
            "met": eok,
        }
    )
    print(
        f"{'embedder int8':24} {fair['minilm int8']['throughput']:8.0f} {eratio:6.2f} {fair['minilm int8']['p50_ms']:7.1f} "
        f"{'cos ' + format(ecos, '.4f'):>18} {'>=1.5x, cos>=0.98':>16} {'met' if eok else 'MISSED'}"
    )
    print(
        f"parent {fair['parent']['throughput']:.0f} texts/s, minilm fp32 {fair['minilm fp32']['throughput']:.0f} texts/s"
    )

    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model_name = next(
        (line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("Model name")),
        platform.processor(),
    )
    out = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "cpu": model_name,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "rows": len(data),
        "timings_s": timings,
        "classifier_table": table,
        "embedder_table": [row_of("all-MiniLM-L6-v2", emb.parent), row_of("minilm-int8", emb.child)],
        "interleaved_speed": fair,
        "verdicts": verdicts,
        "int8_fp32_modules": {
            k: results[k].recipe.steps[-1].resolved["fp32_modules"]
            for k in ("quantize-int8", "distill+quantize-int8", "embedder-int8")
        },
        "int8_calibration": {
            k: results[k].recipe.steps[-1].resolved["calibration"]
            for k in ("quantize-int8", "distill+quantize-int8", "embedder-int8")
        },
        "ratios": {k: v.comparison.ratios for k, v in results.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
