"""A text classifier: the shipped all-MiniLM-L6-v2 encoder, mean pooling and a linear head.

Saved as a directory that needs nothing but itself to load again:

    classifier.json     what this is: labels, max_seq_length, base model, format version
    config.json         the encoder's transformers config (architecture only; never remote code)
    model.safetensors   every weight, encoder.* and head.*

The tokenizer is the shipped model's (`minilm.base_tokenizer`): no tokenizer files are written
(directories saved before encryption at rest hold some; they are not read). Files are written and
read through a `Files` (tensorq.core.sealed_files): sealed with the tenant's key in a worker, so
every file is built in memory and weights are loaded from bytes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tasks import minilm
from tensorq.core.sealed_files import PLAIN, Files

if TYPE_CHECKING:
    import torch

# A model name as users write it in `model_name` and in references: no dots or slashes, so a name
# can never step outside the directory it is joined to.
MODEL_NAME_PATTERN = r"[a-z0-9][a-z0-9_-]{0,62}"

FORMAT = "tensorq-text-classifier"
FORMAT_VERSION = 1
CONFIG_FILE = "classifier.json"
WEIGHTS_FILE = "model.safetensors"
PREDICT_BATCH = 64
MAX_LABELS = 1000
MAX_LABEL_CHARS = 100


class ClassifierFormatError(ValueError):
    """A directory that does not hold a classifier this code can load."""


class ClassifierConfig(BaseModel):
    model_config = ConfigDict(extra="ignore")

    format: str
    format_version: int
    base_model: str
    labels: list[str] = Field(min_length=2, max_length=MAX_LABELS)
    max_seq_length: int = Field(ge=1, le=minilm.MAX_TOKENS)
    pooling: str = "mean"

    @field_validator("labels")
    @classmethod
    def _unique(cls, labels: list[str]) -> list[str]:
        if len(set(labels)) != len(labels):
            raise ValueError("labels must be unique")
        return labels


@dataclass
class TextClassifier:
    """Encoder and head kept side by side (not one nn.Module) so this module imports without torch."""

    tokenizer: Any
    encoder: Any  # a transformers BertModel
    head: torch.nn.Linear
    labels: list[str]
    max_seq_length: int
    device: str
    base_model: str = minilm.MODEL_NAME

    def named_parameters(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        yield from (("encoder." + n, p) for n, p in self.encoder.named_parameters())
        yield from (("head." + n, p) for n, p in self.head.named_parameters())

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {"encoder." + k: v for k, v in self.encoder.state_dict().items()}
        state.update({"head." + k: v for k, v in self.head.state_dict().items()})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        encoder = {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}
        head = {k.removeprefix("head."): v for k, v in state.items() if k.startswith("head.")}
        if len(encoder) + len(head) != len(state):
            raise ClassifierFormatError("weights other than encoder.* and head.*")
        self.encoder.load_state_dict(encoder, strict=True)
        self.head.load_state_dict(head, strict=True)

    def train(self, mode: bool = True) -> None:
        self.encoder.train(mode)
        self.head.train(mode)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())

    def logits(self, texts: Sequence[str]) -> torch.Tensor:
        """Raw scores, one row per text; gradients flow unless the caller turned them off."""
        batch = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_seq_length, return_tensors="pt"
        ).to(self.device)
        out = self.encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        result: torch.Tensor = self.head(minilm.mean_pool(out.last_hidden_state, batch["attention_mask"]))
        return result


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def build_classifier(labels: Sequence[str], max_seq_length: int, device: str = "cpu") -> TextClassifier:
    """A fresh classifier for `labels` on the pretrained encoder; the head's init uses torch's RNG."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    _quiet_transformers()
    if len(labels) < 2 or len(set(labels)) != len(labels):
        raise ValueError("a classifier needs at least two distinct labels")
    path = minilm.model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    # No pooler: the head reads mean-pooled token states, so the pooler would be dead weight.
    encoder = AutoModel.from_pretrained(path, local_files_only=True, add_pooling_layer=False)
    head = torch.nn.Linear(encoder.config.hidden_size, len(labels))
    torch.nn.init.normal_(head.weight, std=encoder.config.initializer_range)
    torch.nn.init.zeros_(head.bias)
    return TextClassifier(
        tokenizer=tokenizer,
        encoder=encoder.to(device),
        head=head.to(device),
        labels=list(labels),
        max_seq_length=max_seq_length,
        device=device,
    )


