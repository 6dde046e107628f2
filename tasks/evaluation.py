"""Measuring models: quality (classifier metrics, cosine to a parent), speed, size, and the held-out rows.

One measuring code for every model, so a parent and its optimised child are compared like for like.

Held-out rows (`heldout_split`):
- The version was trained on this dataset: its `TrainingRecord` says how (dataset id, seed,
  validation_split, rule) and the same validation rows are recomputed from the rows. For
  train-text-classifier (rule "stratified") that is `train_text_classifier.split` seeded by `seed`
  with `validation_split`, exactly as the Trainer drew it; `rows_sha256` (optional) detects a
  dataset that changed since.
- Otherwise (a dataset the version never saw): a deterministic 20% (rule "hash20"), a permutation
  seeded by the dataset id, so every model evaluated on that dataset gets the same rows.
"""

from __future__ import annotations

import hashlib
import json
import random
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tasks import minilm
from tasks.classifier import TextClassifier
from tasks.recipes import model_nbytes, parameter_count
from tensorq.core.sealed_files import PLAIN, Files

if TYPE_CHECKING:
    import torch

TRAINING_FILE = "training.json"
UNSEEN_FRACTION = 0.2
SPEED_BATCH = 64
LATENCY_RUNS = 40
THROUGHPUT_TEXTS = 256
THROUGHPUT_PASSES = 3
EVAL_BATCH = 64


# --- held-out rows ------------------------------------------------------------------------------


class TrainingRecord(BaseModel):
    """What a version's training must record so evaluation can find its held-out rows again.

    The worker writes it as `training.json` into a train-text-classifier version (from the job's
    params: dataset_id, seed, validation_split; rule "stratified"); optimize writes it into every
    child (the child's training rows are the parent's training rows)."""

    model_config = ConfigDict(extra="ignore")

    dataset_id: str
    rule: Literal["stratified", "hash20"] = "stratified"
    seed: int = 0
    validation_split: float = Field(default=0.2, ge=0.0, le=0.5)
    rows_sha256: str | None = None


def read_training_records(path: Path | str, files: Files = PLAIN) -> list[TrainingRecord]:
    """The datasets a version was trained on (its own and its ancestors'), from `training.json`:
    one record object, or {"records": [...]}. Missing or unreadable: none (every dataset unseen);
    sealed and tampered with: DataIntegrityError."""
    file = Path(path) / TRAINING_FILE
    if not files.exists(file):
        return []
    try:
        data = json.loads(files.read(file))
        items = data["records"] if isinstance(data, dict) and "records" in data else [data]
        return [TrainingRecord.model_validate(item) for item in items]
    except (ValueError, KeyError, TypeError, ValidationError):
        return []


def training_file_text(records: Sequence[TrainingRecord]) -> str:
    return json.dumps({"records": [r.model_dump(mode="json") for r in records]}, indent=2) + "\n"


def rows_sha256(rows: Sequence[dict[str, Any]]) -> str:
    """As train_text_classifier.fingerprint hashes rows: [text, label] per line, in order."""
    h = hashlib.sha256()
    for row in rows:
        h.update(json.dumps([row.get("text"), row.get("label")]).encode() + b"\n")
    return h.hexdigest()


def stratified_split(
    rows: Sequence[dict[str, Any]], seed: int, validation_split: float
) -> tuple[list[int], list[int]]:
    """train-text-classifier's split, recomputed: labels sorted, `split` with Generator(seed)."""
    import torch

    from tasks.train_text_classifier import split

    labels = sorted({str(r["label"]) for r in rows})
    label_id = {label: i for i, label in enumerate(labels)}
    targets = [label_id[str(r["label"])] for r in rows]
    return split(targets, len(labels), validation_split, torch.Generator().manual_seed(seed))


def hash20_split(
    n_rows: int, dataset_id: str, fraction: float = UNSEEN_FRACTION
) -> tuple[list[int], list[int]]:
    """A deterministic `fraction` of a dataset's rows, seeded by the dataset id (not by the model)."""
    seed = int.from_bytes(hashlib.sha256(dataset_id.encode()).digest()[:8], "big")
    order = list(range(n_rows))
    random.Random(seed).shuffle(order)
    k = min(max(1, round(n_rows * fraction)), n_rows - 1) if n_rows > 1 else 0
    return sorted(order[k:]), sorted(order[:k])


