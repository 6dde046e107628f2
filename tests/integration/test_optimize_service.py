"""evaluate and optimize through the API on PostgreSQL, Redis and a real worker (issue #18).

Training is slow here: ONE tiny classifier for the module (80 sentiment rows, 1 epoch, 16 tokens),
and every optimize job is kept tiny. The resume of a killed distillation is covered by
tests/unit/test_optimize.py."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from tasks.data import sample_dataset_path
from tasks.evaluation import TrainingRecord, classifier_metrics
from tasks.optimize_jobs import evaluation_rows
from tests.conftest import Service
from tests.helpers import wait_job

pytestmark = pytest.mark.integration

ROWS = 80
MODEL = "opt-sent"
SHIPPED = "all-MiniLM-L6-v2"


def jsonl(rows: list[dict[str, Any]]) -> bytes:
    return "\n".join(json.dumps(row) for row in rows).encode() + b"\n"


def upload(client: httpx.Client, rows: list[dict[str, Any]]) -> dict[str, Any]:
    r = client.post("/v1/datasets", content=jsonl(rows), headers={"content-type": "application/x-ndjson"})
    assert r.status_code == 201, r.text
    return dict(r.json())


def submit(client: httpx.Client, kind: str, **input: Any) -> httpx.Response:
    return client.post("/v1/jobs", json={"kind": kind, "input": input})


def run_job(
    service: Service, client: httpx.Client, kind: str, timeout: float = 600, **input: Any
) -> dict[str, Any]:
    r = submit(client, kind, **input)
    assert r.status_code == 202, r.text
    job = wait_job(client, r.json()["id"], timeout=timeout)
    assert job["status"] == "succeeded", (job, service.worker.log()[-3000:])
    return dict(job)


def job_count(client: httpx.Client) -> int:
    return len(client.get("/v1/jobs", params={"limit": 200}).json()["items"])


@dataclass
class Trained:
    rows: list[dict[str, Any]]
    dataset: dict[str, Any]
    texts_dataset: dict[str, Any]
    job: dict[str, Any]


@pytest.fixture(scope="module")
def trained(service: Service) -> Trained:
    rows = [json.loads(line) for line in sample_dataset_path().read_text().splitlines()[:ROWS]]
    rows = [{"text": r["text"], "label": r["label"]} for r in rows]
    with service.client() as client:
        dataset = upload(client, rows)
        texts_dataset = upload(client, [{"text": r["text"]} for r in rows])
        started = time.monotonic()
        job = run_job(
            service,
            client,
            "train-text-classifier",
            timeout=900,
            dataset_id=dataset["id"],
            epochs=1,
            batch_size=16,
            max_seq_length=16,
            model_name=MODEL,
        )
        print(f"training: {time.monotonic() - started:.1f}s")
        return Trained(rows, dataset, texts_dataset, job)


def versions(client: httpx.Client, name: str) -> dict[int, dict[str, Any]]:
    r = client.get(f"/v1/models/{name}")
    assert r.status_code == 200, r.text
    return {v["version"]: v for v in r.json()["versions"]}


def test_evaluate_matches_metrics_computed_from_classify(
    service: Service, client: httpx.Client, trained: Trained
) -> None:
    job = run_job(
        service, client, "evaluate", model=MODEL, dataset_id=trained.dataset["id"], split="validation"
    )
    result = job["result"]
    assert result["kind"] == "classifier" and result["version"] == 1
    # The same held-out rows, labelled by the classify kind, scored here.
    # The training's own validation rows (the version carries training.json), recomputed here.
    record = TrainingRecord(dataset_id=trained.dataset["id"], seed=0, validation_split=0.2)
    chosen, info, _ = evaluation_rows(trained.rows, "validation", trained.dataset["id"], [record])
    assert result["split"]["source"] == info.source == "training-validation"
    assert result["split"]["examples"] == info.examples == len(chosen) > 0
    r = submit(client, "classify", model=f"{MODEL}:1", texts=[row["text"] for row in chosen])
    classified = wait_job(client, r.json()["id"], timeout=300)
    assert classified["status"] == "succeeded", classified
    labels = result["classifier"]["labels"]
    preds = [labels.index(p["label"]) for p in classified["result"]["predictions"]]
    expected = classifier_metrics(labels, [labels.index(row["label"]) for row in chosen], preds)
    got = result["classifier"]
    assert got["confusion_matrix"] == expected.confusion_matrix
    assert got["accuracy"] == pytest.approx(expected.accuracy)
    assert got["macro_f1"] == pytest.approx(expected.macro_f1)
    for label, m in expected.per_label.items():
        assert got["per_label"][label]["f1"] == pytest.approx(m.f1)
        assert got["per_label"][label]["precision"] == pytest.approx(m.precision)
    speed, size = result["speed"], result["size"]
    assert speed["latency_p95_ms"] >= speed["latency_p50_ms"] > 0 and speed["throughput_per_s"] > 0
    assert speed["batch_size"] == 64 and size["disk_bytes"] > 0 and size["parameters"] > 1_000_000
    # Kept on the version and listed with it.
    evaluations = versions(client, MODEL)[1]["evaluations"]
    kept = [e for e in evaluations if e["job_id"] == job["id"]]
    assert (
        len(kept) == 1 and kept[0]["dataset_id"] == trained.dataset["id"] and kept[0]["split"] == "validation"
    )
    assert kept[0]["device"] == "cpu" and kept[0]["metrics"]["classifier"]["accuracy"] == got["accuracy"]


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("quantize-int8", {"calibration_texts": 8, "max_fp32_layers": 1}),
        ("prune-ffn", {"keep_fraction": 0.5, "importance_texts": 16, "recovery_epochs": 0}),
        ("distill", {"student_layers": 2, "epochs": 1, "batch_size": 16}),
    ],
)
def test_optimize_registers_a_child_that_classifies(
    service: Service, client: httpx.Client, trained: Trained, method: str, options: dict[str, Any]
) -> None:
    started = time.monotonic()
    job = run_job(
        service,
        client,
        "optimize",
        model=f"{MODEL}:1",
        method=method,
        dataset_id=trained.dataset["id"],
        options=options,
    )
    print(f"{method}: {time.monotonic() - started:.1f}s")
    result = job["result"]
    assert result["task"] == "text-classifier" and result["parent"] == {"name": MODEL, "version": 1}
    version = versions(client, MODEL)[result["version"]]
    assert version["task"] == "text-classifier" and version["parent"] == f"{MODEL}:1"
    lineage = version["lineage"]
    assert lineage["method"] == method and lineage["parent"] == {"name": MODEL, "version": 1}
    assert all(lineage["options"][k] == v for k, v in options.items())
    comparison = lineage["comparison"]
    assert comparison["parent"]["version"] == 1 and comparison["child"]["classifier"] is not None
    assert "accuracy_delta_points" in comparison["ratios"] and comparison["ratios"]["parameters"] is not None
    if method == "quantize-int8":
        assert comparison["ratios"]["memory_bytes"] < 0.7
    if method != "quantize-int8":
        assert comparison["ratios"]["parameters"] < 1
    assert version["labels"] == versions(client, MODEL)[1]["labels"]

    texts = ["a wonderful film", "dull and far too long"]
    classified = run_job(service, client, "classify", model=f"{MODEL}:{result['version']}", texts=texts)
    predictions = classified["result"]["predictions"]
    assert len(predictions) == 2
    for p in predictions:
        assert p["label"] in version["labels"] and sum(p["scores"].values()) == pytest.approx(1, abs=1e-4)


def test_int8_embedder_embeds_and_evaluates(service: Service, client: httpx.Client, trained: Trained) -> None:
    job = run_job(
        service,
        client,
        "optimize",
        model=SHIPPED,
        method="quantize-int8",
        dataset_id=trained.texts_dataset["id"],
        options={"calibration_texts": 16, "max_fp32_layers": 1},
        model_name="mini-int8",
    )
    result = job["result"]
    assert result["task"] == "embedder" and result["kind"] == "embedder"
    assert result["comparison"]["ratios"]["mean_cosine"] > 0.9
    version = versions(client, "mini-int8")[result["version"]]
    assert version["task"] == "embedder" and version["lineage"]["parent"]["name"] == SHIPPED
    embedded = run_job(service, client, "embed", model="mini-int8", texts=["hello there", "a second text"])
    vectors = embedded["result"]["embeddings"]
    assert embedded["result"]["dim"] == 384 and [len(v) for v in vectors] == [384, 384]
    assert sum(x * x for x in vectors[0]) == pytest.approx(1, abs=1e-3)
    evaluated = run_job(
        service, client, "evaluate", model="mini-int8", dataset_id=trained.texts_dataset["id"]
    )
    assert evaluated["result"]["cosine_to_parent"]["mean_cosine"] > 0.9
    assert versions(client, "mini-int8")[result["version"]]["evaluations"][-1]["job_id"] == evaluated["id"]


def test_bad_inputs_are_422_and_store_nothing(
    service: Service, client: httpx.Client, trained: Trained
) -> None:
    labelled, texts = trained.dataset["id"], trained.texts_dataset["id"]
    before = job_count(client)
    other = service.client(service.new_key("optimize-other"))
    cases: list[tuple[httpx.Client, str, dict[str, Any], str]] = [
        (client, "optimize", {"model": MODEL, "method": "shrink", "dataset_id": labelled}, "method"),
        (
            client,
            "optimize",
            {
                "model": MODEL,
                "method": "prune-ffn",
                "dataset_id": labelled,
                "options": {"keep_fraction": 1.5},
            },
            "keep_fraction",
        ),
        (
            client,
            "optimize",
            {
                "model": MODEL,
                "method": "quantize-int8",
                "dataset_id": labelled,
                "options": {"no_such_option": 1},
            },
            "no_such_option",
        ),
        (client, "optimize", {"model": MODEL, "method": "distill", "dataset_id": texts}, "dataset_id"),
        (client, "evaluate", {"model": MODEL, "dataset_id": texts}, "dataset_id"),
        (client, "optimize", {"model": f"{MODEL}:99", "method": "distill", "dataset_id": labelled}, "model"),
        (client, "evaluate", {"model": "no-such-model", "dataset_id": labelled}, "model"),
        (
            client,
            "optimize",
            {"model": SHIPPED, "method": "quantize-int8", "dataset_id": texts},
            "model_name",
        ),
    ]
    with other:
        other_dataset = upload(other, [{"text": r["text"], "label": r["label"]} for r in trained.rows[:10]])
        cases.append(
            (
                other,
                "optimize",
                {"model": MODEL, "method": "quantize-int8", "dataset_id": other_dataset["id"]},
                "model",
            )
        )
        other_before = job_count(other)
        for c, kind, input, field in cases:
            r = c.post("/v1/jobs", json={"kind": kind, "input": input})
            assert r.status_code == 422, (input, r.text)
            locs = [e["loc"] for e in r.json()["detail"]]
            assert any(field in loc for loc in locs), (input, locs)
        assert job_count(other) == other_before
    assert job_count(client) == before
