"""`train-text-classifier`: fine-tune all-MiniLM-L6-v2 (or a registered encoder, `base_model`: one
pretrain-mlm made) with a linear head on labelled texts.

Deterministic for a given seed on one device: the split, every epoch's order (one seeded
`torch.Generator`) and dropout (torch's RNG, forked so the caller's stream is left alone).

Checkpoints go to `work_dir/checkpoint/state.pt`, one file written aside and renamed over the old
one, at the end of every epoch and mid-epoch every CHECKPOINT_EVERY_S seconds. It holds the weights,
optimizer, scheduler, both RNG states, the split and the current epoch's order, so a redelivered job
continues where the last checkpoint left it and ends as an uninterrupted run would have.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

from tasks import classifier as clf
from tasks import minilm
from tasks import mlm as mlm_lib
from tasks.classify import ModelRef
from tasks.context import JobContext, JobError
from tasks.datasets import label_problem
from tasks.registry import JobKind
from tasks.texts import Storable, Text
from tensorq.core.sealed_files import PLAIN, Files

if TYPE_CHECKING:
    import torch

MAX_INLINE_ROWS = 2000
MAX_LABEL_CHARS = clf.MAX_LABEL_CHARS
CHECKPOINT_EVERY_S = 300.0  # mid-epoch; epochs always end with one
CHECKPOINT_FORMAT = 1
EVAL_BATCH = 64
WEIGHT_DECAY = 0.01
WARMUP_FRACTION = 0.1
MAX_GRAD_NORM = 1.0

Label = Annotated[str, StringConstraints(min_length=1, max_length=MAX_LABEL_CHARS), Storable]
ModelName = Annotated[str, StringConstraints(pattern=f"^{clf.MODEL_NAME_PATTERN}$")]
DatasetId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")]


class LabelledText(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: Text
    label: Label


class DatasetRow(LabelledText):
    model_config = ConfigDict(extra="ignore")  # stored datasets may carry ids or notes


class TrainParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dataset_id: DatasetId | None = Field(default=None, description="A stored dataset of {text, label} rows.")
    data: list[LabelledText] | None = Field(
        default=None,
        min_length=2,
        max_length=MAX_INLINE_ROWS,
        description="Inline rows, instead of dataset_id.",
    )
    epochs: int = Field(default=3, ge=1, le=50, strict=True)
    learning_rate: float = Field(default=5e-5, ge=1e-6, le=1e-2, allow_inf_nan=False, strict=True)
    batch_size: int = Field(default=16, ge=1, le=256, strict=True)
    max_seq_length: int = Field(
        default=64, ge=8, le=256, strict=True, description="Tokens per text; longer is cut."
    )
    validation_split: float = Field(default=0.2, ge=0.0, le=0.5, allow_inf_nan=False, strict=True)
    seed: int = Field(default=0, ge=0, le=2**32 - 1, strict=True)
    model_name: ModelName = Field(description="Name to register the trained model under.")
    base_model: ModelRef | Literal["all-MiniLM-L6-v2"] | None = Field(
        default=None,
        description="The encoder to start from: a registered masked-lm (or embedder) version, recorded as "
        "the new version's parent; default: the shipped all-MiniLM-L6-v2.",
    )

    @model_validator(mode="after")
    def _one_source(self) -> TrainParams:
        if (self.dataset_id is None) == (self.data is None):
            raise ValueError("give exactly one of dataset_id and data")
        return self

    @model_validator(mode="after")
    def _trainable_labels(self) -> TrainParams:
        # Refused at submission, as an uploaded dataset is at upload, not as a failed job later.
        if self.data is not None and (problem := label_problem(sorted({r.label for r in self.data}))):
            raise ValueError(problem)
        return self


class ModelMetrics(BaseModel):
    val_accuracy: float | None = Field(description="None when there was no validation split.")
    val_f1: float | None = Field(description="Macro F1 on the validation split.")
    train_loss: float = Field(description="Mean training loss over the last epoch.")


class TrainResult(BaseModel):
    """`model`, `labels`, `metrics` and `artifact_dir` are what the worker registers; it then
    replaces `artifact_dir` (a server path) with `artifact` (its place in the store) and adds `version`."""

    model: str = Field(description="The registered model's name.")
    version: int | None = Field(default=None, description="Set when the worker registers the version.")
    metrics: ModelMetrics
    labels: list[str]
    artifact_dir: str | None = Field(default=None, description="Absolute path of the saved classifier.")
    artifact: str | None = Field(default=None, description="The version's place in the artifact store.")
    epochs: int
    steps: int
    resumed_from_step: int | None = None
    train_examples: int
    val_examples: int
    base_model: str = Field(default=minilm.MODEL_NAME, description='"all-MiniLM-L6-v2" or "name:version".')
    parent: dict[str, Any] | None = Field(
        default=None, description='The registered encoder it started from, {"name", "version"}.'
    )
    lineage: dict[str, Any] | None = None


@dataclass
class Progress:
    """Where training stands; all of it goes into a checkpoint."""

    train_idx: list[int]
    val_idx: list[int]
    epochs_done: int = 0
    global_step: int = 0
    order: list[int] | None = None  # the current epoch's order, drawn at its start
    batches_done: int = 0  # in the current epoch
    loss_sum: float = 0.0  # over the current epoch's batches
    last_epoch: dict[str, float | None] = field(default_factory=dict)  # train_loss, val_accuracy, val_f1


def load_rows(params: TrainParams, ctx: JobContext) -> list[LabelledText]:
    if params.data is not None:
        return params.data
    assert params.dataset_id is not None
    raw = ctx.load_dataset(params.dataset_id)
    rows: list[LabelledText] = []
    for i, item in enumerate(raw):
        try:
            rows.append(DatasetRow.model_validate(item))
        except ValidationError as exc:
            raise JobError("InvalidDataset", f"row {i} is not a {{text, label}} row: {exc}") from None
    return rows


def fingerprint(params: TrainParams, rows: list[LabelledText], base_identity: str | None = None) -> str:
    """What a checkpoint must match to be resumed: the data, the base encoder and every setting
    that shapes training."""
    h = hashlib.sha256()
    settings = params.model_dump(
        include={"epochs", "learning_rate", "batch_size", "max_seq_length", "validation_split", "seed"}
    )
    if base_identity is not None:  # absent for the shipped model, so older checkpoints still match
        settings["base"] = base_identity
    h.update(json.dumps(settings, sort_keys=True).encode())
    for row in rows:
        h.update(json.dumps([row.text, row.label]).encode() + b"\n")
    return h.hexdigest()


def split(
    targets: list[int], n_labels: int, fraction: float, gen: torch.Generator
) -> tuple[list[int], list[int]]:
    """Stratified: each label gives `fraction` of its rows to validation, but keeps one to train on."""
    import torch

    train: list[int] = []
    val: list[int] = []
    for label in range(n_labels):
        idx = [i for i, t in enumerate(targets) if t == label]
        perm = torch.randperm(len(idx), generator=gen).tolist()
        k = min(int(len(idx) * fraction + 0.5), len(idx) - 1)
        val += [idx[p] for p in perm[:k]]
        train += [idx[p] for p in perm[k:]]
    return sorted(train), sorted(val)


def macro_f1(truth: list[int], pred: list[int]) -> float:
    """Mean F1 over the labels that occur in either list (as scikit-learn's f1_score(average="macro"))."""
    scores = []
    for label in sorted(set(truth) | set(pred)):
        tp = sum(1 for t, p in zip(truth, pred, strict=True) if t == p == label)
        fp = sum(1 for t, p in zip(truth, pred, strict=True) if p == label != t)
        fn = sum(1 for t, p in zip(truth, pred, strict=True) if t == label != p)
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(scores) / len(scores) if scores else 0.0


def evaluate(
    model: clf.TextClassifier, texts: list[str], targets: list[int], ctx: JobContext
) -> tuple[float | None, float | None]:
    import torch

    if not texts:
        return None, None
    model.train(False)
    pred: list[int] = []
    with torch.inference_mode():
        for start in range(0, len(texts), EVAL_BATCH):
            ctx.check_cancelled()
            pred += model.logits(texts[start : start + EVAL_BATCH]).argmax(dim=-1).tolist()
    accuracy = sum(1 for t, p in zip(targets, pred, strict=True) if t == p) / len(targets)
    return accuracy, macro_f1(targets, pred)


def linear_schedule(total_steps: int) -> Any:
    warmup = int(total_steps * WARMUP_FRACTION)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return factor


def checkpoint_path(work_dir: Path) -> Path:
    return work_dir / "checkpoint" / "state.pt"


def save_checkpoint(path: Path, state: dict[str, Any], files: Files = PLAIN) -> None:
    """Serialised in memory, then written (sealed, in a worker) atomically."""
    import torch

    buffer = io.BytesIO()
    torch.save(state, buffer)
    files.write(path, buffer.getvalue())


def load_checkpoint(path: Path, expected_fingerprint: str, files: Files = PLAIN) -> dict[str, Any] | None:
    """The checkpoint at `path` if it is one of this very training run, else None (start over).
    A sealed one that does not open raises DataIntegrityError: tampering is not started over."""
    import torch

    if not files.exists(path):
        return None
    data = files.read(path)
    try:
        # weights_only: plain tensors and containers, never arbitrary pickled objects.
        state: dict[str, Any] = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception:  # unreadable: the atomic rename makes this unlikely, and starting over is safe
        return None
    if state.get("format") != CHECKPOINT_FORMAT or state.get("fingerprint") != expected_fingerprint:
        return None
    return state


@dataclass(frozen=True)
class BaseEncoder:
    """A registered encoder to start from."""

    name: str  # "name:version"
    parent: tuple[str, int]
    path: Path

    @property
    def identity(self) -> str:
        return f"{self.name}@{self.path}"


def resolve_base(params: TrainParams, ctx: JobContext) -> BaseEncoder | None:
    if params.base_model is None or params.base_model == minilm.MODEL_NAME:
        return None
    resolved = ctx.resolve_model(params.base_model)
    name = f"{resolved.name}:{resolved.version}"
    if not mlm_lib.is_masked_lm_dir(resolved.path, ctx.files):
        raise JobError(
            "IncompatibleModel", f"{name} is a {resolved.task} model, not an encoder to fine-tune from"
        )
    return BaseEncoder(name, (resolved.name, resolved.version), resolved.path)


def run(params: TrainParams, ctx: JobContext) -> TrainResult:
    rows = load_rows(params, ctx)
    labels = sorted({row.label for row in rows})
    if len(labels) < 2:
        raise JobError("InvalidDataset", f"need at least 2 distinct labels, got {labels}")
    if len(labels) > clf.MAX_LABELS:
        raise JobError("InvalidDataset", f"at most {clf.MAX_LABELS} labels, got {len(labels)}")

    import torch

    # Seeding must not reset the random stream of whatever else runs in this process.
    device = torch.device(ctx.device)
    base = resolve_base(params, ctx)
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        return Trainer(params, ctx, rows, labels, base).run()


class Trainer:
    """One training run: the model, its optimizer and schedule, and how far it has got."""

    def __init__(
        self,
        params: TrainParams,
        ctx: JobContext,
        rows: list[LabelledText],
        labels: list[str],
        base: BaseEncoder | None = None,
    ) -> None:
        import torch

        self.params, self.ctx, self.labels = params, ctx, labels
        self.texts = [row.text for row in rows]
        label_id = {label: i for i, label in enumerate(labels)}
        self.targets = [label_id[row.label] for row in rows]
        self.base = base
        self.fingerprint = fingerprint(params, rows, None if base is None else base.identity)
        self.checkpoint_file = checkpoint_path(ctx.work_dir) if ctx.work_dir is not None else None

        torch.manual_seed(params.seed)
        self.data_gen = torch.Generator().manual_seed(params.seed)
        if base is None:
            self.model = clf.build_classifier(labels, params.max_seq_length, ctx.device)
        else:
            try:
                self.model = mlm_lib.build_classifier_from_dir(
                    base.path, labels, params.max_seq_length, base.name, ctx.device, ctx.files
                )
            except mlm_lib.MaskedLMFormatError as exc:
                raise JobError("IncompatibleModel", f"{base.name}: {exc}") from None
        self.trainable = [p for _, p in self.model.named_parameters()]
        self.optimizer = torch.optim.AdamW(
            [
                {"params": [p for p in self.trainable if p.ndim >= 2], "weight_decay": WEIGHT_DECAY},
                {"params": [p for p in self.trainable if p.ndim < 2], "weight_decay": 0.0},  # biases, norms
            ],
            lr=params.learning_rate,
        )
        self.progress = Progress(*split(self.targets, len(labels), params.validation_split, self.data_gen))
        self.steps_per_epoch = math.ceil(len(self.progress.train_idx) / params.batch_size)
        self.total_steps = self.steps_per_epoch * params.epochs
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, linear_schedule(self.total_steps))
        self.resumed_from_step: int | None = None
        self.last_save = time.monotonic()

    def resume(self) -> None:
        """Pick up the checkpoint in work_dir, if there is one of this very run."""
        if self.checkpoint_file is None:
            return
        state = load_checkpoint(self.checkpoint_file, self.fingerprint, self.ctx.files)
        if state is None:
            return
        self.progress = Progress(**state["progress"])
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.data_gen.set_state(state["data_rng"])
        _set_rng_state(self.ctx.device, state["rng"])
        self.resumed_from_step = self.progress.global_step

    def checkpoint(self) -> None:
        self.last_save = time.monotonic()
        if self.checkpoint_file is None:
            return
        state = {
            "format": CHECKPOINT_FORMAT,
            "fingerprint": self.fingerprint,
            "labels": self.labels,
            "progress": asdict(self.progress),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "data_rng": self.data_gen.get_state(),
            "rng": _rng_state(self.ctx.device),
        }
        save_checkpoint(self.checkpoint_file, state, self.ctx.files)
        self.last_save = time.monotonic()

    def report(self, epoch: int, **extra: Any) -> None:
        last_val = {k: v for k, v in self.progress.last_epoch.items() if k != "train_loss"}
        self.ctx.report(
            {
                "epoch": epoch,
                "epochs": self.params.epochs,
                "step": self.progress.global_step,
                "total_steps": self.total_steps,
                "resumed_from_step": self.resumed_from_step,
                **last_val,
                **extra,
            }
        )

    def step(self, batch: list[int]) -> float:
        import torch
        import torch.nn.functional as F

        logits = self.model.logits([self.texts[i] for i in batch])
        target = torch.tensor([self.targets[i] for i in batch], device=logits.device)
        loss = F.cross_entropy(logits, target)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.trainable, MAX_GRAD_NORM)
        self.optimizer.step()
        self.scheduler.step()
        return float(loss.item())

    def train_epoch(self, epoch: int) -> None:
        import torch

        p, size = self.progress, self.params.batch_size
        if p.order is None:
            p.order = torch.randperm(len(p.train_idx), generator=self.data_gen).tolist()
            p.batches_done, p.loss_sum = 0, 0.0
        self.model.train(True)
        for b in range(p.batches_done, self.steps_per_epoch):
            self.ctx.check_cancelled()
            loss = self.step([p.train_idx[i] for i in p.order[b * size : (b + 1) * size]])
            p.global_step, p.batches_done, p.loss_sum = p.global_step + 1, b + 1, p.loss_sum + loss
            if b + 1 < self.steps_per_epoch and time.monotonic() - self.last_save >= CHECKPOINT_EVERY_S:
                self.checkpoint()
            lr = self.scheduler.get_last_lr()[0]
            self.report(epoch + 1, loss=p.loss_sum / p.batches_done, learning_rate=lr)

        val = self.progress.val_idx
        accuracy, f1 = evaluate(
            self.model, [self.texts[i] for i in val], [self.targets[i] for i in val], self.ctx
        )
        p.last_epoch = {
            "train_loss": p.loss_sum / self.steps_per_epoch,
            "val_accuracy": accuracy,
            "val_f1": f1,
        }
        p.epochs_done, p.order = epoch + 1, None
        # Saved before it is reported, so whatever a reader has seen survives a crash.
        self.checkpoint()
        self.report(epoch + 1, loss=p.last_epoch["train_loss"])

    def run(self) -> TrainResult:
        self.resume()
        self.report(min(self.progress.epochs_done + 1, self.params.epochs), loss=None)
        for epoch in range(self.progress.epochs_done, self.params.epochs):
            self.train_epoch(epoch)
        self.ctx.check_cancelled()

        self.model.train(False)
        work_dir = self.ctx.work_dir
        if work_dir is None:
            out = Path(tempfile.mkdtemp(prefix="tensorq-model-"))
        else:
            # Per attempt: a stale attempt saving late must not replace a registered version's files.
            out = work_dir / ("model" if self.ctx.attempt is None else f"model-{self.ctx.attempt}")
        extra: dict[str, bytes] = {}
        if self.params.dataset_id is not None:
            # What evaluate and optimize need to find this training's validation rows again.
            from tasks.evaluation import TRAINING_FILE, TrainingRecord, rows_sha256, training_file_text

            rows = [
                {"text": t, "label": self.labels[y]} for t, y in zip(self.texts, self.targets, strict=True)
            ]
            record = TrainingRecord(
                dataset_id=self.params.dataset_id,
                seed=self.params.seed,
                validation_split=self.params.validation_split,
                rows_sha256=rows_sha256(rows),
            )
            extra[TRAINING_FILE] = training_file_text([record]).encode()
        artifact_dir = clf.save_classifier(self.model, out, self.ctx.files, extra)
        last = self.progress.last_epoch
        return TrainResult(
            model=self.params.model_name,
            artifact_dir=str(artifact_dir),
            labels=self.labels,
            metrics=ModelMetrics(
                val_accuracy=last["val_accuracy"],
                val_f1=last["val_f1"],
                train_loss=float(last["train_loss"] or 0.0),
            ),
            epochs=self.params.epochs,
            steps=self.progress.global_step,
            resumed_from_step=self.resumed_from_step,
            train_examples=len(self.progress.train_idx),
            val_examples=len(self.progress.val_idx),
            **self.origin(),
        )

    def origin(self) -> dict[str, Any]:
        """`base_model`, and for a registered base its `parent` and `lineage`."""
        if self.base is None:
            return {}
        return {
            "base_model": self.base.name,
            "parent": {"name": self.base.parent[0], "version": self.base.parent[1]},
            "lineage": {"method": "fine-tune", "base_model": self.base.name},
        }


def _rng_state(device: str) -> dict[str, Any]:
    import torch

    state = {"torch": torch.get_rng_state()}
    if torch.device(device).type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(device: str, state: dict[str, Any]) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


KIND = JobKind(
    name="train-text-classifier",
    params=TrainParams,
    result=TrainResult,
    run=run,
    category="training",
    registers_model=True,
    soft_time_limit=24 * 3600,
    time_limit=24 * 3600 + 600,
    description="Fine-tune all-MiniLM-L6-v2 (or a registered encoder, base_model) with a linear head on "
    "{text, label} rows; checkpoints and resumes.",
    model_of=lambda params: params.model_name,
    model_tasks=(("base_model", (mlm_lib.TASK, "embedder")),),
    needs_labels=True,
)