class Split(BaseModel):
    train_idx: list[int]
    val_idx: list[int]
    rule: Literal["stratified", "hash20"]
    source: Literal["training-validation", "unseen-dataset"]
    record: TrainingRecord


def heldout_split(
    rows: Sequence[dict[str, Any]], dataset_id: str, records: Sequence[TrainingRecord] = ()
) -> Split:
    """The rows a version was not trained on: its training's validation rows, or a fixed 20%."""
    record = next((r for r in records if r.dataset_id == dataset_id), None)
    if record is not None:
        same_rows = record.rows_sha256 is None or record.rows_sha256 == rows_sha256(rows)
        if same_rows and record.rule == "stratified" and all("label" in r for r in rows):
            train, val = stratified_split(rows, record.seed, record.validation_split)
            return Split(
                train_idx=train, val_idx=val, rule="stratified", source="training-validation", record=record
            )
        if same_rows and record.rule == "hash20":
            train, val = hash20_split(len(rows), dataset_id)
            return Split(
                train_idx=train, val_idx=val, rule="hash20", source="training-validation", record=record
            )
    train, val = hash20_split(len(rows), dataset_id)
    return Split(
        train_idx=train,
        val_idx=val,
        rule="hash20",
        source="unseen-dataset",
        record=TrainingRecord(dataset_id=dataset_id, rule="hash20", rows_sha256=rows_sha256(rows)),
    )


# --- quality -----------------------------------------------------------------------------------


class LabelMetrics(BaseModel):
    precision: float
    recall: float
    f1: float
    support: int


class ClassifierMetrics(BaseModel):
    examples: int
    accuracy: float
    macro_f1: float = Field(description="Mean F1 over labels occurring in truth or predictions.")
    per_label: dict[str, LabelMetrics]
    labels: list[str] = Field(description="Row and column order of confusion_matrix.")
    confusion_matrix: list[list[int]] = Field(description="[true label][predicted label] counts.")


def classifier_metrics(
    labels: Sequence[str], targets: Sequence[int], preds: Sequence[int]
) -> ClassifierMetrics:
    n = len(labels)
    cm = [[0] * n for _ in range(n)]
    for t, p in zip(targets, preds, strict=True):
        cm[t][p] += 1
    per_label: dict[str, LabelMetrics] = {}
    f1s = []
    for i, label in enumerate(labels):
        tp = cm[i][i]
        fp = sum(cm[r][i] for r in range(n)) - tp
        fn = sum(cm[i]) - tp
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
        per_label[label] = LabelMetrics(precision=precision, recall=recall, f1=f1, support=tp + fn)
        if tp + fp + fn:  # the label occurs in truth or predictions (train_text_classifier.macro_f1)
            f1s.append(f1)
    total = len(targets)
    return ClassifierMetrics(
        examples=total,
        accuracy=sum(cm[i][i] for i in range(n)) / total if total else 0.0,
        macro_f1=sum(f1s) / len(f1s) if f1s else 0.0,
        per_label=per_label,
        labels=list(labels),
        confusion_matrix=cm,
    )


def predict_ids(model: TextClassifier, texts: Sequence[str], batch: int = EVAL_BATCH) -> list[int]:
    import torch

    model.train(False)
    out: list[int] = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch):
            out += model.logits(list(texts[start : start + batch])).float().argmax(dim=-1).tolist()
    return out


def evaluate_classifier(
    model: TextClassifier, texts: Sequence[str], targets: Sequence[int]
) -> ClassifierMetrics:
    """Accuracy, macro-F1, per-label precision/recall/F1 and the confusion matrix (model.labels order)."""
    return classifier_metrics(model.labels, targets, predict_ids(model, texts))


