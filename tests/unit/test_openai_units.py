"""The OpenAI-compatible API's pure parts: batch-file checks, base64 vectors, inputs, error shapes."""

from __future__ import annotations

import base64
import json
import struct

import pytest

from api.openai.batches import check_batch_file
from api.openai.embeddings import encode_vector, texts_of
from api.openai.errors import OpenAIError, param_of
from tensorq.core.settings import Settings

LINE = {"custom_id": "a", "method": "POST", "url": "/v1/embeddings", "body": {"model": "m", "input": "x"}}


def test_base64_is_little_endian_float32() -> None:
    vector = [0.5, -1.25, 3.0]
    raw = base64.b64decode(encode_vector(vector, "base64"))  # type: ignore[arg-type]
    assert struct.unpack("<3f", raw) == (0.5, -1.25, 3.0)
    assert encode_vector(vector, "float") == vector


def test_inputs() -> None:
    assert texts_of("hi") == ["hi"] and texts_of(["a", "b"]) == ["a", "b"]
    for bad in ([], [1, 2], [[1]], None, 3, ["a", 1]):
        with pytest.raises(OpenAIError) as refused:
            texts_of(bad)
        assert refused.value.status_code == 400 and refused.value.param == "input"


def test_param_names() -> None:
    assert param_of(("body", "input", 3)) == "input[3]"
    assert param_of(("body",)) is None


def test_batch_file_checks() -> None:
    settings = Settings()
    good = "\n".join(json.dumps({**LINE, "custom_id": str(i)}) for i in range(3)).encode()
    assert check_batch_file(good, settings) == 3
    assert check_batch_file(good + b"\n", settings) == 3
    # A bad body is the line's problem, not the file's.
    assert check_batch_file(json.dumps({**LINE, "body": {"input": ""}}).encode(), settings) == 1
    bad = {
        b"": "file",
        good + b"\n\n": None,
        good + b"\n" + json.dumps({**LINE, "custom_id": "1"}).encode(): "custom_id",
        json.dumps({**LINE, "url": "/v1/completions"}).encode(): "url",
        json.dumps({**LINE, "body": "x"}).encode(): "body",
        b"[1]": None,
    }
    for data, param in bad.items():
        with pytest.raises(OpenAIError) as refused:
            check_batch_file(data, settings)
        assert refused.value.status_code == 400 and refused.value.param == param, data
    with pytest.raises(OpenAIError):
        check_batch_file(good, Settings(openai_file_max_lines=2))
