"""`pretrain-mlm`: continue masked-language-model pretraining of MiniLM (or a registered encoder)
on a dataset's texts, so it learns a domain's words before a classifier is fine-tuned on it.

The learning rate defaults by what training starts from: 5e-4 from the shipped MiniLM, whose
masked-LM head is fresh (at 5e-5, two epochs leave a new domain word unlearnt: held-out perplexity
50514 -> 284, the word not in the top 5; at 5e-4 -> 10.7, the word top-1), and 5e-5 from a
registered masked-LM encoder, whose head is trained already (a gentle continuation).

Deterministic for a given seed on one device: the 90/10 split and every epoch's order (one seeded
`torch.Generator`), the masks (a second one, inside the collator) and dropout (torch's RNG, forked
so the caller's stream is left alone).

Checkpoints go to `work_dir/checkpoint/state.pt`, written aside and renamed over the old one, at the
end of every epoch and mid-epoch every CHECKPOINT_EVERY_S seconds. A checkpoint holds the weights,
optimizer, scheduler, all three RNG states, the split, the current epoch's order and
perplexity_before, so a redelivered job continues where it left off and ends as an uninterrupted
run would have.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tasks import minilm
from tasks import mlm as mlm_lib
from tasks.classify import ModelRef
from tasks.context import JobContext, JobError, ResolvedModel
from tasks.registry import JobKind
from tasks.texts import Text
from tasks.train_text_classifier import DatasetId, ModelName, linear_schedule, save_checkpoint
from tensorq.core.sealed_files import PLAIN, Files

if TYPE_CHECKING:
    import torch

CHECKPOINT_EVERY_S = 300.0  # mid-epoch; epochs always end with one. Tests patch it.
CHECKPOINT_FORMAT = "tensorq-pretrain-mlm-1"
HELDOUT_FRACTION = 0.1
WEIGHT_DECAY = 0.01
MAX_GRAD_NORM = 1.0
MAX_ROWS = 1_000_000
# Default learning rates: a fresh head (from the shipped MiniLM) needs a larger one than a trained one.
LR_FROM_SHIPPED = 5e-4
LR_FROM_REGISTERED = 5e-5
# The held-out masks come from their own seed, derived from the job's but not its stream, so
# they are the same before and after training and on every attempt.
HELDOUT_MASK_SEED_OFFSET = 7919


class PretrainParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dataset_id: DatasetId = Field(description='A stored dataset of rows with "text" (labels are ignored).')
    model_name: ModelName = Field(description="Name to register the pretrained encoder under.")
    base_model: ModelRef | None = Field(
        default=None,
        description="A registered masked-LM encoder to continue from (with its head); default: the shipped MiniLM.",
    )
    epochs: int = Field(default=3, ge=1, le=50, strict=True)
    batch_size: int = Field(default=16, ge=1, le=256, strict=True)
    learning_rate: float | None = Field(
        default=None,
        ge=1e-6,
        le=1e-2,
        allow_inf_nan=False,
        description=f"Default: {LR_FROM_SHIPPED:g} from the shipped MiniLM (its masked-LM head starts fresh), "
        f"{LR_FROM_REGISTERED:g} from a registered encoder (its head is trained).",
    )
    mask_probability: float = Field(default=mlm_lib.MASK_PROBABILITY, ge=0.01, le=0.5, allow_inf_nan=False)
    whole_word_masking: bool = Field(default=False, strict=True)
    max_length: int = Field(default=128, ge=8, le=minilm.MAX_TOKENS, strict=True)
    seed: int = Field(default=0, ge=0, le=2**32 - 1, strict=True)


class PretrainMetrics(BaseModel):
    perplexity_before: float = Field(description="On the held-out 10%, with the base model, fixed masks.")
    perplexity_after: float = Field(description="The same texts and the same masks, after training.")
    train_loss: float = Field(description="Mean masked-LM loss over the last epoch.")


class PretrainResult(BaseModel):
    """`model`, `task`, `metrics`, `artifact_dir` and `base_model` (the parent) are what the worker
    registers; it then replaces `artifact_dir` with `artifact` (its place in the store) and sets `version`."""

    model: str = Field(description="The registered encoder's name.")
    version: int | None = Field(default=None, description="Set when the worker registers the version.")
    task: Literal["masked-lm"] = mlm_lib.TASK
    base_model: str = Field(description='What training started from: "all-MiniLM-L6-v2" or "name:version".')
    parent: dict[str, Any] | None = Field(
        default=None,
        description='The registered base version, {"name", "version"}; none for the shipped model.',
    )
    lineage: dict[str, Any] = Field(
        default_factory=dict, description="How it was made: method, base, settings."
    )
    metrics: PretrainMetrics
    artifact_dir: str | None = Field(default=None, description="Absolute path of the saved encoder.")
    artifact: str | None = Field(default=None, description="The version's place in the artifact store.")
    epochs: int
    steps: int
    resumed_from_step: int | None = None
    train_texts: int
    heldout_texts: int


@dataclass
class Progress:
    """Where training stands; all of it goes into a checkpoint."""

    train_idx: list[int]
    heldout_idx: list[int]
    perplexity_before: float
    epochs_done: int = 0
    global_step: int = 0
    order: list[int] | None = None  # the current epoch's order, drawn at its start
    batches_done: int = 0  # in the current epoch
    loss_sum: float = 0.0  # over the current epoch's batches
    last_train_loss: float | None = None


def load_texts(params: PretrainParams, ctx: JobContext) -> list[str]:
    raw = ctx.load_dataset(params.dataset_id)
    if len(raw) > MAX_ROWS:
        raise JobError("InvalidDataset", f"at most {MAX_ROWS} rows, got {len(raw)}")
    texts: list[str] = []
    for i, item in enumerate(raw):
        try:
            texts.append(_TextRow.model_validate(item).text)
        except ValidationError as exc:
            raise JobError("InvalidDataset", f'row {i} has no usable "text": {exc}') from None
    if len(texts) < 2:
        raise JobError("InvalidDataset", f"need at least 2 texts (one to hold out), got {len(texts)}")
    return texts


class _TextRow(BaseModel):
    model_config = ConfigDict(extra="ignore")  # labels, ids, notes

    text: Text


@dataclass
class Base:
    """What training starts from, and the name it goes by in the result and the fingerprint."""

    mlm: mlm_lib.MaskedLM
    name: str
    identity: str
    parent: tuple[str, int] | None = None  # the registered version, if it is one


def load_base(params: PretrainParams, ctx: JobContext) -> Base:
    """The shipped MiniLM with a fresh head, or a registered masked-LM encoder, head and all."""
    if params.base_model is None:
        return Base(mlm_lib.build_mlm_from_minilm(ctx.device), minilm.MODEL_NAME, minilm.MODEL_NAME)
    resolved: ResolvedModel = ctx.resolve_model(params.base_model)
    name = f"{resolved.name}:{resolved.version}"
    try:
        base = mlm_lib.load_mlm(resolved.path, ctx.device, ctx.files)
    except mlm_lib.MaskedLMFormatError as exc:
        raise JobError("IncompatibleModel", f"{name} is not a masked-LM encoder: {exc}") from None
    return Base(base, name, f"{name}@{resolved.path}", (resolved.name, resolved.version))


def fingerprint(params: PretrainParams, base_identity: str, texts: list[str]) -> str:
    """What a checkpoint must match to be resumed: the data, the base and every training setting."""
    h = hashlib.sha256()
    settings = params.model_dump(exclude={"dataset_id", "model_name", "base_model"})
    h.update(json.dumps({"settings": settings, "base": base_identity}, sort_keys=True).encode())
    for text in texts:
        h.update(json.dumps(text).encode() + b"\n")
    return h.hexdigest()


def split(n: int, gen: torch.Generator) -> tuple[list[int], list[int]]:
    """A random HELDOUT_FRACTION (at least one text) held out; at least one left to train on."""
    import torch

    perm = torch.randperm(n, generator=gen).tolist()
    k = min(max(1, int(n * HELDOUT_FRACTION + 0.5)), n - 1)
    return sorted(perm[k:]), sorted(perm[:k])


def checkpoint_path(work_dir: Path) -> Path:
    return work_dir / "checkpoint" / "state.pt"


def load_checkpoint(path: Path, expected_fingerprint: str, files: Files = PLAIN) -> dict[str, Any] | None:
    """The checkpoint at `path` if it is one of this very run, else None (start over). A sealed
    one that does not open raises DataIntegrityError: tampering is not started over."""
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


def run_pretrain(params: PretrainParams, ctx: JobContext) -> PretrainResult:
    texts = load_texts(params, ctx)

    import torch

    # Seeding must not reset the random stream of whatever else runs in this process.
    device = torch.device(ctx.device)
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(params.seed)  # before the base is built: the fresh head's init draws from it
        base = load_base(params, ctx)
        if params.learning_rate is None:
            lr = LR_FROM_SHIPPED if base.parent is None else LR_FROM_REGISTERED
            params = params.model_copy(update={"learning_rate": lr})
        return Pretrainer(params, ctx, texts, base).run()


class Pretrainer:
    """One pretraining run: the model, its optimizer and schedule, and how far it has got."""

    def __init__(self, params: PretrainParams, ctx: JobContext, texts: list[str], base: Base) -> None:
        import torch

        self.params, self.ctx, self.texts, self.base = params, ctx, texts, base
        self.mlm = base.mlm
        self.mlm.max_length = params.max_length
        self.model = base.mlm.model
        self.fingerprint = fingerprint(params, base.identity, texts)
        self.checkpoint_file = checkpoint_path(ctx.work_dir) if ctx.work_dir is not None else None

        self.data_gen = torch.Generator().manual_seed(params.seed)
        train_idx, heldout_idx = split(len(texts), self.data_gen)
        tokenizer = self.mlm.tokenizer
        self.items = mlm_lib.tokenize(tokenizer, texts, params.max_length)
        self.mask_gen = torch.Generator().manual_seed(params.seed + 1)
        self.collate = mlm_lib.MaskingCollator(
            tokenizer, self.mask_gen, params.mask_probability, params.whole_word_masking
        )
        self.heldout = mlm_lib.fixed_masks(
            tokenizer,
            [texts[i] for i in heldout_idx],
            params.max_length,
            params.seed + HELDOUT_MASK_SEED_OFFSET,
            params.mask_probability,
            params.whole_word_masking,
        )

        if not any((b.labels != mlm_lib.IGNORE_INDEX).any() for b in self.heldout):
            raise JobError(
                "InvalidDataset", "the held-out texts have no tokens to mask (they tokenize to nothing)"
            )

        # Tied weights appear once in parameters(), so the decoder is not updated twice.
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            [
                {"params": [p for p in self.trainable if p.ndim >= 2], "weight_decay": WEIGHT_DECAY},
                {"params": [p for p in self.trainable if p.ndim < 2], "weight_decay": 0.0},  # biases, norms
            ],
            lr=learning_rate(params),
        )
        self.steps_per_epoch = math.ceil(len(train_idx) / params.batch_size)
        self.total_steps = self.steps_per_epoch * params.epochs
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, linear_schedule(self.total_steps))
        self.progress = Progress(train_idx, heldout_idx, perplexity_before=math.nan)
        self.resumed_from_step: int | None = None
        self.last_save = time.monotonic()

    def resume(self) -> bool:
        """Pick up the checkpoint in work_dir, if there is one of this very run."""
        if self.checkpoint_file is None:
            return False
        state = load_checkpoint(self.checkpoint_file, self.fingerprint, self.ctx.files)
        if state is None:
            return False
        self.progress = Progress(**state["progress"])
        self.model.load_state_dict(state["model"])
        mlm_lib.check_tied(self.model)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.data_gen.set_state(state["data_rng"])
        self.mask_gen.set_state(state["mask_rng"])
        _set_rng_state(self.ctx.device, state["rng"])
        self.resumed_from_step = self.progress.global_step
        return True

    def checkpoint(self) -> None:
        self.last_save = time.monotonic()
        if self.checkpoint_file is None:
            return
        state = {
            "format": CHECKPOINT_FORMAT,
            "fingerprint": self.fingerprint,
            "progress": asdict(self.progress),
            # The decoder's tied weight is the embeddings' tensor: torch.save stores it once.
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "data_rng": self.data_gen.get_state(),
            "mask_rng": self.mask_gen.get_state(),
            "rng": _rng_state(self.ctx.device),
        }
        save_checkpoint(self.checkpoint_file, state, self.ctx.files)
        self.last_save = time.monotonic()

    def report(self, epoch: int, loss: float | None) -> None:
        self.ctx.report(
            {
                "epoch": epoch,
                "epochs": self.params.epochs,
                "step": self.progress.global_step,
                "total_steps": self.total_steps,
                "loss": loss,
                "resumed_from_step": self.resumed_from_step,
                "perplexity_before": self.progress.perplexity_before,
            }
        )

    def step(self, batch: list[int]) -> float:
        import torch

        masked = self.collate([self.items[i] for i in batch])
        if not (masked.labels != mlm_lib.IGNORE_INDEX).any():
            # Only texts the tokenizer made nothing of: nothing to learn, but the schedule moves on.
            self.scheduler.step()
            return 0.0
        loss = mlm_lib.masked_lm_loss(self.model, masked)
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
            self.report(epoch + 1, loss)
        p.last_train_loss = p.loss_sum / self.steps_per_epoch
        p.epochs_done, p.order = epoch + 1, None
        # Saved before it is reported, so whatever a reader has seen survives a crash.
        self.checkpoint()
        self.report(epoch + 1, p.last_train_loss)

    def run(self) -> PretrainResult:
        if not self.resume():
            self.progress.perplexity_before = mlm_lib.perplexity(
                self.model, self.heldout, self.ctx.check_cancelled
            ).value
        self.report(min(self.progress.epochs_done + 1, self.params.epochs), None)
        for epoch in range(self.progress.epochs_done, self.params.epochs):
            self.train_epoch(epoch)
        after = mlm_lib.perplexity(self.model, self.heldout, self.ctx.check_cancelled).value
        self.ctx.check_cancelled()

        self.model.train(False)
        work_dir = self.ctx.work_dir
        if work_dir is None:
            out = Path(tempfile.mkdtemp(prefix="tensorq-mlm-"))
        else:
            # Per attempt: a stale attempt saving late must not replace a registered version's files.
            out = work_dir / ("model" if self.ctx.attempt is None else f"model-{self.ctx.attempt}")
        self.mlm.base_model = self.base.name
        artifact_dir = mlm_lib.save_mlm(self.mlm, out, self.ctx.files)
        parent = self.base.parent
        return PretrainResult(
            model=self.params.model_name,
            base_model=self.base.name,
            parent=None if parent is None else {"name": parent[0], "version": parent[1]},
            lineage={
                "method": "pretrain-mlm",
                "base_model": self.base.name,
                "dataset_id": self.params.dataset_id,
                "options": self.params.model_dump(
                    mode="json", exclude={"dataset_id", "model_name", "base_model"}
                ),
            },
            metrics=PretrainMetrics(
                perplexity_before=self.progress.perplexity_before,
                perplexity_after=after,
                train_loss=float(self.progress.last_train_loss or 0.0),
            ),
            artifact_dir=str(artifact_dir),
            epochs=self.params.epochs,
            steps=self.progress.global_step,
            resumed_from_step=self.resumed_from_step,
            train_texts=len(self.progress.train_idx),
            heldout_texts=len(self.progress.heldout_idx),
        )


def learning_rate(params: PretrainParams) -> float:
    """The rate run_pretrain resolved (a Pretrainer built directly gets the shipped model's default)."""
    return LR_FROM_SHIPPED if params.learning_rate is None else params.learning_rate


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


PRETRAIN_KIND_SPEC: dict[str, Any] = {
    "name": "pretrain-mlm",
    "params": PretrainParams,
    "result": PretrainResult,
    "run": run_pretrain,
    "category": "training",
    "registers_model": True,
    "soft_time_limit": 24 * 3600,
    "time_limit": 24 * 3600 + 600,
    "description": "Continue masked-LM pretraining of MiniLM or a registered encoder on a dataset's texts "
    "(labelled or text-only); registers a masked-lm version.",
    "model_of": lambda params: params.model_name,
    "model_tasks": (("base_model", (mlm_lib.TASK,)),),
}

KIND = JobKind(**PRETRAIN_KIND_SPEC)