def embeddings(model: Any, texts: Sequence[str], batch: int = EVAL_BATCH) -> torch.Tensor:
    """L2-normalised mean-pooled encoder output: an Encoder's embeddings, or what a classifier's head reads."""
    import torch
    import torch.nn.functional as F

    if isinstance(model, TextClassifier):
        chunks = []
        with torch.inference_mode():
            for start in range(0, len(texts), batch):
                enc = model.tokenizer(
                    list(texts[start : start + batch]),
                    padding=True,
                    truncation=True,
                    max_length=model.max_seq_length,
                    return_tensors="pt",
                ).to(model.device)
                out = model.encoder(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
                pooled = minilm.mean_pool(out.last_hidden_state, enc["attention_mask"])
                chunks.append(F.normalize(pooled.float(), dim=1).cpu())
        return torch.cat(chunks)
    max_tokens = getattr(model, "max_seq_length", minilm.MAX_TOKENS)
    return torch.cat(
        [
            minilm.embed_texts(model, list(texts[s : s + batch]), max_tokens=max_tokens).float()
            for s in range(0, len(texts), batch)
        ]
    )


class CosineMetrics(BaseModel):
    examples: int
    mean_cosine: float
    min_cosine: float


def cosine_to(model: Any, reference: Any, texts: Sequence[str]) -> CosineMetrics:
    """Mean and minimum cosine between `model`'s and `reference`'s embeddings of the same texts."""
    a, b = embeddings(model, texts), embeddings(reference, texts)
    cos = (a * b).sum(dim=1)
    return CosineMetrics(examples=len(texts), mean_cosine=float(cos.mean()), min_cosine=float(cos.min()))


# --- speed and size ----------------------------------------------------------------------------


class SpeedMetrics(BaseModel):
    device: str
    latency_p50_ms: float = Field(description="One text per call, tokenisation included.")
    latency_p95_ms: float
    throughput_per_s: float = Field(description=f"Texts per second in batches of {SPEED_BATCH}, best pass.")
    batch_size: int = SPEED_BATCH


def _infer(model: Any, texts: list[str]) -> None:
    if isinstance(model, TextClassifier):
        model.logits(texts)
    else:
        minilm.embed_texts(model, texts, max_tokens=getattr(model, "max_seq_length", minilm.MAX_TOKENS))


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def speed(
    model: Any,
    texts: Sequence[str],
    device: str | None = None,
    latency_runs: int | None = None,
    throughput_texts: int | None = None,
    passes: int | None = None,
) -> SpeedMetrics:
    """p50/p95 latency of one text and throughput at batch 64 on the model's own device
    (defaults: LATENCY_RUNS single texts; THROUGHPUT_TEXTS texts, best of THROUGHPUT_PASSES)."""
    import torch

    latency_runs = latency_runs or LATENCY_RUNS
    throughput_texts = throughput_texts or THROUGHPUT_TEXTS
    passes = passes or THROUGHPUT_PASSES

    if not texts:
        raise ValueError("speed needs at least one text")
    device = device or str(getattr(model, "device", "cpu"))
    pool = [texts[i % len(texts)] for i in range(max(throughput_texts, SPEED_BATCH))]
    if isinstance(model, TextClassifier):
        model.train(False)
    with torch.inference_mode():
        for i in range(3):  # warm-up: allocator, kernels, the tokenizer
            _infer(model, [pool[i % len(pool)]])
        _infer(model, pool[:SPEED_BATCH])
        latencies = []
        for i in range(latency_runs):
            start = time.perf_counter()
            _infer(model, [pool[i % len(pool)]])
            _sync(device)
            latencies.append((time.perf_counter() - start) * 1000)
        best = float("inf")
        for _ in range(passes):
            start = time.perf_counter()
            for s in range(0, len(pool), SPEED_BATCH):
                _infer(model, pool[s : s + SPEED_BATCH])
            _sync(device)
            best = min(best, time.perf_counter() - start)
    latencies.sort()
    p95 = latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))]
    return SpeedMetrics(
        device=device,
        latency_p50_ms=statistics.median(latencies),
        latency_p95_ms=p95,
        throughput_per_s=len(pool) / best,
    )


class SizeMetrics(BaseModel):
    disk_bytes: int = Field(description="Files of the version's directory.")
    memory_bytes: int = Field(description="Tensors held once loaded, packed int8 weights included.")
    parameters: int


def dir_nbytes(path: Path | str) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def size(model: Any, path: Path | str) -> SizeMetrics:
    return SizeMetrics(
        disk_bytes=dir_nbytes(path), memory_bytes=model_nbytes(model), parameters=parameter_count(model)
    )
