"""The OpenAI-compatible API (/openai/v1) through the official `openai` client, against the real
API, worker, PostgreSQL and Redis."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
import torch

from tests.helpers import Service, tenant_of

pytestmark = pytest.mark.integration

MODEL = "all-MiniLM-L6-v2"
TEXTS = ["A man is playing a guitar.", "Someone is playing an instrument.", "The invoice is overdue."]


@pytest.fixture
def oa(service: Service) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{service.base_url}/openai/v1", api_key=service.api_key, max_retries=0) as c:
        yield c


def native(client: httpx.Client, texts: list[str]) -> torch.Tensor:
    r = client.post("/v1/jobs", json={"kind": "embed", "input": {"texts": texts}}, headers={"Prefer": "wait"})
    assert r.status_code == 201 and r.json()["status"] == "succeeded", r.text
    return torch.tensor(r.json()["result"]["embeddings"])


def assert_close(served: Any, expected: torch.Tensor) -> None:
    cosines = torch.nn.functional.cosine_similarity(
        torch.tensor(served, dtype=torch.float64), expected.double(), dim=-1
    )
    assert bool((cosines >= 0.9999).all()), cosines


def from_base64(value: str) -> list[float]:
    raw = base64.b64decode(value)
    return torch.frombuffer(bytearray(raw), dtype=torch.float32).tolist()  # little-endian, as OpenAI's


def test_embeddings_match_the_native_embed_job(oa: openai.OpenAI, client: httpx.Client) -> None:
    expected = native(client, TEXTS)

    one = oa.embeddings.create(model=MODEL, input=TEXTS[0])  # the client asks for base64 and decodes it
    assert one.object == "list" and one.model == MODEL and len(one.data) == 1
    assert len(one.data[0].embedding) == 384
    assert_close(one.data[0].embedding, expected[0])
    assert one.usage.prompt_tokens == one.usage.total_tokens > 2  # [CLS] ... [SEP]

    many = oa.embeddings.create(model=MODEL, input=TEXTS, encoding_format="float", user="someone")
    assert [d.index for d in many.data] == [0, 1, 2]
    assert_close([d.embedding for d in many.data], expected)
    assert many.usage.prompt_tokens > one.usage.prompt_tokens

    b64 = oa.embeddings.create(
        model=f"sentence-transformers/{MODEL}", input=TEXTS, encoding_format="base64", dimensions=384
    )
    assert all(isinstance(d.embedding, str) for d in b64.data)
    assert_close([from_base64(d.embedding) for d in b64.data], expected)  # type: ignore[arg-type]

    # Each request was an embed job of the tenant, like any other.
    latest = client.get("/v1/jobs", params={"kind": "embed", "limit": 1, "include": "input"}).json()["items"][
        0
    ]
    assert latest["status"] == "succeeded" and latest["input"]["texts"] == TEXTS


def test_models_and_openai_shaped_errors(oa: openai.OpenAI, service: Service) -> None:
    assert [m.id for m in oa.models.list()] == [MODEL]
    assert oa.models.retrieve(MODEL).owned_by

    with pytest.raises(openai.NotFoundError) as missing:
        oa.embeddings.create(model="text-embedding-3-small", input="hello")
    assert missing.value.body["code"] == "model_not_found"  # type: ignore[index]
    assert missing.value.body["type"] == "invalid_request_error"  # type: ignore[index]

    for bad, param in (
        (dict(input=""), "input"),
        (dict(input=[]), "input"),
        (dict(input=[[1, 2]]), "input"),
        (dict(input="x", dimensions=128), "dimensions"),
    ):
        with pytest.raises(openai.BadRequestError) as refused:
            oa.embeddings.create(model=MODEL, **bad)  # type: ignore[arg-type]
        body = refused.value.body
        assert body["type"] == "invalid_request_error" and body["param"] == param, body  # type: ignore[index]
        assert body["message"]  # type: ignore[index]

    with pytest.raises(openai.BadRequestError) as unknown:
        oa.embeddings.create(model=MODEL, input="x", extra_body={"temperature": 1})
    assert unknown.value.body["param"] == "temperature"  # type: ignore[index]

    other = openai.OpenAI(base_url=f"{service.base_url}/openai/v1", api_key="tq_wrong", max_retries=0)
    with other, pytest.raises(openai.AuthenticationError) as denied:
        other.models.list()
    assert denied.value.body["code"] == "invalid_api_key"  # type: ignore[index]

    # The rest of the API keeps its own error format.
    r = httpx.post(
        f"{service.base_url}/v1/jobs", json={}, headers={"Authorization": f"Bearer {service.api_key}"}
    )
    assert r.status_code == 422 and "detail" in r.json()


def batch_file(n: int, invalid: set[int] = frozenset()) -> bytes:  # type: ignore[assignment]
    lines = []
    for i in range(n):
        body: dict[str, Any] = {"model": MODEL, "input": f"sentence number {i}"}
        if i in invalid:
            body["input"] = ""
        lines.append({"custom_id": f"req-{i}", "method": "POST", "url": "/v1/embeddings", "body": body})
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def wait_batch(oa: openai.OpenAI, batch_id: str, timeout: float = 300) -> Any:
    deadline = time.monotonic() + timeout
    seen = []
    while True:
        batch = oa.batches.retrieve(batch_id)
        seen.append(batch.status)
        if batch.status in ("completed", "failed", "cancelled", "expired"):
            return batch, seen
        assert time.monotonic() < deadline, (batch, seen)
        time.sleep(0.5)


def test_a_thousand_line_batch(oa: openai.OpenAI, client: httpx.Client) -> None:
    uploaded = oa.files.create(file=("requests.jsonl", batch_file(1000, invalid={417})), purpose="batch")
    assert uploaded.object == "file" and uploaded.purpose == "batch" and uploaded.bytes > 0
    assert oa.files.retrieve(uploaded.id).filename == "requests.jsonl"
    assert oa.files.content(uploaded.id).content == batch_file(1000, invalid={417})

    created = oa.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h", metadata={"run": "t1"}
    )
    assert created.status == "validating" and created.request_counts.total == 1000  # type: ignore[union-attr]
    assert created.metadata == {"run": "t1"} and created.expires_at == created.created_at + 86400

    batch, seen = wait_batch(oa, created.id)
    assert batch.status == "completed", (batch, seen)
    counts = batch.request_counts
    assert (counts.total, counts.completed, counts.failed) == (1000, 999, 1)
    assert batch.created_at <= batch.in_progress_at <= batch.finalizing_at <= batch.completed_at

    output = [json.loads(line) for line in oa.files.content(batch.output_file_id).text.splitlines()]
    assert len(output) == 999 and "req-417" not in {o["custom_id"] for o in output}
    assert {o["custom_id"] for o in output} == {f"req-{i}" for i in range(1000)} - {"req-417"}
    first = output[0]
    assert first["error"] is None and first["response"]["status_code"] == 200
    body = first["response"]["body"]
    assert body["object"] == "list" and body["model"] == MODEL and body["usage"]["prompt_tokens"] > 0
    assert_close(body["data"][0]["embedding"], native(client, ["sentence number 0"])[0])

    errors = [json.loads(line) for line in oa.files.content(batch.error_file_id).text.splitlines()]
    assert len(errors) == 1 and errors[0]["custom_id"] == "req-417"
    assert errors[0]["response"]["status_code"] == 400
    assert errors[0]["response"]["body"]["error"]["param"] == "input"
    assert oa.files.retrieve(batch.output_file_id).purpose == "batch_output"

    # Listing pages with after/limit, newest first.
    second = oa.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h")
    page = oa.batches.list(limit=1)
    assert [b.id for b in page.data] == [second.id] and page.has_more
    nxt = oa.batches.list(limit=1, after=second.id)
    assert [b.id for b in nxt.data] == [created.id]
    wait_batch(oa, second.id)


def test_a_cancelled_batch(oa: openai.OpenAI) -> None:
    uploaded = oa.files.create(file=("cancel.jsonl", batch_file(1000)), purpose="batch")
    created = oa.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h")
    cancelling = oa.batches.cancel(created.id)
    assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at is not None
    batch, seen = wait_batch(oa, created.id)
    assert batch.status == "cancelled" and batch.cancelled_at is not None, (batch, seen)
    counts = batch.request_counts
    assert counts.completed + counts.failed == counts.total == 1000 and counts.failed > 0
    errors = [json.loads(line) for line in oa.files.content(batch.error_file_id).text.splitlines()]
    assert len(errors) == counts.failed
    assert all(e["error"]["code"] == "batch_cancelled" and e["custom_id"].startswith("req-") for e in errors)
    assert oa.batches.cancel(created.id).status == "cancelled"  # again: nothing changes
    with pytest.raises(openai.BadRequestError):  # an error file is no batch input
        oa.batches.create(
            input_file_id=batch.error_file_id, endpoint="/v1/embeddings", completion_window="24h"
        )


def test_file_level_validation(oa: openai.OpenAI) -> None:
    line = {
        "custom_id": "a",
        "method": "POST",
        "url": "/v1/embeddings",
        "body": {"model": MODEL, "input": "x"},
    }
    cases = [
        (json.dumps(line) + "\n" + json.dumps(line) + "\n", "custom_id"),  # duplicate custom_id
        (json.dumps({**line, "url": "/v1/chat/completions"}), "url"),
        (json.dumps({**line, "method": "GET"}), "method"),
        ("not json\n", None),
        ("", "file"),
    ]
    for content, param in cases:
        with pytest.raises(openai.BadRequestError) as refused:
            oa.files.create(file=("bad.jsonl", content.encode()), purpose="batch")
        assert refused.value.body["param"] == param, (content, refused.value.body)  # type: ignore[index]
    with pytest.raises(openai.BadRequestError):
        oa.files.create(file=("ok.jsonl", json.dumps(line).encode()), purpose="fine-tune")


def test_another_tenants_files_and_batches_are_not_found(
    oa: openai.OpenAI, service: Service, client: httpx.Client
) -> None:
    uploaded = oa.files.create(file=("mine.jsonl", batch_file(3)), purpose="batch")
    created = oa.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h")
    batch, _ = wait_batch(oa, created.id)
    assert batch.status == "completed"

    other_key = service.new_key(f"{tenant_of(client)}-other")
    with openai.OpenAI(base_url=f"{service.base_url}/openai/v1", api_key=other_key, max_retries=0) as other:
        for call in (
            lambda: other.files.retrieve(uploaded.id),
            lambda: other.files.content(uploaded.id),
            lambda: other.files.content(batch.output_file_id),
            lambda: other.batches.retrieve(created.id),
            lambda: other.batches.cancel(created.id),
            lambda: other.batches.create(
                input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h"
            ),
        ):
            with pytest.raises(openai.NotFoundError):
                call()
        assert created.id not in [b.id for b in other.batches.list()]
