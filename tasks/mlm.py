"""A masked-language-model encoder: all-MiniLM-L6-v2 (or a descendant) with BERT's masked-LM head.

Saved as a directory that needs nothing but itself to load again:

    encoder.json        what this is: format, format_version, task "masked-lm", base model, max_length
    config.json         the transformers config (architecture only; never remote code)
    model.safetensors   every weight once: bert.* and cls.*, without the decoder's tied copies

The tokenizer is the shipped model's (`minilm.base_tokenizer`; see tasks/classifier.py), and
files go through a `Files` (sealed in a worker), built and loaded in memory.

The head's decoder shares its weight with the word embeddings (and its bias with cls.predictions.bias).
safetensors refuses tensors that share memory, and a second copy would untie them on load, so the
tied keys are left out when saving and tied again when loading (checked, not assumed).

Also here: BERT's masking rule as a seeded collator, perplexity on a fixed masking and fill-mask.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tasks import classifier as clf
from tasks import minilm
from tensorq.core.sealed_files import PLAIN, Files

if TYPE_CHECKING:
    import torch

FORMAT = "tensorq-masked-lm"
FORMAT_VERSION = 1
TASK: Literal["masked-lm"] = "masked-lm"
CONFIG_FILE = "encoder.json"
WEIGHTS_FILE = "model.safetensors"
# Keys of BertForMaskedLM that are the same tensor as another key (transformers' _tied_weights_keys).
TIED = {
    "cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
    "cls.predictions.decoder.bias": "cls.predictions.bias",
}
MASK_PROBABILITY = 0.15
# Of the selected tokens: 80% become [MASK], 10% a random token, 10% stay as they are.
MASK_FRACTION = 0.8
RANDOM_FRACTION = 0.1
IGNORE_INDEX = -100  # label of a position the loss skips
EVAL_BATCH = 64
MAX_POSITIONS = 512  # BERT's position embeddings


class MaskedLMFormatError(ValueError):
    """A directory that does not hold a masked-LM encoder this code can load."""


class MaskedLMConfig(BaseModel):
    model_config = ConfigDict(extra="ignore")

    format: str
    format_version: int
    task: Literal["masked-lm"]
    base_model: str
    max_length: int = Field(ge=1, le=MAX_POSITIONS)


@dataclass
class MaskedLM:
    """The model (a transformers BertForMaskedLM), its tokenizer and where it came from."""

    model: Any
    tokenizer: Any
    device: str
    base_model: str = minilm.MODEL_NAME
    max_length: int = minilm.MAX_TOKENS

    def nbytes(self) -> int:
        # Tied tensors are counted once: they are one block of memory.
        seen: dict[int, int] = {}
        for t in self.model.state_dict().values():
            seen[t.data_ptr()] = t.numel() * t.element_size()
        return sum(seen.values())


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def check_tied(model: Any) -> None:
    """Raise unless the decoder really shares the embeddings' weight and the head's bias."""
    state = model.state_dict()
    for key, source in TIED.items():
        if key in state and state[key].data_ptr() != state[source].data_ptr():
            raise MaskedLMFormatError(f"{key} is not tied to {source}")


def build_mlm_from_minilm(device: str = "cpu") -> MaskedLM:
    """BertForMaskedLM on the shipped MiniLM weights; the head (transform, bias) starts fresh from
    torch's RNG, its decoder tied to the word embeddings. The shipped pooler is not used, so dropped."""
    from transformers import AutoTokenizer, BertForMaskedLM

    _quiet_transformers()
    path = minilm.model_dir()
    model: Any = BertForMaskedLM.from_pretrained(path, local_files_only=True)
    check_tied(model)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return MaskedLM(model=model.to(device), tokenizer=tokenizer, device=device)


