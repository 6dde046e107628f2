"""The API side of issue #18 on SQLite, without a worker: the evaluate and optimize kinds, their
422s at submission (storing nothing), and versions listed with lineage and evaluations.
(The service end to end: tests/integration/test_optimize_service.py.)"""

from __future__ import annotations

import json
from typing import Any

from fastapi.testclient import TestClient

from db.models import EMBEDDER, MASKED_LM, TEXT_CLASSIFIER
from db.registry import find_version, record_evaluation, register_version
from db.session import session_scope
from tasks import minilm
from tasks.registry import all_kinds
from tests.unit.test_api_input import job_count
from tests.unit.test_mlm_api import api  # noqa: F401  (the fixture)


def register(url: str, name: str, task: str, **extra: Any) -> None:
    with session_scope(url) as session:
        register_version(
            session,
            tenant="unit",
            name=name,
            artifact_path=f"models/{name}",
            labels=["a", "b"],
            metrics={},
            job_id=None,
            task=task,
            **extra,
        )


def upload(client: TestClient, *rows: dict[str, str]) -> str:
    r = client.post("/v1/datasets", content="\n".join(json.dumps(r) for r in rows).encode() + b"\n")
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def test_the_kinds_are_registered() -> None:
    kinds = all_kinds()
    evaluate, optimize = kinds["evaluate"], kinds["optimize"]
    assert evaluate.records_evaluation and not evaluate.registers_model
    assert optimize.registers_model and optimize.category == "training"
    for kind in (evaluate, optimize):
        assert dict(kind.model_tasks) == {"model": (TEXT_CLASSIFIER, EMBEDDER)}
        assert kind.model_must_exist and kind.needs_labels_for_tasks == (TEXT_CLASSIFIER,)


def test_bad_input_is_422_at_the_field_and_stores_nothing(api: TestClient) -> None:  # noqa: F811
    url = api.sqlite_url  # type: ignore[attr-defined]
    register(url, "sentiment", TEXT_CLASSIFIER)
    register(url, "domain", MASKED_LM)
    labelled = upload(api, {"text": "a", "label": "a"}, {"text": "b", "label": "b"})
    texts = upload(api, {"text": "a"}, {"text": "b"})
    opt = {"model": "sentiment", "dataset_id": labelled}
    cases: list[tuple[str, dict[str, Any], list[Any]]] = [
        ("optimize", {**opt, "method": "shrink"}, ["body", "input", "method"]),
        (
            "optimize",
            {**opt, "method": "prune-ffn", "options": {"keep_fraction": 1.0}},
            ["body", "input", "options", "prune-ffn", "keep_fraction"],
        ),
        (
            "optimize",
            {**opt, "method": "distill", "options": {"epochs": 0}},
            ["body", "input", "options", "distill", "epochs"],
        ),
        (
            "optimize",
            {**opt, "method": "quantize-int8", "options": {"bogus": 1}},
            ["body", "input", "options", "quantize-int8", "bogus"],
        ),
        ("optimize", {**opt, "method": "distill", "dataset_id": texts}, ["body", "input", "dataset_id"]),
        ("evaluate", {**opt, "dataset_id": texts}, ["body", "input", "dataset_id"]),
        ("optimize", {**opt, "model": "sentiment:2", "method": "distill"}, ["body", "input", "model"]),
        ("evaluate", {**opt, "model": "missing"}, ["body", "input", "model"]),
        ("evaluate", {**opt, "model": "domain"}, ["body", "input", "model"]),  # masked-lm
        (
            "optimize",
            {**opt, "model": minilm.MODEL_NAME, "method": "quantize-int8"},
            ["body", "input", "model_name"],
        ),
    ]
    for kind, input, loc in cases:
        r = api.post("/v1/jobs", json={"kind": kind, "input": input})
        assert r.status_code == 422, (input, r.text)
        assert loc in [e["loc"] for e in r.json()["detail"]], (input, r.text)
    assert job_count(url) == 0
    # Good ones are accepted: an embedder may take a text-only dataset.
    for kind, input in [
        ("optimize", {**opt, "method": "quantize-int8"}),
        ("evaluate", {"model": minilm.MODEL_NAME, "dataset_id": texts}),
        (
            "optimize",
            {"model": minilm.MODEL_NAME, "method": "distill", "dataset_id": texts, "model_name": "small"},
        ),
    ]:
        r = api.post("/v1/jobs", json={"kind": kind, "input": input})
        assert r.status_code == 202, (input, r.text)
    assert job_count(url) == 3


def test_versions_show_lineage_and_evaluations(api: TestClient) -> None:  # noqa: F811
    url = api.sqlite_url  # type: ignore[attr-defined]
    register(url, "sentiment", TEXT_CLASSIFIER)
    register(url, "sentiment", TEXT_CLASSIFIER, parent=("sentiment", 1), lineage={"method": "prune-ffn"})
    with session_scope(url) as session:
        version = find_version(session, "unit", "sentiment", 1)
        assert version is not None
        record_evaluation(
            session, version, dataset_id="d", split="validation", metrics={"x": 1}, device="cpu", job_id=None
        )
    r = api.get("/v1/models/sentiment")
    assert r.status_code == 200, r.text
    v1, v2 = r.json()["versions"]
    assert [(e["dataset_id"], e["split"], e["metrics"], e["device"]) for e in v1["evaluations"]] == [
        ("d", "validation", {"x": 1}, "cpu")
    ]
    assert (
        v2["parent"] == "sentiment:1" and v2["lineage"] == {"method": "prune-ffn"} and v2["evaluations"] == []
    )


def test_a_method_that_is_not_a_string_is_a_422_not_a_500(api: TestClient) -> None:  # noqa: F811
    """Found by schemathesis: a list or an object as `method` made the options validator raise
    TypeError (unhashable), a 500."""
    for method in (["int8"], {"a": 1}):
        body = {"model": minilm.MODEL_NAME, "method": method, "dataset_id": "d", "model_name": "x"}
        r = api.post("/v1/jobs", json={"kind": "optimize", "input": body})
        assert r.status_code == 422, r.text
        assert ["body", "input", "method"] in [e["loc"][:3] for e in r.json()["detail"]], r.text
    assert job_count(api.sqlite_url) == 0  # type: ignore[attr-defined]
