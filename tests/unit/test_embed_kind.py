"""The embed kind as plain Python, without Celery: the real all-MiniLM-L6-v2."""

from __future__ import annotations

import torch

from tasks.context import JobContext
from tasks.embed import EmbedParams, run


def test_embed_gives_normalised_384_dim_vectors_that_capture_meaning() -> None:
    texts = [
        "A man is playing a guitar.",
        "Someone plays the guitar.",
        "The stock market fell sharply today.",
    ]
    result = run(EmbedParams(texts=texts), JobContext())
    assert (result.model, result.dim) == ("all-MiniLM-L6-v2", 384)
    vectors = torch.tensor(result.embeddings)
    assert vectors.shape == (3, 384)
    assert torch.allclose(vectors.norm(dim=1), torch.ones(3), atol=1e-5)
    close, far = float(vectors[0] @ vectors[1]), float(vectors[0] @ vectors[2])
    assert close > 0.6 and far < 0.2 and close > far


def test_batch_padding_does_not_change_a_text_s_vector() -> None:
    alone = run(EmbedParams(texts=["short"]), JobContext()).embeddings[0]
    padded = run(EmbedParams(texts=["short", "a much longer sentence " * 10]), JobContext()).embeddings[0]
    assert float(torch.tensor(alone) @ torch.tensor(padded)) > 0.9999
