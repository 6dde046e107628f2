"""Masked-LM pretraining throughput: `pretrain-mlm`'s run (tasks.pretrain_mlm.run_pretrain, with a
worker-like JobContext: a work directory, progress reports, a cancellation check) against a bare
PyTorch loop over the same texts, batch size, masking and model, in the same process, interleaved.

    python -m bench.pretrain [--rounds 6] [--steps 10] [--threads 1] [--warmup 1]

Each round runs the kind for `steps` steps (one epoch of `steps * 16` training texts plus the 10%
held out) and then the bare loop for as many steps. Texts are domain sentences joined until each
fills all 64 tokens, so every step is 16 x 64 = 1024 tokens. Timed: from the end of each run's first
step to the end of its last (model loading, perplexity and the epoch-end checkpoint are outside, as
the first step's warm-up is). The bare loop does the same arithmetic per step as the kind: collate
and mask, forward, loss at the masked positions, backward, gradient clipping, AdamW, schedule.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

BATCH = 16
LENGTH = 64
LR = 5e-4


def long_texts(n: int) -> list[str]:
    """`n` texts of at least LENGTH tokens: domain sentences joined."""
    from tasks.data import make_domain_corpus as corpus

    sentences = corpus.domain_texts(n * 6, seed=3)
    return [" ".join(sentences[i * 6 : (i + 1) * 6]) for i in range(n)]


def texts_for(steps: int) -> list[str]:
    """As many texts as make `steps` training steps after the 10% hold-out (pretrain_mlm.split)."""
    n = steps * BATCH
    while True:
        k = min(max(1, int(n * 0.1 + 0.5)), n - 1)
        if n - k == steps * BATCH:
            return long_texts(n)
        n += 1


def service_round(steps: int, seed: int) -> dict[str, Any]:
    from tasks.context import JobContext
    from tasks.pretrain_mlm import PretrainParams, run_pretrain

    texts = texts_for(steps)
    rows = [{"text": t} for t in texts]
    stamps: dict[int, float] = {}

    def report(progress: dict[str, Any]) -> None:
        stamps.setdefault(int(progress["step"]), time.perf_counter())

    work = Path(tempfile.mkdtemp(prefix="bench-pretrain-"))
    try:
        params = PretrainParams(
            dataset_id="bench",
            model_name="bench",
            epochs=1,
            batch_size=BATCH,
            learning_rate=LR,
            max_length=LENGTH,
            seed=seed,
        )
        ctx = JobContext(load_dataset=lambda _: rows, work_dir=work, attempt=1, report=report)
        result = run_pretrain(params, ctx)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    assert result.steps == steps, result.steps
    elapsed = stamps[steps] - stamps[1]
    return {
        "tokens_per_s": (steps - 1) * BATCH * LENGTH / elapsed,
        "perplexity_before": result.metrics.perplexity_before,
        "perplexity_after": result.metrics.perplexity_after,
    }


def bare_round(steps: int, seed: int) -> dict[str, Any]:
    import torch

    from tasks import mlm
    from tasks.train_text_classifier import linear_schedule

    texts = texts_for(steps)[: steps * BATCH]
    torch.manual_seed(seed)
    m = mlm.build_mlm_from_minilm("cpu")
    model, tokenizer = m.model, m.tokenizer
    items = mlm.tokenize(tokenizer, texts, LENGTH)
    assert all(len(item.input_ids) == LENGTH for item in items), "a text shorter than LENGTH tokens"
    collate = mlm.MaskingCollator(tokenizer, torch.Generator().manual_seed(seed + 1))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.01},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ],
        lr=LR,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(steps))
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    model.train()
    stamps = []
    for b in range(steps):
        batch = collate([items[i] for i in order[b * BATCH : (b + 1) * BATCH]])
        loss = mlm.masked_lm_loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        float(loss.item())
        stamps.append(time.perf_counter())
    return {"tokens_per_s": (steps - 1) * BATCH * LENGTH / (stamps[-1] - stamps[0])}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (imports, caches)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="also write the figures here as JSON")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    service: list[dict[str, Any]] = []
    bare: list[dict[str, Any]] = []
    started = time.monotonic()
    for w in range(args.warmup):
        print(
            f"warm-up {w + 1}: service {service_round(args.steps, seed=99)['tokens_per_s']:.0f}, "
            f"bare {bare_round(args.steps, seed=99)['tokens_per_s']:.0f} tokens/s (not counted)",
            flush=True,
        )
    for r in range(args.rounds):
        # Alternate which goes first, so neither always follows the other's cache and memory state.
        pair = (service_round, bare_round) if r % 2 == 0 else (bare_round, service_round)
        for run in pair:
            figures = run(args.steps, seed=r)
            (service if run is service_round else bare).append(figures)
            print(f"round {r + 1} {run.__name__.removesuffix('_round'):7} {figures}", flush=True)
    s = statistics.median(f["tokens_per_s"] for f in service)
    b = statistics.median(f["tokens_per_s"] for f in bare)
    ratios = [x["tokens_per_s"] / y["tokens_per_s"] for x, y in zip(service, bare, strict=True)]
    summary = {
        "machine": platform.processor() or platform.machine(),
        "torch_threads": args.threads,
        "rounds": args.rounds,
        "warmup_rounds": args.warmup,
        "steps_per_round": args.steps,
        "batch": f"{BATCH} x {LENGTH} tokens",
        "service_tokens_per_s_median": round(s, 1),
        "bare_tokens_per_s_median": round(b, 1),
        "ratio_of_medians": round(s / b, 3),
        "ratio_per_round": [round(x, 3) for x in ratios],
        "ratio_geomean": round(math.exp(statistics.mean(math.log(x) for x in ratios)), 3),
        "perplexity_before": [round(f["perplexity_before"], 1) for f in service],
        "perplexity_after": [round(f["perplexity_after"], 1) for f in service],
        "wall_s": round(time.monotonic() - started, 1),
    }
    print(json.dumps(summary, indent=2))
    if args.out is not None:
        args.out.write_text(
            json.dumps({"summary": summary, "service": service, "bare": bare}, indent=2) + "\n"
        )


if __name__ == "__main__":
    main()