def classifier_files(classifier: TextClassifier) -> dict[str, bytes]:
    """The files of a saved classifier, name -> bytes, built in memory."""
    from safetensors.torch import save

    weights = {k: v.detach().to("cpu").contiguous() for k, v in classifier.state_dict().items()}
    config = ClassifierConfig(
        format=FORMAT,
        format_version=FORMAT_VERSION,
        base_model=classifier.base_model,
        labels=classifier.labels,
        max_seq_length=classifier.max_seq_length,
    )
    return {
        WEIGHTS_FILE: save(weights, metadata={"format": FORMAT}),
        CONFIG_FILE: (config.model_dump_json(indent=2) + "\n").encode(),
        # What config.to_json_file writes.
        "config.json": classifier.encoder.config.to_json_string().encode(),
    }


def save_classifier(
    classifier: TextClassifier, path: Path | str, files: Files = PLAIN, extra: dict[str, bytes] | None = None
) -> Path:
    """Write the classifier (and `extra` files, name -> bytes) to directory `path`, replacing
    whatever was there as one rename."""
    return files.write_dir(Path(path).absolute(), {**classifier_files(classifier), **(extra or {})})


def read_config(path: Path, files: Files = PLAIN) -> ClassifierConfig:
    try:
        config = ClassifierConfig.model_validate(json.loads(files.read(Path(path) / CONFIG_FILE)))
    except FileNotFoundError as exc:
        raise ClassifierFormatError(f"no {CONFIG_FILE} in {path}") from exc
    except (ValueError, ValidationError) as exc:
        raise ClassifierFormatError(f"bad {CONFIG_FILE} in {path}: {exc}") from exc
    if config.format != FORMAT or config.format_version != FORMAT_VERSION:
        raise ClassifierFormatError(
            f"{path} holds {config.format} v{config.format_version}, not a classifier"
        )
    return config


def load_classifier(path: Path | str, device: str = "cpu", files: Files = PLAIN) -> TextClassifier:
    """Load a directory written by `save_classifier`, in eval mode, onto `device`."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load
    from transformers import AutoModel

    _quiet_transformers()
    path = Path(path)
    config = read_config(path, files)
    try:
        encoder_config = minilm.hf_config(files.read(path / "config.json"))
    except (OSError, ValueError) as exc:
        raise ClassifierFormatError(f"no readable encoder config.json in {path}") from exc
    if encoder_config.model_type != "bert":  # what build_classifier makes; nothing else is built here
        raise ClassifierFormatError(f"{path} has a {encoder_config.model_type!r} encoder, not bert")
    # Every weight is loaded next, strictly: no random init to pay for.
    encoder = minilm.uninitialised(lambda: AutoModel.from_config(encoder_config, add_pooling_layer=False))
    head = torch.nn.Linear(encoder_config.hidden_size, len(config.labels))
    try:
        weights = load(files.read(path / WEIGHTS_FILE))
    except FileNotFoundError as exc:
        raise ClassifierFormatError(f"no {WEIGHTS_FILE} in {path}") from exc
    except SafetensorError as exc:
        raise ClassifierFormatError(f"unreadable {WEIGHTS_FILE} in {path}: {exc}") from exc
    classifier = TextClassifier(
        tokenizer=minilm.base_tokenizer(),
        encoder=encoder,
        head=head,
        labels=config.labels,
        max_seq_length=config.max_seq_length,
        device=device,
        base_model=config.base_model,
    )
    try:
        classifier.load_state_dict(weights)
    except RuntimeError as exc:  # missing, unexpected or misshapen tensors
        raise ClassifierFormatError(f"weights in {path} do not fit its config: {exc}") from exc
    classifier.encoder.to(device)
    classifier.head.to(device)
    classifier.train(False)
    return classifier


def predict(classifier: TextClassifier, texts: Sequence[str]) -> list[tuple[str, dict[str, float]]]:
    """The most likely label and every label's probability, per text, in order."""
    import torch

    out: list[tuple[str, dict[str, float]]] = []
    with torch.inference_mode():
        for start in range(0, len(texts), PREDICT_BATCH):
            logits = classifier.logits(texts[start : start + PREDICT_BATCH])
            probs = torch.softmax(logits.float(), dim=-1).cpu()
            for row in probs.tolist():
                best = max(range(len(row)), key=row.__getitem__)
                out.append((classifier.labels[best], dict(zip(classifier.labels, row, strict=True))))
    return out