def read_config(path: Path, files: Files = PLAIN) -> MaskedLMConfig:
    try:
        config = MaskedLMConfig.model_validate(json.loads(files.read(Path(path) / CONFIG_FILE)))
    except FileNotFoundError as exc:
        raise MaskedLMFormatError(f"no {CONFIG_FILE} in {path}: not a masked-LM encoder") from exc
    except (ValueError, ValidationError) as exc:
        raise MaskedLMFormatError(f"bad {CONFIG_FILE} in {path}: {exc}") from exc
    if config.format != FORMAT or config.format_version != FORMAT_VERSION:
        raise MaskedLMFormatError(f"{path} holds {config.format} v{config.format_version}, not {FORMAT}")
    return config


def is_masked_lm_dir(path: Path | str, files: Files = PLAIN) -> bool:
    try:
        read_config(Path(path), files)
    except MaskedLMFormatError:
        return False
    return True


def mlm_files(mlm: MaskedLM) -> dict[str, bytes]:
    """The files of a saved masked-LM encoder, name -> bytes, built in memory."""
    from safetensors.torch import save

    check_tied(mlm.model)
    weights = {
        k: v.detach().to("cpu").contiguous() for k, v in mlm.model.state_dict().items() if k not in TIED
    }
    config = MaskedLMConfig(
        format=FORMAT,
        format_version=FORMAT_VERSION,
        task=TASK,
        base_model=mlm.base_model,
        max_length=mlm.max_length,
    )
    hf_config = mlm.model.config.to_dict()
    hf_config["architectures"] = ["BertForMaskedLM"]
    hf_config["tie_word_embeddings"] = True
    return {
        WEIGHTS_FILE: save(weights, metadata={"format": FORMAT}),
        CONFIG_FILE: (config.model_dump_json(indent=2) + "\n").encode(),
        "config.json": (json.dumps(hf_config, indent=2, sort_keys=True) + "\n").encode(),
    }


def save_mlm(mlm: MaskedLM, path: Path | str, files: Files = PLAIN) -> Path:
    """Write `mlm` to directory `path`, replacing whatever was there as one rename."""
    return files.write_dir(Path(path).absolute(), mlm_files(mlm))


