"""Tenants' files at rest, through the real API and worker: a dataset, the classifier trained on it
and OpenAI batch files are sealed with the tenant's data key, so no byte of the rows is on disk;
the sealed model still predicts, and a flipped byte fails the job as DataIntegrityError."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import httpx
import openai
import pytest

from tasks.data import sample_dataset_path
from tensorq.core.crypto import MAGIC
from tests.helpers import Service, wait_job, wait_until

pytestmark = pytest.mark.integration

TEXTS = ["I love it, it works perfectly and I would buy it again.", "Terrible. It broke after one day."]


def all_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def assert_nowhere(root: Path, needles: list[bytes]) -> None:
    for p in all_files(root):
        data = p.read_bytes()
        for needle in needles:
            assert needle not in data, f"{needle!r} in plaintext in {p}"


def test_a_trained_classifier_and_its_dataset_are_sealed(client: httpx.Client, service: Service) -> None:
    canary = f"zqcanary{uuid.uuid4().hex}"
    rows = [json.loads(line) for line in sample_dataset_path().read_bytes().splitlines()]
    for i, row in enumerate(rows):
        if i % 3 == 0:
            row["text"] = f"{row['text']} {canary}"
    data = b"".join(json.dumps(row).encode() + b"\n" for row in rows)
    r = client.post("/v1/datasets", content=data, headers={"content-type": "application/x-ndjson"})
    assert r.status_code == 201, r.text
    job = client.post(
        "/v1/jobs",
        json={
            "kind": "train-text-classifier",
            "input": {
                "dataset_id": r.json()["id"],
                "epochs": 3,
                "batch_size": 16,
                "max_seq_length": 32,
                "learning_rate": 1e-4,
                "seed": 1,
                "model_name": "sealed",
            },
        },
    ).json()
    done = wait_job(client, job["id"], timeout=600)
    assert done["status"] == "succeeded", done
    version = done["result"]["version"]

    root = Path(service.env["TENSORQ_ARTIFACT_DIR"])
    registered = client.get("/v1/models/sealed").json()
    artifact = root / next(v["artifact"] for v in registered["versions"] if v["version"] == version)
    wait_until(
        lambda: [p.name for p in artifact.parent.iterdir()] == [artifact.name], timeout=30, what="cleanup"
    )
    names = {p.name for p in artifact.iterdir()}
    assert names == {"classifier.json", "config.json", "model.safetensors", "training.json"}
    dataset_file = root / "datasets" / f"{r.json()['id']}.jsonl"
    for p in [*artifact.iterdir(), dataset_file]:
        assert p.read_bytes().startswith(MAGIC), p
    # Not one row, label or config in plaintext anywhere in the store (the checkpoint included,
    # while it existed: it was written sealed, or it would have been found before its cleanup).
    first = json.dumps(rows[1]["text"]).encode()[1:-1]
    assert_nowhere(root, [canary.encode(), first, b'"negative"', b'"model_type"', b"__metadata__"])

    # (c) A flipped byte in the weights: the next classify fails as DataIntegrityError.
    weights = artifact / "model.safetensors"
    sealed = weights.read_bytes()
    tampered = bytearray(sealed)
    tampered[len(tampered) // 3] ^= 0x40
    weights.write_bytes(bytes(tampered))
    ref = f"sealed:{version}"
    r = client.post("/v1/jobs", json={"kind": "classify", "input": {"model": ref, "texts": TEXTS}})
    failed = wait_job(client, r.json()["id"])
    assert failed["status"] == "failed", failed
    assert failed["error"]["type"] == "DataIntegrityError", failed["error"]
    assert "model.safetensors" in failed["error"]["message"]
    log = service.worker.log()
    assert f"job {failed['id']}: file:{artifact.relative_to(root)}/model.safetensors" in log  # one line
    assert f"job {failed['id']}: unexpected error" not in log

    # Restored, the sealed model loads (a failed load is not cached) and predicts.
    weights.write_bytes(sealed)
    r = client.post("/v1/jobs", json={"kind": "classify", "input": {"model": ref, "texts": TEXTS}})
    ok = wait_job(client, r.json()["id"])
    assert ok["status"] == "succeeded", ok
    assert [p["label"] for p in ok["result"]["predictions"]] == ["positive", "negative"]


def batch_line(i: int, text: str) -> dict[str, object]:
    return {
        "custom_id": f"r{i}",
        "method": "POST",
        "url": "/v1/embeddings",
        "body": {"model": "all-MiniLM-L6-v2", "input": text},
    }


def test_openai_files_are_sealed_and_a_tampered_one_is_a_500(service: Service) -> None:
    canary = f"zqcanary{uuid.uuid4().hex}"
    content = b"".join(json.dumps(batch_line(i, f"{canary} text {i}")).encode() + b"\n" for i in range(5))
    root = Path(service.env["TENSORQ_ARTIFACT_DIR"])
    with openai.OpenAI(
        base_url=f"{service.base_url}/openai/v1", api_key=service.api_key, max_retries=0
    ) as oa:
        uploaded = oa.files.create(file=("sealed.jsonl", content), purpose="batch")
        assert uploaded.bytes == len(content)
        stored = root / "openai" / "files" / f"{uploaded.id}.jsonl"
        assert stored.read_bytes().startswith(MAGIC)
        assert oa.files.content(uploaded.id).content == content

        batch = oa.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h"
        )
        batch = wait_until(
            lambda: (b := oa.batches.retrieve(batch.id)).status in ("completed", "failed") and b,
            timeout=300,
            what="batch",
        )
        assert batch.status == "completed" and batch.output_file_id is not None, batch
        output = oa.files.content(batch.output_file_id).content
        assert [json.loads(line)["custom_id"] for line in output.splitlines()] == [f"r{i}" for i in range(5)]
        assert oa.files.retrieve(batch.output_file_id).bytes == len(output)
        out_file = root / "openai" / "files" / f"{batch.output_file_id}.jsonl"
        assert out_file.read_bytes().startswith(MAGIC) and b"custom_id" not in out_file.read_bytes()
        assert_nowhere(root, [canary.encode()])

        raw = bytearray(stored.read_bytes())
        raw[-5] ^= 0x01
        stored.write_bytes(bytes(raw))
        with pytest.raises(openai.InternalServerError) as exc:
            oa.files.content(uploaded.id)
        body = exc.value.body
        assert isinstance(body, dict) and "internal error" in str(body.get("message")), body
        assert canary not in str(body)
    log = service.api.log()
    line = next(li for li in log.splitlines() if f"{uploaded.id}.jsonl" in li)
    assert "failed its integrity check" in line and "Traceback" not in log.split(line)[1][:200]
