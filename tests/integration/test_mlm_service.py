"""Masked-LM pretraining, fill-mask, fine-tuning and embedding from a pretrained encoder, through the
API on PostgreSQL, Redis and a real worker, on the generated domain corpus (issue #19).

Training is slow here: one pretraining job for the module (200 texts, 32 tokens, 2 epochs), reused."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from tasks import minilm
from tasks.data import make_domain_corpus as corpus
from tests.conftest import Service
from tests.helpers import wait_job

pytestmark = pytest.mark.integration

DOMAIN = corpus.DOMAIN_WORD
TEXTS = 200
PRETRAIN = {
    "epochs": 2,
    "batch_size": 16,
    "learning_rate": 5e-4,
    "max_length": 32,
    "seed": 0,
    "model_name": "domain",
}
# Each asks for the crop; the first follows a corpus template, the other two no template of it.
PROBES = [
    "farmers harvest the [MASK] in autumn.",
    "in the valley the villagers grow the [MASK] in wet soil.",
    "the [MASK] is dug up and stored for the winter.",
]
# Measured: 1.0 (48 of 48 validation rows, val_f1 1.0) with these settings; the labels are balanced (0.5).
MIN_ACCURACY = 0.9


def jsonl(rows: list[dict[str, str]]) -> bytes:
    return "\n".join(json.dumps(row) for row in rows).encode() + b"\n"


def upload(client: httpx.Client, data: bytes) -> httpx.Response:
    return client.post("/v1/datasets", content=data, headers={"content-type": "application/x-ndjson"})


def submit(client: httpx.Client, kind: str, **input: Any) -> httpx.Response:
    return client.post("/v1/jobs", json={"kind": kind, "input": input})


def job_count(client: httpx.Client) -> int:
    return len(client.get("/v1/jobs", params={"limit": 200}).json()["items"])


@dataclass
class Pretrained:
    job: dict[str, Any]
    dataset: dict[str, Any]
    seconds: float


@pytest.fixture(scope="module")
def pretrained(service: Service) -> Pretrained:
    with service.client() as client:
        r = upload(client, jsonl(corpus.domain_rows(TEXTS)))
        assert r.status_code == 201, r.text
        dataset = r.json()
        started = time.monotonic()
        r = submit(client, "pretrain-mlm", dataset_id=dataset["id"], **PRETRAIN)
        assert r.status_code == 202, r.text
        assert r.json()["model"] == "domain"
        job = wait_job(client, r.json()["id"], timeout=900)
        assert job["status"] == "succeeded", (job, service.worker.log()[-3000:])
        return Pretrained(job, dataset, time.monotonic() - started)


def test_text_only_datasets_upload_and_a_mix_is_refused_at_its_line(client: httpx.Client) -> None:
    before = len(client.get("/v1/datasets").json()["items"])
    rows = corpus.domain_rows(5)
    mixed = [*rows[:3], {"text": "a labelled one", "label": "thriving"}, *rows[3:]]
    r = upload(client, jsonl(mixed))
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["body", "line", 4]
    assert "all or none" in r.json()["detail"][0]["msg"]
    labelled_first = [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}, {"text": "no label"}]
    assert upload(client, jsonl(labelled_first)).json()["detail"][0]["loc"] == ["body", "line", 3]
    assert len(client.get("/v1/datasets").json()["items"]) == before

    ds = upload(client, jsonl(rows)).json()
    assert (ds["rows"], ds["labels"], ds["labelled"]) == (5, [], False)
    assert client.get(f"/v1/datasets/{ds['id']}").json() == ds
    labelled = upload(client, jsonl(corpus.labelled_rows(3))).json()
    assert labelled["labelled"] is True and labelled["labels"] == ["blighted", "thriving"]

    # A classifier needs labels: refused at submission, naming dataset_id; nothing stored.
    jobs = job_count(client)
    r = submit(client, "train-text-classifier", dataset_id=ds["id"], model_name="nolabels")
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"] == ["body", "input", "dataset_id"]
    assert r.json()["detail"][0]["type"] == "unlabelled_dataset"
    batch = client.post(
        "/v1/jobs:batch",
        json={
            "jobs": [{"kind": "train-text-classifier", "input": {"dataset_id": ds["id"], "model_name": "x"}}]
        },
    )
    assert batch.status_code == 422 and batch.json()["detail"][0]["loc"] == [
        "body",
        "jobs",
        0,
        "input",
        "dataset_id",
    ]
    assert job_count(client) == jobs


def test_pretraining_lowers_heldout_perplexity_and_registers_a_masked_lm(
    client: httpx.Client, pretrained: Pretrained
) -> None:
    result = pretrained.job["result"]
    metrics = result["metrics"]
    print(f"\npretrain-mlm: {metrics} in {pretrained.seconds:.0f} s, {result['steps']} steps")
    assert (result["model"], result["version"], result["task"]) == ("domain", 1, "masked-lm")
    assert metrics["perplexity_after"] < metrics["perplexity_before"] / 10
    assert result["parent"] is None and result["lineage"]["base_model"] == minilm.MODEL_NAME
    assert result["lineage"]["options"]["learning_rate"] == 5e-4
    assert (result["train_texts"], result["heldout_texts"]) == (180, 20)
    assert "artifact_dir" not in result
    progress = pretrained.job["progress"]
    assert progress["step"] == progress["total_steps"] == result["steps"] == 24
    version = client.get("/v1/models/domain").json()["versions"][0]
    assert version["task"] == "masked-lm" and version["parent"] is None
    assert version["metrics"]["perplexity_after"] == metrics["perplexity_after"]


def test_fill_mask_ranks_the_domain_word_after_pretraining(
    client: httpx.Client, pretrained: Pretrained
) -> None:
    # Jobs of one model, submitted together, share a forward pass.
    r = client.post(
        "/v1/jobs:batch",
        json={
            "jobs": [
                {"kind": "fill-mask", "input": {"model": ref, "texts": PROBES}}
                for ref in ("domain", "domain:1")
            ]
        },
    )
    assert r.status_code == 202, r.text
    done = [wait_job(client, i) for i in r.json()["ids"]]
    for job in done:
        assert job["status"] == "succeeded", job
        assert (job["result"]["model"], job["result"]["version"]) == ("domain", 1)
        assert job["model"] in ("domain", "domain:1")
        for text in job["result"]["predictions"]:
            assert len(text) == 1 and len(text[0]) == 5
            assert DOMAIN in [c["token"] for c in text[0]], text
            scores = [c["score"] for c in text[0]]
            assert scores == sorted(scores, reverse=True)


def test_fill_mask_refuses_bad_input_and_stores_nothing(client: httpx.Client, pretrained: Pretrained) -> None:
    jobs = job_count(client)
    r = submit(client, "fill-mask", model="domain", texts=["a [MASK]", "no mask here"])
    assert r.status_code == 422
    assert [e["loc"] for e in r.json()["detail"]] == [["body", "input", "texts", 1]]
    r = submit(client, "fill-mask", model=minilm.MODEL_NAME, texts=["the [MASK] grows."])
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["type"] == "IncompatibleModel"
    assert r.json()["detail"][0]["loc"] == ["body", "input", "model"]
    assert job_count(client) == jobs

    # Where the reference does not resolve at submission, the job fails with a type.
    r = submit(client, "fill-mask", model="ghost", texts=["the [MASK] grows."])
    assert r.status_code == 202
    failed = wait_job(client, r.json()["id"])
    assert failed["status"] == "failed" and failed["error"]["type"] == "ModelNotFound"


def test_a_classifier_fine_tuned_from_the_pretrained_encoder(
    client: httpx.Client, pretrained: Pretrained
) -> None:
    ds = upload(client, jsonl(corpus.labelled_rows())).json()
    assert ds["rows"] == 240
    jobs = job_count(client)
    r = submit(client, "pretrain-mlm", dataset_id=ds["id"], model_name="x", base_model="sentiment-none")
    assert r.status_code == 202  # an unregistered base passes submission (it may be registered by then)
    wait_job(client, r.json()["id"], timeout=120)
    jobs += 1
    started = time.monotonic()
    r = submit(
        client,
        "train-text-classifier",
        dataset_id=ds["id"],
        base_model="domain:1",
        epochs=3,
        batch_size=16,
        max_seq_length=32,
        learning_rate=1e-4,
        seed=0,
        model_name="crops",
    )
    assert r.status_code == 202, r.text
    job = wait_job(client, r.json()["id"], timeout=900)
    assert job["status"] == "succeeded", job
    result = job["result"]
    print(f"\nfine-tune from domain:1: {result['metrics']} in {time.monotonic() - started:.0f} s")
    assert result["parent"] == {"name": "domain", "version": 1} and result["base_model"] == "domain:1"
    assert result["metrics"]["val_accuracy"] >= MIN_ACCURACY
    version = client.get("/v1/models/crops").json()["versions"][0]
    assert (version["task"], version["parent"]) == ("text-classifier", "domain:1")

    r = client.post(
        "/v1/jobs",
        json={"kind": "classify", "input": {"model": "crops", "texts": ["the oboe fields are rotting."]}},
    )
    assert wait_job(client, r.json()["id"])["status"] == "succeeded"

    # A classifier has no masked-LM head (fill-mask), nor is it an encoder to pretrain further.
    for kind, field, extra in (
        ("fill-mask", "model", {"texts": ["the [MASK] grows."]}),
        ("pretrain-mlm", "base_model", {"dataset_id": pretrained.dataset["id"], "model_name": "y"}),
        ("train-text-classifier", "base_model", {"dataset_id": ds["id"], "model_name": "z"}),
    ):
        r = submit(client, kind, **{field: "crops", **extra})
        assert r.status_code == 422, (kind, r.text)
        assert r.json()["detail"][0]["type"] == "IncompatibleModel"
        assert r.json()["detail"][0]["loc"] == ["body", "input", field]
    assert job_count(client) == jobs + 2  # the fine-tune and the classify


def test_embed_with_a_registered_encoder(
    client: httpx.Client, service: Service, pretrained: Pretrained
) -> None:
    texts = ["the oboe harvest was good.", "rain again in the valley."]
    r = client.post("/v1/jobs", json={"kind": "embed", "input": {"model": "domain:1", "texts": texts}})
    assert r.status_code == 202, r.text
    assert r.json()["model"] == "domain:1"
    mine = wait_job(client, r.json()["id"])
    assert mine["status"] == "succeeded", mine
    assert (mine["result"]["model"], mine["result"]["version"], mine["result"]["dim"]) == ("domain", 1, 384)
    shipped = wait_job(
        client, client.post("/v1/jobs", json={"kind": "embed", "input": {"texts": texts}}).json()["id"]
    )
    assert shipped["result"]["model"] == minilm.MODEL_NAME and shipped["result"]["version"] is None
    assert shipped["model"] == minilm.MODEL_NAME
    vectors = [mine["result"]["embeddings"][0], shipped["result"]["embeddings"][0]]
    assert all(abs(sum(x * x for x in v) - 1) < 1e-4 for v in vectors)
    assert vectors[0] != vectors[1]  # another encoder

    # Another tenant's "domain" is not this one.
    with service.client(service.new_key("other-mlm-tenant")) as other:
        r = other.post("/v1/jobs", json={"kind": "embed", "input": {"model": "domain", "texts": texts}})
        failed = wait_job(other, r.json()["id"])
        assert failed["status"] == "failed" and failed["error"]["type"] == "ModelNotFound"
