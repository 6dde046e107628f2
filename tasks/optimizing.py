"""Making models smaller and faster: int8/fp16/bf16, distillation to fewer layers, FFN pruning.

Models are either classifiers (`tasks.classifier.TextClassifier`) or embedders (`tasks.minilm.Encoder`,
the shipped all-MiniLM-L6-v2 or a tenant's derivative). Loaded through `load_model`, they come back
as `OptimizedClassifier` / `OptimizedEncoder`: subclasses usable everywhere the plain ones are
(`classifier.predict`, `minilm.embed_texts`), whose `nbytes()` counts packed int8 weights and which
carry their recipe.

int8 and which Linear layers stay fp32 (`choose_fp32_modules`): per-channel dynamic int8 of every
encoder Linear is measured on calibration texts (the optimize dataset's training rows) against
the fp32 model. If it falls short of the target (embedders: mean cosine of the pooled embeddings
>= options.min_cosine, default 0.983; classifiers: argmax agreement with the fp32 model >=
options.min_agreement, default 0.995), every Linear is ranked by the mean cosine reached when it
alone stays fp32, and the best are kept fp32 one at a time until the target is met or
options.max_fp32_layers (default 4) are kept. On MiniLM with the shipped 240 reviews: all int8
0.971 (min 0.943); layer 0's FFN output in fp32 0.977; + layer 1's 0.980; + layer 4's FFN input
0.983; four layers 0.986 (measured 2026-12, see docs/optimize.md). The FFN output projections
(GELU outputs feed them, with the widest activation range) dominate; fbgemm's 7-bit activations
(reduce_range) are the cause: the qnnpack engine reaches 0.992 all-int8 but runs 6x slower here.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict

from tasks import classifier as clf
from tasks import minilm
from tasks.context import JobContext, JobError
from tasks.evaluation import embeddings, predict_ids
from tasks.recipes import (
    RECIPE_FILE,
    Recipe,
    UnsupportedRecipe,
    apply_recipe,
    model_nbytes,
    quantize_int8_module,
    read_recipe,
    recipe_bytes,
    serving_device,
)
from tensorq.core.sealed_files import PLAIN, Files

if TYPE_CHECKING:
    import torch

EMBEDDER_FILE = "embedder.json"
EMBEDDER_FORMAT = "tensorq-text-embedder"
WEIGHTS_FILE = "model.safetensors"
CHECKPOINT_EVERY_S = 300.0  # mid-epoch, as train-text-classifier; epochs always end with one
CHECKPOINT_FORMAT = 1
WEIGHT_DECAY = 0.01
MAX_GRAD_NORM = 1.0

ModelKind = Literal["classifier", "embedder"]


class ModelFormatError(ValueError):
    """A directory holding neither a classifier nor an embedder this code can load."""


# --- loaded models --------------------------------------------------------------------------------


@dataclass
class OptimizedClassifier(clf.TextClassifier):
    recipe: Recipe | None = None

    def nbytes(self) -> int:
        return model_nbytes(self)


@dataclass
class OptimizedEncoder(minilm.Encoder):
    max_seq_length: int = minilm.MAX_TOKENS
    base_model: str = minilm.MODEL_NAME
    recipe: Recipe | None = None

    def nbytes(self) -> int:
        return model_nbytes(self)


AnyModel = OptimizedClassifier | OptimizedEncoder


class EmbedderConfig(BaseModel):
    model_config = ConfigDict(extra="ignore")

    format: Literal["tensorq-text-embedder"] = "tensorq-text-embedder"
    format_version: int = 1
    base_model: str = minilm.MODEL_NAME
    max_seq_length: int = minilm.MAX_TOKENS
    pooling: Literal["mean"] = "mean"
    normalize: bool = True


def model_kind(path: Path | str, files: Files = PLAIN) -> ModelKind:
    path = Path(path)
    if files.exists(path / clf.CONFIG_FILE):
        return "classifier"
    if files.exists(path / EMBEDDER_FILE) or files.exists(path / "config.json"):
        return "embedder"
    raise ModelFormatError(f"{path} holds neither {clf.CONFIG_FILE} nor a BERT config.json")


def load_model(
    path: Path | str, device: str = "cpu", *, fp32: bool = False, files: Files = PLAIN
) -> AnyModel:
    """Load a classifier or embedder directory and apply its recipe (unless `fp32`: the stored
    weights as they are, which is what further optimisation starts from). `files`: the tenant's
    (sealed) files; PLAIN for the shipped MiniLM's own directory.

    Fallbacks (see tasks.recipes): an int8 recipe loads on "cpu" whatever `device` says (the
    returned model's `.device` tells); fp16/bf16 on a CPU runs the half-precision weights in fp32."""
    path = Path(path)
    try:
        recipe = read_recipe(path, files)
    except ValueError as exc:
        raise ModelFormatError(str(exc)) from exc
    target, skip_half = (device, False) if fp32 else serving_device(recipe, device)
    kind = model_kind(path, files)
    model: AnyModel
    if kind == "classifier":
        try:
            base = clf.load_classifier(path, target, files)
        except clf.ClassifierFormatError as exc:
            raise ModelFormatError(str(exc)) from exc
        model = OptimizedClassifier(**{f: getattr(base, f) for f in base.__dataclass_fields__}, recipe=recipe)
    else:
        model = _load_embedder(path, target, recipe, files)
    if not fp32:
        apply_recipe(model, recipe, target, skip_half=skip_half)
    return model


def _load_embedder(path: Path, device: str, recipe: Recipe | None, files: Files) -> OptimizedEncoder:
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load
    from transformers import AutoModel

    clf._quiet_transformers()
    config_file = path / EMBEDDER_FILE
    config = (
        EmbedderConfig.model_validate(json.loads(files.read(config_file)))
        if files.exists(config_file)
        else EmbedderConfig()  # the shipped MiniLM's own directory
    )
    try:
        bert_config = minilm.hf_config(files.read(path / "config.json"))
    except (OSError, ValueError) as exc:
        raise ModelFormatError(f"no readable config.json in {path}") from exc
    if bert_config.model_type != "bert":
        raise ModelFormatError(f"{path} has a {bert_config.model_type!r} encoder, not bert")
    try:
        weights = load(files.read(path / WEIGHTS_FILE))
    except SafetensorError as exc:
        raise ModelFormatError(f"unreadable {WEIGHTS_FILE} in {path}: {exc}") from exc
    pooler = any(k.startswith("pooler.") for k in weights)
    encoder = minilm.uninitialised(lambda: AutoModel.from_config(bert_config, add_pooling_layer=pooler))
    try:
        encoder.load_state_dict({k: v.to(torch.float32) for k, v in weights.items()}, strict=False)
    except RuntimeError as exc:
        raise ModelFormatError(f"weights in {path} do not fit its config: {exc}") from exc
    missing = set(encoder.state_dict()) - set(weights) - {"embeddings.position_ids"}
    if missing:
        raise ModelFormatError(f"weights in {path} lack {sorted(missing)[:3]}")
    return OptimizedEncoder(
        tokenizer=minilm.base_tokenizer(),
        model=encoder.to(device).eval(),
        device=device,
        max_seq_length=config.max_seq_length,
        base_model=config.base_model,
        recipe=recipe,
    )


def embedder_files(model: OptimizedEncoder | minilm.Encoder) -> dict[str, bytes]:
    """The files of a saved embedder (weights as they are, configs), name -> bytes, in memory."""
    from safetensors.torch import save

    weights = {k: v.detach().to("cpu").contiguous() for k, v in model.model.state_dict().items()}
    weights.pop("embeddings.position_ids", None)
    config = EmbedderConfig(
        base_model=getattr(model, "base_model", minilm.MODEL_NAME),
        max_seq_length=getattr(model, "max_seq_length", minilm.MAX_TOKENS),
    )
    return {
        WEIGHTS_FILE: save(weights, metadata={"format": EMBEDDER_FORMAT}),
        EMBEDDER_FILE: (config.model_dump_json(indent=2) + "\n").encode(),
        "config.json": model.model.config.to_json_string().encode(),  # what to_json_file writes
    }


def save_model(
    model: AnyModel, path: Path | str, recipe: Recipe, extra_files: dict[str, str], files: Files = PLAIN
) -> Path:
    """Write fp32 (or, for fp16/bf16 recipes, half-precision) weights, configs, recipe and
    `extra_files` (name -> text) to directory `path`, replacing whatever was there as one rename."""
    out = clf.classifier_files(model) if isinstance(model, clf.TextClassifier) else embedder_files(model)
    out[RECIPE_FILE] = recipe_bytes(recipe)
    out.update({name: text.encode() for name, text in extra_files.items()})
    return files.write_dir(Path(path).absolute(), out)


def bert(model: AnyModel) -> Any:
    return model.encoder if isinstance(model, clf.TextClassifier) else model.model


def max_len(model: AnyModel) -> int:
    return model.max_seq_length


# --- int8 ------------------------------------------------------------------------------------------


@dataclass
class Int8Choice:
    fp32_modules: list[str]
    per_channel: bool
    engine: str
    all_int8_quality: float
    quality: float
    measure: str  # "mean_cosine" or "agreement"
    trail: list[dict[str, Any]] = field(default_factory=list)  # quality after each layer kept fp32


def _with_bert(model: AnyModel, module: Any) -> AnyModel:
    twin = copy.copy(model)
    if isinstance(twin, clf.TextClassifier):
        twin.encoder = module
    else:
        twin.model = module
    return twin


def choose_fp32_modules(
    model: AnyModel,
    texts: Sequence[str],
    *,
    per_channel: bool = True,
    min_cosine: float = 0.983,
    min_agreement: float = 0.995,
    max_fp32_layers: int = 4,
    check: Callable[[], None] = lambda: None,
) -> Int8Choice:
    """Which encoder Linear layers stay fp32 for `model` (fp32, on CPU) to keep its quality."""
    import torch

    encoder = bert(model)
    ref = embeddings(model, texts)
    is_clf = isinstance(model, clf.TextClassifier)
    ref_pred = predict_ids(model, texts) if isinstance(model, clf.TextClassifier) else []

    def measure(keep: set[str]) -> tuple[float, float]:
        check()
        twin = _with_bert(model, quantize_int8_module(encoder, keep, per_channel))
        cos = float((embeddings(twin, texts) * ref).sum(dim=1).mean())
        if isinstance(twin, clf.TextClassifier):
            pred = predict_ids(twin, texts)
            agree = sum(a == b for a, b in zip(pred, ref_pred, strict=True)) / len(texts)
            return cos, agree
        return cos, cos

    def good(cos: float, agree: float) -> bool:
        return agree >= min_agreement if is_clf else cos >= min_cosine

    cos, agree = measure(set())
    choice = Int8Choice(
        fp32_modules=[],
        per_channel=per_channel,
        engine=torch.backends.quantized.engine,
        all_int8_quality=agree if is_clf else cos,
        quality=agree if is_clf else cos,
        measure="agreement" if is_clf else "mean_cosine",
        trail=[{"fp32_modules": 0, "mean_cosine": cos, "agreement": agree if is_clf else None}],
    )
    if good(cos, agree) or max_fp32_layers == 0:
        return choice
    names = [n for n, m in encoder.named_modules() if isinstance(m, torch.nn.Linear)]
    ranked = sorted(names, key=lambda n: measure({n})[0], reverse=True)
    keep: list[str] = []
    for name in ranked[:max_fp32_layers]:
        keep.append(name)
        cos, agree = measure(set(keep))
        choice.trail.append(
            {
                "fp32_modules": len(keep),
                "added": name,
                "mean_cosine": cos,
                "agreement": agree if is_clf else None,
            }
        )
        if good(cos, agree):
            break
    choice.fp32_modules = keep
    choice.quality = agree if is_clf else cos
    return choice


# --- students and pruning -------------------------------------------------------------------------


def student_layer_indices(n_teacher: int, n_student: int) -> list[int]:
    """Evenly spaced teacher layers, first one included: 3 of 6 -> [0, 2, 4]; 2 of 6 -> [0, 3]."""
    if not 1 <= n_student <= n_teacher:
        raise ValueError(f"a student of {n_student} layers from a teacher of {n_teacher}")
    return [i * n_teacher // n_student for i in range(n_student)]


def build_student_encoder(teacher: Any, n_layers: int) -> Any:
    """A BertModel of `n_layers` layers initialised from the teacher's (embeddings + chosen layers)."""
    import torch

    student = copy.deepcopy(teacher)
    keep = student_layer_indices(len(student.encoder.layer), n_layers)
    student.encoder.layer = torch.nn.ModuleList([student.encoder.layer[i] for i in keep])
    student.config.num_hidden_layers = n_layers
    for i, layer in enumerate(student.encoder.layer):  # attention layer_idx, where transformers keeps one
        attn = getattr(layer.attention, "self", None)
        if attn is not None and hasattr(attn, "layer_idx"):
            attn.layer_idx = i
    return student


def build_student(teacher: AnyModel, n_layers: int) -> AnyModel:
    """The teacher's twin with `n_layers` encoder layers (every other one for 3 of 6); head copied."""
    student = copy.copy(teacher)
    if isinstance(student, clf.TextClassifier):
        student.encoder = build_student_encoder(teacher.encoder, n_layers)  # type: ignore[union-attr]
        student.head = copy.deepcopy(teacher.head)  # type: ignore[union-attr]
    else:
        student.model = build_student_encoder(teacher.model, n_layers)  # type: ignore[union-attr]
    student.recipe = None
    return student


def ffn_importance(
    model: AnyModel,
    texts: Sequence[str],
    targets: Sequence[int] | None,
    batch: int = 32,
    check: Callable[[], None] = lambda: None,
) -> list[torch.Tensor]:
    """One score per FFN neuron per layer, measured on `texts`.

    With `targets` (a classifier with labels): first-order Taylor |activation x gradient| of the
    cross-entropy, summed over real tokens. Without: mean |activation| over real tokens times the
    L2 norm of the neuron's column in output.dense (how much it can move the layer's output)."""
    import torch
    import torch.nn.functional as F

    encoder = bert(model)
    layers = list(encoder.encoder.layer)
    scores = [torch.zeros(layer.intermediate.dense.out_features) for layer in layers]
    acts: list[torch.Tensor] = []
    hooks = [
        layer.intermediate.register_forward_hook(lambda _m, _i, out: acts.append(out)) for layer in layers
    ]
    taylor = targets is not None and isinstance(model, clf.TextClassifier)
    was_training = encoder.training
    encoder.train(False)
    try:
        for start in range(0, len(texts), batch):
            check()
            acts.clear()
            chunk = list(texts[start : start + batch])
            enc = model.tokenizer(
                chunk, padding=True, truncation=True, max_length=max_len(model), return_tensors="pt"
            ).to(model.device)
            mask = enc["attention_mask"].unsqueeze(-1).float()
            with torch.set_grad_enabled(taylor):
                out = encoder(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
                if taylor:
                    assert targets is not None and isinstance(model, clf.TextClassifier)
                    for a in acts:
                        a.retain_grad()
                    pooled = minilm.mean_pool(out.last_hidden_state, enc["attention_mask"])
                    target = torch.tensor(list(targets[start : start + batch]), device=pooled.device)
                    F.cross_entropy(model.head(pooled), target, reduction="sum").backward()
                    for s, a in zip(scores, acts, strict=True):
                        assert a.grad is not None
                        s += ((a * a.grad).abs() * mask).sum(dim=(0, 1)).detach().cpu()
                else:
                    for s, a in zip(scores, acts, strict=True):
                        s += (a.abs() * mask).sum(dim=(0, 1)).detach().cpu()
        encoder.zero_grad(set_to_none=True)
        if isinstance(model, clf.TextClassifier):
            model.head.zero_grad(set_to_none=True)
    finally:
        for h in hooks:
            h.remove()
        encoder.train(was_training)
    if not taylor:
        scores = [
            s * layer.output.dense.weight.detach().cpu().norm(dim=0)
            for s, layer in zip(scores, layers, strict=True)
        ]
    return scores


def prune_ffn(model: AnyModel, scores: Sequence[torch.Tensor], keep_fraction: float) -> tuple[AnyModel, int]:
    """A copy keeping the top `keep_fraction` FFN neurons of every layer (the same count in each):
    intermediate.dense rows and output.dense columns sliced, config.intermediate_size set."""
    import torch

    pruned = copy.copy(model)
    encoder = copy.deepcopy(bert(model))
    size = encoder.config.intermediate_size
    keep = max(1, min(size, round(size * keep_fraction)))
    for layer, score in zip(encoder.encoder.layer, scores, strict=True):
        idx = torch.topk(score, keep).indices.sort().values.to(layer.intermediate.dense.weight.device)
        inner, outer = layer.intermediate.dense, layer.output.dense
        new_in = torch.nn.Linear(inner.in_features, keep).to(inner.weight.device)
        new_out = torch.nn.Linear(keep, outer.out_features).to(outer.weight.device)
        with torch.no_grad():
            new_in.weight.copy_(inner.weight[idx])
            new_in.bias.copy_(inner.bias[idx])
            new_out.weight.copy_(outer.weight[:, idx])
            new_out.bias.copy_(outer.bias)
        layer.intermediate.dense, layer.output.dense = new_in, new_out
    encoder.config.intermediate_size = keep
    if isinstance(pruned, clf.TextClassifier):
        pruned.encoder = encoder
        pruned.head = copy.deepcopy(model.head)  # type: ignore[union-attr]
    else:
        pruned.model = encoder
    pruned.recipe = None
    return pruned, keep


# --- distillation (and recovery fine-tuning) --------------------------------------------------------


class DistillSettings(BaseModel):
    """What shapes a distillation run (also a pruned model's recovery fine-tune)."""

    epochs: int
    learning_rate: float
    batch_size: int
    temperature: float = 2.0
    alpha: float = 0.5  # weight of the soft-target loss; 1 - alpha on the hard labels
    loss: Literal["mse", "cosine"] = "mse"  # embedders
    seed: int = 0


@dataclass
class DistillProgress:
    epochs_done: int = 0
    global_step: int = 0
    order: list[int] | None = None
    batches_done: int = 0
    loss_sum: float = 0.0
    last_loss: float | None = None


@dataclass
class DistillOutcome:
    steps: int
    resumed_from_step: int | None
    train_loss: float | None
    examples: int


def weights_digest(path: Path | str, files: Files = PLAIN) -> str:
    """sha256 of a version's weights (opened: resealing them, with a new data key, changes
    nothing): a checkpoint is resumed only for the very same teacher."""
    return hashlib.sha256(files.read(Path(path) / WEIGHTS_FILE)).hexdigest()


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


class Distiller:
    """Trains `student` on `teacher`'s outputs for `texts` (classifiers: T^2 KL at temperature T plus
    cross-entropy on the hard labels; embedders: MSE or 1 - cosine to the teacher's embeddings).

    Deterministic for a seed, and resumable: checkpoints in `work_dir/checkpoint/optimize.pt` at every
    epoch end and every CHECKPOINT_EVERY_S seconds mid-epoch (weights, optimizer, scheduler, both RNG
    states, progress); a rerun with the same inputs continues and ends as an uninterrupted run."""

    def __init__(
        self,
        teacher: AnyModel,
        student: AnyModel,
        texts: Sequence[str],
        targets: Sequence[int] | None,
        settings: DistillSettings,
        ctx: JobContext,
        identity: str,
        phase: str = "distill",
    ) -> None:
        import torch

        from tasks.train_text_classifier import checkpoint_path, linear_schedule

        self.teacher, self.student, self.settings, self.ctx, self.phase = (
            teacher,
            student,
            settings,
            ctx,
            phase,
        )
        self.texts, self.targets = list(texts), list(targets) if targets is not None else None
        self.is_clf = isinstance(student, clf.TextClassifier)
        if self.is_clf and self.targets is None:
            raise JobError("InvalidDataset", "dataset_id: distilling a classifier needs labelled rows")
        h = hashlib.sha256(identity.encode())
        h.update(settings.model_dump_json().encode())
        for i, text in enumerate(self.texts):
            h.update(json.dumps([text, self.targets[i] if self.targets else None]).encode())
        self.fingerprint = h.hexdigest()
        self.checkpoint_file = (
            checkpoint_path(ctx.work_dir).with_name("optimize.pt") if ctx.work_dir is not None else None
        )
        self.data_gen = torch.Generator().manual_seed(settings.seed)
        self.params = [p for _, p in self._named_parameters()]
        self.optimizer = torch.optim.AdamW(
            [
                {"params": [p for p in self.params if p.ndim >= 2], "weight_decay": WEIGHT_DECAY},
                {"params": [p for p in self.params if p.ndim < 2], "weight_decay": 0.0},
            ],
            lr=settings.learning_rate,
        )
        self.steps_per_epoch = math.ceil(len(self.texts) / settings.batch_size)
        self.total_steps = self.steps_per_epoch * settings.epochs
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, linear_schedule(self.total_steps))
        self.progress = DistillProgress()
        self.resumed_from_step: int | None = None
        self.last_save = time.monotonic()
        self.soft: torch.Tensor | None = None

    def _named_parameters(self) -> Any:
        if isinstance(self.student, clf.TextClassifier):
            return self.student.named_parameters()
        return self.student.model.named_parameters()

    def _state(self) -> dict[str, Any]:
        if isinstance(self.student, clf.TextClassifier):
            return self.student.state_dict()
        return dict(self.student.model.state_dict())

    def _load_state(self, state: dict[str, Any]) -> None:
        if isinstance(self.student, clf.TextClassifier):
            self.student.load_state_dict(state)
        else:
            self.student.model.load_state_dict(state)

    def _train_mode(self, mode: bool) -> None:
        if isinstance(self.student, clf.TextClassifier):
            self.student.train(mode)
        else:
            self.student.model.train(mode)

    def _teacher_outputs(self) -> torch.Tensor:
        """Teacher logits (classifier) or embeddings (embedder) for every text, in batches of 64."""
        import torch

        out = []
        with torch.inference_mode():
            for start in range(0, len(self.texts), 64):
                self.ctx.check_cancelled()
                chunk = self.texts[start : start + 64]
                if isinstance(self.teacher, clf.TextClassifier):
                    out.append(self.teacher.logits(chunk).float().cpu())
                else:
                    out.append(self._embed(self.teacher, chunk, grad=False).float().cpu())
        return torch.cat(out)

    @staticmethod
    def _embed(model: OptimizedEncoder, texts: list[str], grad: bool) -> torch.Tensor:
        import torch

        enc = model.tokenizer(
            texts, padding=True, truncation=True, max_length=model.max_seq_length, return_tensors="pt"
        ).to(model.device)
        with torch.set_grad_enabled(grad):
            hidden = model.model(**enc).last_hidden_state
            return minilm.mean_pool(hidden, enc["attention_mask"])

    def _loss(self, batch: list[int]) -> torch.Tensor:
        import torch
        import torch.nn.functional as F

        assert self.soft is not None
        teacher = self.soft[batch].to(self.student.device)
        texts = [self.texts[i] for i in batch]
        if isinstance(self.student, clf.TextClassifier):
            assert self.targets is not None
            logits = self.student.logits(texts)
            t = self.settings.temperature
            soft = F.kl_div(
                F.log_softmax(logits / t, dim=-1),
                F.log_softmax(teacher / t, dim=-1),
                log_target=True,
                reduction="batchmean",
            ) * (t * t)
            hard = F.cross_entropy(
                logits, torch.tensor([self.targets[i] for i in batch], device=logits.device)
            )
            return self.settings.alpha * soft + (1 - self.settings.alpha) * hard
        pooled = self._embed(self.student, texts, grad=True)
        if self.settings.loss == "cosine":
            return (1 - F.cosine_similarity(pooled, teacher, dim=-1)).mean()
        return F.mse_loss(pooled, teacher)

    def resume(self) -> None:
        from tasks.train_text_classifier import load_checkpoint

        if self.checkpoint_file is None:
            return
        state = load_checkpoint(self.checkpoint_file, self.fingerprint, self.ctx.files)
        if state is None or state.get("phase") != self.phase:
            return
        self.progress = DistillProgress(**state["progress"])
        self._load_state(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.data_gen.set_state(state["data_rng"])
        _set_rng_state(self.ctx.device, state["rng"])
        self.resumed_from_step = self.progress.global_step

    def checkpoint(self) -> None:
        from tasks.train_text_classifier import save_checkpoint

        if self.checkpoint_file is not None:
            save_checkpoint(
                self.checkpoint_file,
                {
                    "format": CHECKPOINT_FORMAT,
                    "fingerprint": self.fingerprint,
                    "phase": self.phase,
                    "progress": asdict(self.progress),
                    "model": self._state(),
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                    "data_rng": self.data_gen.get_state(),
                    "rng": _rng_state(self.ctx.device),
                },
                self.ctx.files,
            )
        self.last_save = time.monotonic()

    def report(self, epoch: int, **extra: Any) -> None:
        self.ctx.report(
            {
                "phase": self.phase,
                "epoch": epoch,
                "epochs": self.settings.epochs,
                "step": self.progress.global_step,
                "total_steps": self.total_steps,
                "resumed_from_step": self.resumed_from_step,
                **extra,
            }
        )

    def run(self) -> DistillOutcome:
        import torch

        device = torch.device(self.ctx.device)
        with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
            torch.manual_seed(self.settings.seed)
            self.resume()
            self.soft = self._teacher_outputs()
            self.report(min(self.progress.epochs_done + 1, self.settings.epochs), loss=None)
            for epoch in range(self.progress.epochs_done, self.settings.epochs):
                self._epoch(epoch)
        self._train_mode(False)
        return DistillOutcome(
            steps=self.progress.global_step,
            resumed_from_step=self.resumed_from_step,
            train_loss=self.progress.last_loss,
            examples=len(self.texts),
        )

    def _epoch(self, epoch: int) -> None:
        import torch

        p, size = self.progress, self.settings.batch_size
        if p.order is None:
            p.order = torch.randperm(len(self.texts), generator=self.data_gen).tolist()
            p.batches_done, p.loss_sum = 0, 0.0
        self._train_mode(True)
        for b in range(p.batches_done, self.steps_per_epoch):
            self.ctx.check_cancelled()
            loss = self._loss(p.order[b * size : (b + 1) * size])
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, MAX_GRAD_NORM)
            self.optimizer.step()
            self.scheduler.step()
            p.global_step, p.batches_done, p.loss_sum = (
                p.global_step + 1,
                b + 1,
                p.loss_sum + float(loss.item()),
            )
            if b + 1 < self.steps_per_epoch and time.monotonic() - self.last_save >= CHECKPOINT_EVERY_S:
                self.checkpoint()
            self.report(
                epoch + 1, loss=p.loss_sum / p.batches_done, learning_rate=self.scheduler.get_last_lr()[0]
            )
        p.last_loss = p.loss_sum / max(1, self.steps_per_epoch)
        p.epochs_done, p.order = epoch + 1, None
        self.checkpoint()  # saved before it is reported, as in training
        self.report(epoch + 1, loss=p.last_loss)


def half_precision_weights(model: AnyModel, method: str) -> AnyModel:
    """A copy whose weights are stored in the recipe's half dtype (fp16/bf16): half the disk."""
    import torch

    from tasks.recipes import HALF_DTYPES, cast_half

    twin = copy.copy(model)
    if isinstance(twin, clf.TextClassifier):
        twin.encoder = copy.deepcopy(model.encoder)  # type: ignore[union-attr]
        twin.head = copy.deepcopy(model.head)  # type: ignore[union-attr]
    else:
        twin.model = copy.deepcopy(model.model)  # type: ignore[union-attr]
    cast_half(twin, getattr(torch, HALF_DTYPES[method]))
    return twin


def require_device(method: str, device: str) -> None:
    if method in ("quantize-fp16", "quantize-bf16") and not device.startswith("cuda"):
        raise UnsupportedRecipe(f"{method} runs on a GPU worker; this worker's device is {device!r}")
