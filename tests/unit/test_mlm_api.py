"""The API side of issue #19 on SQLite, without a worker: text-only datasets, IncompatibleModel at
submission, the new kinds' schemas. (The service end to end: tests/integration/test_mlm_service.py.)"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from db.models import MASKED_LM, TEXT_CLASSIFIER
from db.registry import register_version
from db.session import session_scope
from tasks import minilm
from tasks.datasets import DatasetError, parse_jsonl
from tasks.embed import EmbedParams
from tasks.registry import all_kinds
from tensorq.core.settings import Settings
from tests.helpers import create_api_key
from tests.unit.test_api_input import job_count


@pytest.fixture
def api(sqlite_url: str, tmp_path: Path) -> Iterator[TestClient]:
    settings = Settings(
        database_url=sqlite_url, redis_url="redis://127.0.0.1:1/0", artifact_dir=tmp_path / "a"
    )
    key = create_api_key(sqlite_url, "unit")
    with TestClient(
        create_app(settings, run_background=False),
        raise_server_exceptions=False,
        headers={"Authorization": f"Bearer {key}"},
    ) as client:
        client.sqlite_url = sqlite_url  # type: ignore[attr-defined]
        yield client


def lines(*rows: dict[str, str]) -> bytes:
    return "\n".join(json.dumps(r) for r in rows).encode()


def test_parse_jsonl_takes_labelled_or_text_only_rows_but_not_a_mix() -> None:
    text_only = parse_jsonl(lines({"text": "a"}, {"text": "b"}), max_rows=10)
    assert (text_only.labelled, text_only.labels, text_only.rows) == (
        False,
        [],
        [{"text": "a"}, {"text": "b"}],
    )
    labelled = parse_jsonl(lines({"text": "a", "label": "x"}, {"text": "b", "label": "y"}), max_rows=10)
    assert labelled.labelled and labelled.labels == ["x", "y"]
    for rows, line in (
        (({"text": "a"}, {"text": "b"}, {"text": "c", "label": "x"}), 3),
        (({"text": "a", "label": "x"}, {"text": "b"}), 2),
        (({"text": "a"}, {"text": "b", "label": None}), 2),  # a null label is a bad label, not none
        (({"text": "a"}, {"text": ""}), 2),
    ):
        with pytest.raises(DatasetError) as err:
            parse_jsonl(lines(*rows), max_rows=10)
        assert err.value.line == line
    one_text = parse_jsonl(lines({"text": "just one"}), max_rows=10)  # no label count to meet
    assert one_text.rows == [{"text": "just one"}]


def test_the_new_kinds_are_registered() -> None:
    kinds = all_kinds()
    assert {"pretrain-mlm", "fill-mask"} <= set(kinds)
    assert kinds["pretrain-mlm"].registers_model and kinds["pretrain-mlm"].category == "training"
    fill = kinds["fill-mask"]
    assert fill.run_batch is not None and fill.reads_tenant_data and fill.category == "inference"
    assert kinds["embed"].reads_tenant_data  # registered encoders are a tenant's
    assert EmbedParams(texts=["x"]).model == minilm.MODEL_NAME


def register(url: str, name: str, task: str) -> None:
    with session_scope(url) as session:
        register_version(
            session,
            tenant="unit",
            name=name,
            artifact_path=f"models/{name}",
            labels=[],
            metrics={},
            job_id=None,
            task=task,
        )


def test_incompatible_models_are_422_where_the_reference_resolves(api: TestClient) -> None:
    url = api.sqlite_url  # type: ignore[attr-defined]
    register(url, "sentiment", TEXT_CLASSIFIER)
    register(url, "domain", MASKED_LM)
    cases = [
        ("fill-mask", {"model": "sentiment", "texts": ["a [MASK]"]}, "model"),
        ("fill-mask", {"model": "sentiment@nope", "texts": ["a [MASK]"]}, None),  # does not resolve
        ("fill-mask", {"model": minilm.MODEL_NAME, "texts": ["a [MASK]"]}, "model"),
        ("fill-mask", {"model": "domain:1", "texts": ["a [MASK]"]}, None),
        ("pretrain-mlm", {"dataset_id": "x", "model_name": "m", "base_model": "sentiment"}, "base_model"),
        (
            "train-text-classifier",
            {
                "data": [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}],
                "model_name": "m",
                "base_model": "sentiment:1",
            },
            "base_model",
        ),
        (
            "train-text-classifier",
            {
                "data": [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}],
                "model_name": "m",
                "base_model": "domain",
            },
            None,
        ),
    ]
    for kind, input, field in cases:
        r = api.post("/v1/jobs", json={"kind": kind, "input": input})
        errors = r.json().get("detail") if r.status_code == 422 else []
        incompatible = [e["loc"] for e in errors or [] if e["type"] == "IncompatibleModel"]
        assert incompatible == ([] if field is None else [["body", "input", field]]), (kind, input, r.text)
    assert job_count(url) == sum(field is None for _, _, field in cases)  # the refused stored nothing


def test_fill_mask_without_a_mask_is_422_at_its_index(api: TestClient) -> None:
    r = api.post(
        "/v1/jobs", json={"kind": "fill-mask", "input": {"model": "m", "texts": ["a [MASK]", "b", "c"]}}
    )
    assert r.status_code == 422
    assert [e["loc"] for e in r.json()["detail"]] == [
        ["body", "input", "texts", 1],
        ["body", "input", "texts", 2],
    ]


def test_a_text_only_dataset_cannot_train_a_classifier(api: TestClient) -> None:
    r = api.post("/v1/datasets", content=lines({"text": "a"}, {"text": "b"}))
    assert r.status_code == 201 and r.json()["labelled"] is False, r.text
    dataset_id = r.json()["id"]
    r = api.post(
        "/v1/jobs",
        json={"kind": "train-text-classifier", "input": {"dataset_id": dataset_id, "model_name": "m"}},
    )
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["body", "input", "dataset_id"]
    assert r.json()["detail"][0]["type"] == "unlabelled_dataset"
    assert job_count(api.sqlite_url) == 0  # type: ignore[attr-defined]
    r = api.post("/v1/datasets", content=lines({"text": "a"}, {"text": "b", "label": "x"}))
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "line", 2]
    assert uuid.UUID(dataset_id)
