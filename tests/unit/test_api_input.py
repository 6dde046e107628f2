"""Bad input: a clear 4xx naming the field, and nothing stored or enqueued."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from api.app import create_app
from db.keys import tenant_cipher
from db.models import Dataset, Job
from db.registry import create_dataset
from db.session import get_sessionmaker, session_scope
from tasks.texts import MAX_TEXTS
from tensorq.core.artifacts import ArtifactStore
from tensorq.core.crypto import is_sealed
from tensorq.core.sealed_files import SealedFiles
from tensorq.core.settings import Settings
from tests.helpers import create_api_key


@pytest.fixture
def api(sqlite_url: str, tmp_path: Path) -> Iterator[TestClient]:
    # An unreachable broker: no valid path below may depend on it, and nothing invalid reaches it.
    settings = Settings(
        database_url=sqlite_url,
        redis_url="redis://127.0.0.1:1/0",
        max_body_bytes=64 * 1024,
        artifact_dir=tmp_path / "artifacts",
    )
    app = create_app(settings, run_background=False)
    key = create_api_key(sqlite_url, "unit")
    with TestClient(app, raise_server_exceptions=False, headers={"Authorization": f"Bearer {key}"}) as client:
        client.sqlite_url = sqlite_url  # type: ignore[attr-defined]
        client.artifact_dir = tmp_path / "artifacts"  # type: ignore[attr-defined]
        yield client


def job_count(url: str) -> int:
    with get_sessionmaker(url)() as s:
        return s.scalar(select(func.count()).select_from(Job)) or 0


def dataset_count(url: str) -> int:
    with get_sessionmaker(url)() as s:
        return s.scalar(select(func.count()).select_from(Dataset)) or 0


def stored_files(api: TestClient) -> list[Path]:
    root: Path = api.artifact_dir  # type: ignore[attr-defined]
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def opened(api: TestClient, path: Path) -> bytes:
    """A stored dataset file's content: sealed with its tenant's data key, opened."""
    url: str = api.sqlite_url  # type: ignore[attr-defined]
    with get_sessionmaker(url)() as s:
        tenant = s.scalars(select(Dataset.tenant)).first()
    assert tenant is not None and is_sealed(path.read_bytes())
    return SealedFiles(ArtifactStore(api.artifact_dir), tenant_cipher(url, tenant)).read(path)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ({"kind": "nope", "input": {"texts": ["a"]}}, ["body", "kind"]),
        ({"input": {"texts": ["a"]}}, ["body", "kind"]),
        ({"kind": "embed", "input": {"texts": "a"}}, ["body", "input", "texts"]),
        ({"kind": "embed", "input": {"texts": [1]}}, ["body", "input", "texts", 0]),
        ({"kind": "embed", "input": {"texts": []}}, ["body", "input", "texts"]),
        ({"kind": "embed", "input": {"texts": ["a"] * (MAX_TEXTS + 1)}}, ["body", "input", "texts"]),
        ({"kind": "embed", "input": {"texts": ["a"], "color": "red"}}, ["body", "input", "color"]),
        ({"kind": "embed", "input": {"texts": ["a"]}, "priority_typo": 1}, ["body", "priority_typo"]),
        ({"kind": "embed"}, ["body", "input"]),
    ],
)
def test_invalid_job_is_422_naming_the_field_and_stores_nothing(
    api: TestClient, body: dict[str, object], loc: list[object]
) -> None:
    r = api.post("/v1/jobs", json=body)
    assert r.status_code == 422, r.text
    assert r.headers["content-type"] == "application/json"
    locs = [e["loc"] for e in r.json()["detail"]]
    assert loc in locs, locs
    assert job_count(api.sqlite_url) == 0  # type: ignore[attr-defined]


def test_malformed_json_is_422(api: TestClient) -> None:
    r = api.post(
        "/v1/jobs", content=b'{"kind": "embed", "input": ', headers={"content-type": "application/json"}
    )
    assert r.status_code == 422 and r.json()["detail"]


def test_oversized_body_is_413_json(api: TestClient) -> None:
    body = {"kind": "embed", "input": {"texts": ["x" * 8000] * 10}}
    r = api.post("/v1/jobs", json=body)
    assert r.status_code == 413
    assert "larger than" in r.json()["detail"]
    # Without Content-Length (chunked) the limit holds too.
    r = api.post(
        "/v1/jobs", content=iter([b"{" + b" " * 70_000 + b"}"]), headers={"content-type": "application/json"}
    )
    assert r.status_code == 413
    assert job_count(api.sqlite_url) == 0  # type: ignore[attr-defined]


def test_unknown_job_is_404_and_bad_id_422(api: TestClient) -> None:
    assert api.get("/v1/jobs/00000000-0000-0000-0000-000000000000").status_code == 404
    assert api.get("/v1/jobs/xyz").status_code == 422
    assert api.get("/v1/jobs", params={"cursor": "garbage"}).json()["detail"][0]["loc"] == ["query", "cursor"]
    assert api.get("/v1/jobs", params={"status": "bogus"}).status_code == 422
    assert api.get("/v1/jobs", params={"limit": 100000}).status_code == 422


def test_broker_down_still_accepts_and_keeps_the_job_for_the_sweeper(api: TestClient) -> None:
    r = api.post("/v1/jobs", json={"kind": "embed", "input": {"texts": ["kept"]}})
    assert r.status_code == 202
    assert r.headers["location"] == f"/v1/jobs/{r.json()['id']}"
    assert api.get(r.headers["location"]).json()["status"] == "queued"
    ready = api.get("/readyz")
    assert ready.status_code == 503 and ready.json()["checks"]["redis"].startswith("error")
    assert ready.json()["checks"]["database"] == "ok"


def test_cancelling_a_job_twice_is_409_the_second_time(api: TestClient) -> None:
    job = api.post("/v1/jobs", json={"kind": "embed", "input": {"texts": ["queued"]}}).json()
    first = api.post(f"/v1/jobs/{job['id']}/cancel")
    assert first.status_code == 200 and first.json()["status"] == "cancelled"
    again = api.post(f"/v1/jobs/{job['id']}/cancel")
    assert again.status_code == 409 and again.json() == {"detail": "job already cancelled"}
    assert api.get(f"/v1/jobs/{job['id']}").json() == first.json()


def test_while_the_broker_is_down_submissions_do_not_each_wait_for_it(api: TestClient) -> None:
    # kombu retried every publish for seconds; after one failure the publisher now stops trying
    # for a moment, and the jobs wait for the sweeper instead.
    publisher = api.app.state.publisher  # type: ignore[attr-defined]
    attempts = []
    real = publisher.app.send_task

    def counted(*args: object, **kwargs: object) -> object:
        attempts.append(1)
        return real(*args, **kwargs)

    publisher.app.send_task = counted
    first = api.post("/v1/jobs", json={"kind": "embed", "input": {"texts": ["a"]}})
    second = api.post("/v1/jobs", json={"kind": "embed", "input": {"texts": ["b"]}})
    assert (first.status_code, second.status_code) == (202, 202)
    assert len(attempts) == 1  # the second did not try the dead broker again
    publisher._down_until = 0.0  # the moment has passed: the next one tries again
    assert api.post("/v1/jobs", json={"kind": "embed", "input": {"texts": ["c"]}}).status_code == 202
    assert len(attempts) == 2
    for r in (first, second):
        assert api.get(r.headers["location"]).json()["status"] == "queued"  # kept for the sweeper


def test_openapi_documents_every_route_with_models(api: TestClient) -> None:
    doc = api.get("/openapi.json").json()
    schemas = doc["components"]["schemas"]
    assert {"JobOut", "JobList", "EmbedJobCreate", "EmbedParams", "Health", "ErrorOut"} <= set(schemas)
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            ok = [c for c in op["responses"] if c.startswith("2")]
            assert ok, (method, path)
            content = op["responses"][ok[0]].get("content", {})
            if set(content) == {"text/event-stream"}:
                continue  # a stream of JobOut objects, described in words
            assert "$ref" in str(content), (method, path, "has no response model")
    post = doc["paths"]["/v1/jobs"]["post"]
    assert "EmbedJobCreate" in str(post["requestBody"])
    assert {"202", "413", "422"} <= set(post["responses"])


def test_batch_error_names_the_item_index_and_stores_nothing(api: TestClient) -> None:
    good = {"kind": "embed", "input": {"texts": ["fine"]}}
    r = api.post("/v1/jobs:batch", json={"jobs": [good, good, {"kind": "embed", "input": {"texts": []}}]})
    assert r.status_code == 422
    assert [e["loc"] for e in r.json()["detail"]] == [["body", "jobs", 2, "input", "texts"]]
    r = api.post("/v1/jobs:batch", json={"jobs": [good, {"kind": "nope", "input": {}}]})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "jobs", 1, "kind"]
    assert job_count(api.sqlite_url) == 0  # type: ignore[attr-defined]


def add_dataset(url: str, tenant: str) -> str:
    """A stored dataset row (the check at submission reads no file)."""
    dataset_id = uuid.uuid4()
    with session_scope(url) as session:
        create_dataset(
            session,
            tenant=tenant,
            dataset_id=dataset_id,
            name=None,
            path=f"datasets/{dataset_id}.jsonl",
            rows=2,
            labels=["a", "b"],
            sha256="0" * 64,
            size_bytes=10,
        )
    return str(dataset_id)


def train_on(dataset_id: str) -> dict[str, object]:
    return {"kind": "train-text-classifier", "input": {"dataset_id": dataset_id, "model_name": "m"}}


def test_training_on_a_dataset_the_tenant_lacks_is_422_and_stores_nothing(api: TestClient) -> None:
    url = api.sqlite_url  # type: ignore[attr-defined]
    mine, theirs = add_dataset(url, "unit"), add_dataset(url, "other")
    # Missing, another tenant's, not even an id: the same answer, naming the field.
    for dataset_id in (str(uuid.uuid4()), theirs, "reviews-2024"):
        r = api.post("/v1/jobs", json=train_on(dataset_id))
        assert r.status_code == 422, r.text
        assert r.json()["detail"] == [
            {
                "loc": ["body", "input", "dataset_id"],
                "msg": "no such dataset",
                "type": "not_found",
                "input": dataset_id,
            }
        ]
    waited = api.post("/v1/jobs", json=train_on(theirs), headers={"Prefer": "wait=1"})
    assert waited.status_code == 422 and waited.json()["detail"][0]["loc"] == ["body", "input", "dataset_id"]
    r = api.post("/v1/jobs:batch", json={"jobs": [train_on(mine), train_on(theirs)]})
    assert r.status_code == 422
    assert [e["loc"] for e in r.json()["detail"]] == [["body", "jobs", 1, "input", "dataset_id"]]
    assert job_count(url) == 0
    assert api.post("/v1/jobs", json=train_on(mine)).status_code == 202
    assert api.post("/v1/jobs:batch", json={"jobs": [train_on(mine)] * 2}).status_code == 202
    assert job_count(url) == 3


def test_batch_size_limits(api: TestClient) -> None:
    assert api.post("/v1/jobs:batch", json={"jobs": []}).status_code == 422
    tiny = {"kind": "embed", "input": {"texts": ["a"]}}
    r = api.post("/v1/jobs:batch", json={"jobs": [tiny] * 1001})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "jobs"]
    assert job_count(api.sqlite_url) == 0  # type: ignore[attr-defined]


def test_batch_submission_returns_ids_in_order(api: TestClient) -> None:
    jobs = [{"kind": "embed", "input": {"texts": [f"text {i}"]}} for i in range(5)]
    r = api.post("/v1/jobs:batch", json={"jobs": jobs})
    assert r.status_code == 202, r.text
    ids = r.json()["ids"]
    assert [api.get(f"/v1/jobs/{i}").json()["input"]["texts"][0] for i in ids] == [
        f"text {i}" for i in range(5)
    ]


@pytest.mark.parametrize(
    "raw",
    [
        b'{"kind": "embed", "input": {"texts": ' + b"[" * 100_000 + b"]" * 100_000 + b"}}",
        b'{"kind": "embed", "input": {"texts": ["\xff\xfe bad utf-8"]}}',
        b'{"kind": "train-text-classifier", "input": {"data": [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}],'
        b' "model_name": "m", "learning_rate": NaN}}',
        b'{"kind": "train-text-classifier", "input": {"data": [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}],'
        b' "model_name": "m", "validation_split": Infinity}}',
        b'{"kind": "embed", "input": {"texts": ["a"]}, "extra": -Infinity}',
        b"\x00\x01\x02",
    ],
    ids=["deeply-nested", "invalid-utf8", "nan", "infinity", "unknown-field-infinity", "binary"],
)
def test_hostile_bodies_are_4xx_json_and_store_nothing(api: TestClient, raw: bytes) -> None:
    r = api.post("/v1/jobs", content=raw, headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    assert r.headers["content-type"] == "application/json" and "detail" in r.json()
    assert job_count(api.sqlite_url) == 0  # type: ignore[attr-defined]


def test_jobs_submitted_together_go_out_in_as_few_messages_as_one_batch_would_take() -> None:
    from api.routes.jobs import message_groups

    def job(
        kind: str, texts: int = 1, tenant: str = "a", model: str | None = "m", queue: str = "inference"
    ) -> Job:
        params: dict[str, object] = {"texts": ["x"] * texts}
        if kind == "classify":
            params["model"] = model or ""
        if kind == "train-text-classifier":
            params = {"dataset": str(uuid.uuid4()), "model": "clf"}
        return Job(id=uuid.uuid4(), kind=kind, tenant=tenant, model=model, queue=queue, params=params)

    embeds = [job("embed") for _ in range(5)]
    other_tenant, gpu = job("embed", tenant="b"), job("embed", queue="gpu.inference")
    big = [job("embed", texts=30), job("embed", texts=30), job("embed", texts=30)]
    classify = [job("classify", model="sentiment:1"), job("classify", model="spam:2")]
    train = [job("train-text-classifier", model="clf"), job("train-text-classifier", model="clf")]
    jobs = [*embeds[:3], other_tenant, *embeds[3:], gpu, *big, *classify, *train]
    messages = message_groups(jobs, max_texts=64)
    named = [(task, [uuid.UUID(i) for i in ids], queue) for task, ids, queue in messages]
    assert named == [
        ("tensorq.embed", [j.id for j in [*embeds, big[0]]], "inference"),  # 5 + 30 texts <= 64
        ("tensorq.embed", [other_tenant.id], "inference"),  # another tenant's jobs never share a message
        ("tensorq.embed", [gpu.id], "gpu.inference"),  # nor another queue's
        ("tensorq.embed", [big[1].id, big[2].id], "inference"),  # 35 + 30 > 64 starts a new one
        ("tensorq.classify", [classify[0].id], "inference"),
        ("tensorq.classify", [classify[1].id], "inference"),  # another model
        ("tensorq.train_text_classifier", [train[0].id], "inference"),  # no batching: one each
        ("tensorq.train_text_classifier", [train[1].id], "inference"),
    ]
    # Everything in exactly one message, in submission order within each message.
    assert sorted(i for _, ids, _ in named for i in ids) == sorted(j.id for j in jobs)
    # Batching off (group size 1): one message per job, as before.
    assert [ids for _, ids, _ in message_groups(jobs, max_texts=1)] == [[str(j.id)] for j in jobs]


def post_raw(api: TestClient, raw: bytes, loc: list[object]) -> list[dict[str, object]]:
    """POST `raw` alone and inside a batch; both must be 422 JSON naming `loc`. Returns the errors."""
    errors: list[dict[str, object]] = []
    for path, sent, where in (
        ("/v1/jobs", raw, loc),
        ("/v1/jobs:batch", b'{"jobs": [' + raw + b"]}", ["body", "jobs", 0, *loc[1:]]),
    ):
        r = api.post(path, content=sent, headers={"content-type": "application/json"})
        assert r.status_code == 422, (path, r.status_code, r.text[:300])
        assert r.headers["content-type"] == "application/json"
        r.content.decode("utf-8")  # strict: the answer itself is valid UTF-8
        found = [e for e in r.json()["detail"] if e["loc"] == where]
        assert found, (where, r.json()["detail"])
        errors += found
    assert job_count(api.sqlite_url) == 0  # type: ignore[attr-defined]
    return errors


# Raw bodies: a JSON escape is how a client sends NUL or a lone surrogate (`json=` would refuse to
# encode the surrogate on our side of the wire).
@pytest.mark.parametrize(
    ("raw", "loc"),
    [
        (rb'{"kind": "emb\ud800ed", "input": {"texts": ["a"]}}', ["body", "kind"]),
        (rb'{"kind": "classify", "input": {"model": "m\ud800", "texts": ["a"]}}', ["body", "input", "model"]),
        (
            rb'{"kind": "embed", "input": {"texts": ["a"]}, "webhook": "https://h\ud800.example/"}',
            ["body", "webhook"],
        ),
        (
            rb'{"kind": "embed", "input": {"texts": ["a"]}, "webhook": "https://h.example/\ud800"}',
            ["body", "webhook"],
        ),
        # pydantic cannot read such a field name, so `loc` is its object and `input` the name.
        (rb'{"kind": "embed", "input": {"texts": ["a"]}, "x\ud800": 1}', ["body"]),
        (rb'{"kind": "embed", "input": {"texts": ["a"], "\udfff": 1}}', ["body", "input"]),
    ],
    ids=["kind", "model-ref", "webhook-host", "webhook-path", "field-name", "input-field-name"],
)
def test_a_lone_surrogate_echoed_in_the_error_still_gets_a_422(
    api: TestClient, raw: bytes, loc: list[object]
) -> None:
    errors = post_raw(api, raw, loc)
    # The offending value is still echoed, with what UTF-8 cannot encode as U+FFFD.
    assert all("\ufffd" in str(e["input"]) for e in errors), errors


def test_a_lone_surrogate_named_in_a_dataset_error_still_gets_a_422(api: TestClient) -> None:
    raw = b'{"text": "a", "label": "x"}\n{"text": "b", "label": "y", "n\\ud800": 1}\n'
    r = api.post("/v1/datasets", content=raw, headers={"content-type": "application/x-ndjson"})
    assert r.status_code == 422, r.text[:300]
    [error] = r.json()["detail"]
    assert error["loc"] == ["body", "line", 2] and "n\ufffd" in error["msg"]
    assert dataset_count(api.sqlite_url) == 0 and stored_files(api) == []  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("raw", "loc", "why"),
    [
        (rb'{"kind": "embed", "input": {"texts": ["ok", "a\u0000b"]}}', ["body", "input", "texts", 1], "NUL"),
        (
            rb'{"kind": "classify", "input": {"model": "m", "texts": ["\u0000"]}}',
            ["body", "input", "texts", 0],
            "NUL",
        ),
        (
            rb'{"kind": "train-text-classifier", "input": {"model_name": "m", "data": [{"text": "a\u0000",'
            rb' "label": "x"}, {"text": "b", "label": "y"}]}}',
            ["body", "input", "data", 0, "text"],
            "NUL",
        ),
        (
            rb'{"kind": "train-text-classifier", "input": {"model_name": "m", "data": [{"text": "a",'
            rb' "label": "x"}, {"text": "b", "label": "y\u0000"}]}}',
            ["body", "input", "data", 1, "label"],
            "NUL",
        ),
        (rb'{"kind": "embed", "input": {"texts": ["a\ud800b"]}}', ["body", "input", "texts", 0], "surrogate"),
        (
            rb'{"kind": "classify", "input": {"model": "m", "texts": ["\udc00"]}}',
            ["body", "input", "texts", 0],
            "surrogate",
        ),
        (
            rb'{"kind": "train-text-classifier", "input": {"model_name": "m", "data": [{"text": "\ud83d",'
            rb' "label": "x"}, {"text": "b", "label": "y"}]}}',
            ["body", "input", "data", 0, "text"],
            "surrogate",
        ),
        (
            rb'{"kind": "train-text-classifier", "input": {"model_name": "m", "data": [{"text": "a",'
            rb' "label": "x\udfff"}, {"text": "b", "label": "y"}]}}',
            ["body", "input", "data", 0, "label"],
            "surrogate",
        ),
    ],
    ids=[
        "nul-embed",
        "nul-classify",
        "nul-train-text",
        "nul-train-label",
        "surrogate-embed",
        "surrogate-classify",
        "surrogate-train-text",
        "surrogate-train-label",
    ],
)
def test_text_the_database_cannot_store_is_422_naming_the_field(
    api: TestClient, raw: bytes, loc: list[object], why: str
) -> None:
    # PostgreSQL's text and JSONB cannot hold NUL, and no UTF-8 writer a lone surrogate: on SQLite
    # these were stored, on PostgreSQL the commit failed with a 500.
    for error in post_raw(api, raw, loc):
        assert why in str(error["msg"]), error


def test_a_key_label_the_database_cannot_store_is_422(api: TestClient) -> None:
    admin = {"Authorization": f"Bearer {create_api_key(api.sqlite_url, 'unit', admin=True)}"}  # type: ignore[attr-defined]
    for raw in (rb'{"label": "a\u0000b"}', rb'{"label": "a\ud800b"}'):
        r = api.post("/v1/keys", content=raw, headers={**admin, "content-type": "application/json"})
        assert r.status_code == 422, r.text
        assert r.json()["detail"][0]["loc"] == ["body", "label"]
    assert len(api.get("/v1/keys", headers=admin).json()["items"]) == 2  # the fixture's and the admin's


@pytest.mark.parametrize(
    ("line", "field", "why"),
    [
        (rb'{"text": "a\u0000b", "label": "x"}', "text", "NUL"),
        (rb'{"text": "a", "label": "x\u0000"}', "label", "NUL"),
        (rb'{"text": "a\ud800", "label": "x"}', "text", "surrogate"),
        (rb'{"text": "a", "label": "\udc00"}', "label", "surrogate"),
    ],
    ids=["nul-text", "nul-label", "surrogate-text", "surrogate-label"],
)
def test_a_dataset_line_the_database_cannot_store_is_422_and_stores_nothing(
    api: TestClient, line: bytes, field: str, why: str
) -> None:
    raw = b'{"text": "fine", "label": "y"}\n' + line + b"\n"
    r = api.post("/v1/datasets", content=raw, headers={"content-type": "application/x-ndjson"})
    assert r.status_code == 422, r.text[:300]
    [error] = r.json()["detail"]
    assert error["loc"] == ["body", "line", 2]
    assert f"'{field}'" in error["msg"] and why in error["msg"], error
    assert dataset_count(api.sqlite_url) == 0 and stored_files(api) == []  # type: ignore[attr-defined]


def upload_dataset(api: TestClient, data: bytes) -> httpx.Response:
    return api.post("/v1/datasets", content=data, headers={"content-type": "application/x-ndjson"})


DATASET = b'{"text": "good", "label": "pos"}\n{"text": "bad", "label": "neg"}\n'


def test_an_upload_whose_commit_fails_leaves_no_file(api: TestClient) -> None:
    url: str = api.sqlite_url  # type: ignore[attr-defined]
    with get_sessionmaker(url)() as s:
        s.execute(
            text("CREATE TRIGGER full BEFORE INSERT ON datasets BEGIN SELECT RAISE(ABORT, 'disk full'); END")
        )
        s.commit()
    r = upload_dataset(api, DATASET)
    assert r.status_code == 500 and r.json()["detail"].startswith("internal error"), r.text
    assert dataset_count(url) == 0 and stored_files(api) == []

    with get_sessionmaker(url)() as s:
        s.execute(text("DROP TRIGGER full"))
        s.commit()
    r = upload_dataset(api, DATASET)
    assert r.status_code == 201, r.text
    assert [opened(api, f) for f in stored_files(api)] == [DATASET]


def test_an_upload_whose_commit_lands_but_then_raises_keeps_its_file(
    api: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The connection can drop after COMMIT reached the server: the row exists although commit()
    # raised. Its file must stay, or the dataset would name a missing file.
    real_commit = Session.commit

    def commit_then_lose_the_connection(self: Session) -> None:
        real_commit(self)
        raise OperationalError("COMMIT", {}, ConnectionError("server closed the connection"))

    monkeypatch.setattr(Session, "commit", commit_then_lose_the_connection)
    r = upload_dataset(api, DATASET)
    monkeypatch.undo()
    assert r.status_code == 500, r.text
    with get_sessionmaker(api.sqlite_url)() as s:  # type: ignore[attr-defined]
        [path] = s.scalars(select(Dataset.path)).all()
    assert stored_files(api) == [api.artifact_dir / path]  # type: ignore[attr-defined]


def test_an_upload_being_parsed_does_not_hold_up_other_requests(
    api: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Parsing, writing and committing an upload ran on the event loop: a big body held up every
    # other request of the process. The parse here blocks until this test lets it go; /healthz must
    # answer meanwhile. No timing: a failing run merely waits out the parse's timeout first.
    from api.routes import datasets

    entered, release, parsed = threading.Event(), threading.Event(), threading.Event()
    real_parse = datasets.parse_jsonl

    def held_parse(data: bytes, *, max_rows: int) -> object:
        entered.set()
        release.wait(timeout=10)
        parsed.set()
        return real_parse(data, max_rows=max_rows)

    monkeypatch.setattr(datasets, "parse_jsonl", held_parse)
    uploaded: list[httpx.Response] = []
    uploader = threading.Thread(target=lambda: uploaded.append(upload_dataset(api, DATASET)))
    uploader.start()
    try:
        assert entered.wait(timeout=30)
        assert api.get("/healthz").status_code == 200
        assert not parsed.is_set(), "/healthz waited for the upload's parse"
    finally:
        release.set()
        uploader.join(timeout=30)
    assert [r.status_code for r in uploaded] == [201]
    assert [opened(api, f) for f in stored_files(api)] == [DATASET]