def _read_parts(path: Path, files: Files) -> tuple[MaskedLMConfig, Any, dict[str, torch.Tensor], Any]:
    """encoder.json, the bert config, the weights of a saved directory, and the tokenizer."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    _quiet_transformers()
    config = read_config(path, files)
    try:
        hf_config = minilm.hf_config(files.read(path / "config.json"))
    except (OSError, ValueError) as exc:
        raise MaskedLMFormatError(f"no readable config.json in {path}") from exc
    if hf_config.model_type != "bert":  # what build_mlm_from_minilm makes; nothing else is built here
        raise MaskedLMFormatError(f"{path} has a {hf_config.model_type!r} encoder, not bert")
    try:
        weights = load(files.read(path / WEIGHTS_FILE))
    except FileNotFoundError as exc:
        raise MaskedLMFormatError(f"no {WEIGHTS_FILE} in {path}") from exc
    except SafetensorError as exc:
        raise MaskedLMFormatError(f"unreadable {WEIGHTS_FILE} in {path}: {exc}") from exc
    return config, hf_config, weights, minilm.base_tokenizer()


def load_mlm(path: Path | str, device: str = "cpu", files: Files = PLAIN) -> MaskedLM:
    """Load a directory written by `save_mlm`, tied and in eval mode, onto `device`."""
    from transformers import BertForMaskedLM

    path = Path(path)
    config, hf_config, weights, tokenizer = _read_parts(path, files)
    hf_config.tie_word_embeddings = True
    model: Any = minilm.uninitialised(lambda: BertForMaskedLM(hf_config))  # every weight is loaded next
    model.tie_weights()  # which the skipped init would have done
    expected = set(model.state_dict()) - set(TIED)
    if set(weights) != expected:
        missing, extra = sorted(expected - set(weights)), sorted(set(weights) - expected)
        raise MaskedLMFormatError(
            f"weights in {path} do not fit: missing {missing[:5]}, unexpected {extra[:5]}"
        )
    try:
        # Copies into the existing parameters, so the decoder (the same tensor) gets them too.
        model.load_state_dict(weights, strict=False)
    except RuntimeError as exc:  # misshapen tensors
        raise MaskedLMFormatError(f"weights in {path} do not fit its config: {exc}") from exc
    check_tied(model)
    return MaskedLM(
        model=model.to(device).eval(),
        tokenizer=tokenizer,
        device=device,
        base_model=config.base_model,
        max_length=config.max_length,
    )


def load_encoder_from_dir(path: Path | str, device: str = "cpu", files: Files = PLAIN) -> minilm.Encoder:
    """The bare encoder (a BertModel, no pooler, no head) of a saved masked-LM directory, in eval mode:
    what embedding (minilm.embed_texts) and classifier fine-tuning start from."""
    from transformers import BertModel

    path = Path(path)
    _, hf_config, weights, tokenizer = _read_parts(path, files)
    model: Any = minilm.uninitialised(lambda: BertModel(hf_config, add_pooling_layer=False))
    encoder_weights = {k.removeprefix("bert."): v for k, v in weights.items() if k.startswith("bert.")}
    try:
        model.load_state_dict(encoder_weights, strict=True)
    except RuntimeError as exc:
        raise MaskedLMFormatError(f"encoder weights in {path} do not fit its config: {exc}") from exc
    return minilm.Encoder(tokenizer=tokenizer, model=model.to(device).eval(), device=device)


def build_classifier_from_dir(
    path: Path | str,
    labels: Sequence[str],
    max_seq_length: int,
    base_model: str,
    device: str = "cpu",
    files: Files = PLAIN,
) -> clf.TextClassifier:
    """A fresh text classifier (tasks.classifier's mean pooling + linear head) on the encoder of a
    saved masked-LM directory, for train-text-classifier's `base_model`. The head's init is the one
    build_classifier uses and draws from torch's RNG; `base_model` ("name:version") is recorded."""
    import torch

    if len(labels) < 2 or len(set(labels)) != len(labels):
        raise ValueError("a classifier needs at least two distinct labels")
    encoder = load_encoder_from_dir(path, device, files)
    head = torch.nn.Linear(encoder.model.config.hidden_size, len(labels))
    torch.nn.init.normal_(head.weight, std=encoder.model.config.initializer_range)
    torch.nn.init.zeros_(head.bias)
    return clf.TextClassifier(
        tokenizer=encoder.tokenizer,
        encoder=encoder.model,
        head=head.to(device),
        labels=list(labels),
        max_seq_length=max_seq_length,
        device=device,
        base_model=base_model,
    )


# --- masking -------------------------------------------------------------------------------------


@dataclass
class Tokenized:
    """One text's token ids (with [CLS]/[SEP]) and, per token, its word's index (None for specials)."""

    input_ids: list[int]
    word_ids: list[int | None]


def tokenize(tokenizer: Any, texts: Sequence[str], max_length: int) -> list[Tokenized]:
    """Token ids once, up front; the collator pads and masks them per batch."""
    enc = tokenizer(list(texts), truncation=True, max_length=max_length, return_special_tokens_mask=True)
    special = set(tokenizer.all_special_ids)
    out: list[Tokenized] = []
    for i, ids in enumerate(enc["input_ids"]):
        if getattr(enc, "is_fast", False) or getattr(tokenizer, "is_fast", False):
            words = list(enc.word_ids(i))
        else:
            words = _words_from_pieces(tokenizer.convert_ids_to_tokens(ids), [t in special for t in ids])
        # A truncated word's pieces still count as one word; specials are never words.
        out.append(
            Tokenized(list(ids), [None if t in special else w for t, w in zip(ids, words, strict=True)])
        )
    return out


def _words_from_pieces(pieces: list[str], is_special: list[bool]) -> list[int | None]:
    """Word indices from WordPiece's "##" continuation marks, for tokenizers without word_ids."""
    words: list[int | None] = []
    current = -1
    for piece, special in zip(pieces, is_special, strict=True):
        if special:
            words.append(None)
            continue
        if not (piece.startswith("##") and current >= 0):
            current += 1
        words.append(current)
    return words


@dataclass
class MaskedBatch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor  # the original id where the loss looks, IGNORE_INDEX elsewhere


class MaskingCollator:
    """BERT's masking rule, drawn from one seeded torch.Generator (its state goes into checkpoints).

    Each non-special, non-pad token is selected with probability `mask_probability` (with whole-word
    masking: each word, and then all of its pieces). A selected token (word) becomes [MASK] with
    probability 0.8, a random non-special token with 0.1 and stays itself with 0.1; the loss is taken
    at every selected position. A batch in which nothing was selected gets one selected position, so
    its loss is defined (unless it has no maskable token at all: texts the tokenizer makes nothing of). The draws depend only on the batch's shape and the generator, so the same
    generator state gives the same masks.
    """

    def __init__(
        self,
        tokenizer: Any,
        generator: torch.Generator,
        mask_probability: float = MASK_PROBABILITY,
        whole_word: bool = False,
    ) -> None:
        import torch

        self.generator = generator
        self.mask_probability = mask_probability
        self.whole_word = whole_word
        self.pad_id = int(tokenizer.pad_token_id)
        self.mask_id = int(tokenizer.mask_token_id)
        special = set(tokenizer.all_special_ids)
        self.replacements = torch.tensor([i for i in range(len(tokenizer)) if i not in special])

    def __call__(self, items: Sequence[Tokenized]) -> MaskedBatch:
        import torch

        g = self.generator
        length = max(len(item.input_ids) for item in items)
        ids = torch.full((len(items), length), self.pad_id, dtype=torch.long)
        words = torch.full((len(items), length), -1, dtype=torch.long)
        attention = torch.zeros((len(items), length), dtype=torch.long)
        for row, item in enumerate(items):
            n = len(item.input_ids)
            ids[row, :n] = torch.tensor(item.input_ids)
            words[row, :n] = torch.tensor([-1 if w is None else w for w in item.word_ids])
            attention[row, :n] = 1
        candidate = words >= 0  # never specials, never padding

        if self.whole_word:
            # One draw per word (and per decision), spread over the word's pieces.
            n_words = int(words.max().item()) + 1 if candidate.any() else 1
            at = words.clamp(min=0)
            selected = torch.gather(
                torch.rand((len(items), n_words), generator=g) < self.mask_probability, 1, at
            )
            decision = torch.gather(torch.rand((len(items), n_words), generator=g), 1, at)
        else:
            selected = torch.rand(ids.shape, generator=g) < self.mask_probability
            decision = torch.rand(ids.shape, generator=g)
        selected &= candidate
        random_ids = self.replacements[torch.randint(len(self.replacements), ids.shape, generator=g)]
        if not selected.any() and candidate.any():
            # Deterministic too: a draw from the same generator picks one candidate.
            flat = candidate.flatten().nonzero().flatten()
            pick = flat[torch.randint(len(flat), (1,), generator=g)]
            selected.view(-1)[pick] = True

        labels = torch.where(selected, ids, torch.full_like(ids, IGNORE_INDEX))
        masked = ids.clone()
        to_mask = selected & (decision < MASK_FRACTION)
        to_random = selected & (decision >= MASK_FRACTION) & (decision < MASK_FRACTION + RANDOM_FRACTION)
        masked[to_mask] = self.mask_id
        masked[to_random] = random_ids[to_random]
        return MaskedBatch(input_ids=masked, attention_mask=attention, labels=labels)


def masked_lm_loss(model: Any, batch: MaskedBatch, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy at the labelled positions only: the 30522-way decoder runs on ~15% of the
    tokens instead of all of them (the same loss BertForMaskedLM computes, a fraction of the cost)."""
    import torch.nn.functional as F

    device = next(model.parameters()).device
    out = model.bert(
        input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device)
    ).last_hidden_state
    labels = batch.labels.to(device)
    where = labels != IGNORE_INDEX
    logits = model.cls(out[where])
    loss: torch.Tensor = F.cross_entropy(logits.float(), labels[where], reduction=reduction)
    return loss


@dataclass
class Perplexity:
    value: float
    masked_tokens: int


def fixed_masks(
    tokenizer: Any,
    texts: Sequence[str],
    max_length: int,
    seed: int,
    mask_probability: float = MASK_PROBABILITY,
    whole_word: bool = False,
    batch_size: int = EVAL_BATCH,
) -> list[MaskedBatch]:
    """The held-out texts masked once, from `seed`: measuring before and after on these batches
    scores exactly the same positions with exactly the same corrupted inputs."""
    import torch

    collate = MaskingCollator(tokenizer, torch.Generator().manual_seed(seed), mask_probability, whole_word)
    items = tokenize(tokenizer, texts, max_length)
    return [collate(items[i : i + batch_size]) for i in range(0, len(items), batch_size)]


def perplexity(model: Any, batches: Sequence[MaskedBatch], check: Any = None) -> Perplexity:
    """exp(mean cross-entropy over every masked position of `batches`), in eval mode (no dropout).
    `check`, if given, is called before each batch (a job's cancellation check)."""
    import torch

    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        with torch.inference_mode():
            for batch in batches:
                if check is not None:
                    check()
                total += float(masked_lm_loss(model, batch, reduction="sum").item())
                count += int((batch.labels != IGNORE_INDEX).sum().item())
    finally:
        model.train(was_training)
    mean = total / max(1, count)
    return Perplexity(value=math.exp(min(mean, 700.0)), masked_tokens=count)


# --- fill-mask ----------------------------------------------------------------------------------


@dataclass
class TokenScore:
    token: str
    score: float


def fill_mask(
    mlm: MaskedLM, texts: Sequence[str], top_k: int = 5, batch_size: int = EVAL_BATCH
) -> list[list[list[TokenScore]]]:
    """Per text, per [MASK] in order, the `top_k` most likely tokens, best first.

    Scores are softmax probabilities over the whole vocabulary; special tokens ([CLS], [PAD], ...)
    are never offered as candidates. Tokens are vocabulary strings: a "##" piece stays as it is.
    Many texts share one forward pass (`batch_size` at a time); the head runs only at the masks.
    Raises ValueError naming the text when truncation to the model's length cut a mask off.
    """
    import torch

    tokenizer, model = mlm.tokenizer, mlm.model
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)), device=mlm.device)
    max_length = min(MAX_POSITIONS, int(model.config.max_position_embeddings))
    out: list[list[list[TokenScore]]] = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            chunk = list(texts[start : start + batch_size])
            encoded: list[list[int]] = []
            for i, ids in enumerate(tokenizer(chunk)["input_ids"]):
                if len(ids) > max_length:  # cut as truncation would, but refuse to lose a mask
                    kept = [*ids[: max_length - 1], ids[-1]]
                    if kept.count(tokenizer.mask_token_id) != ids.count(tokenizer.mask_token_id):
                        raise ValueError(f"text {start + i} has a mask beyond token {max_length}")
                    ids = kept
                encoded.append(ids)
            batch = tokenizer.pad({"input_ids": encoded}, return_tensors="pt").to(mlm.device)
            where = batch["input_ids"] == tokenizer.mask_token_id
            hidden = model.bert(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).last_hidden_state
            # nonzero() walks row-major: text by text, masks left to right.
            rows = where.nonzero()[:, 0].tolist()
            probs = torch.softmax(model.cls(hidden[where]).float(), dim=-1)
            probs[:, special] = -1.0  # after the softmax, so the scores stay probabilities
            scores, top_ids = probs.topk(top_k, dim=-1)
            per_text: list[list[list[TokenScore]]] = [[] for _ in chunk]
            for row, s, t in zip(rows, scores.cpu().tolist(), top_ids.cpu().tolist(), strict=True):
                tokens = tokenizer.convert_ids_to_tokens(t)
                per_text[row].append([TokenScore(tok, sc) for tok, sc in zip(tokens, s, strict=True)])
            out += per_text
    return out
