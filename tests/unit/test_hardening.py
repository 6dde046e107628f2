"""Issue #24 on SQLite with TestClient: bounded listings, stored-data quotas, no 500 for odd input,
strict types, webhook hosts, one log record per error, device requirements."""

from __future__ import annotations

import base64
import logging
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from api.app import create_app
from db.jobs import create_job
from db.models import Dataset, Job, JobStatus
from db.session import get_sessionmaker, session_scope
from tasks.classifier import MAX_LABELS
from tensorq.core.presence import Announcer, queue_key
from tensorq.core.settings import Settings
from tests.helpers import create_api_key

REDIS_URL = os.environ.get("TENSORQ_TEST_REDIS_URL", "redis://127.0.0.1:6379/11")


def make_client(sqlite_url: str, tmp_path: Path, **overrides: object) -> TestClient:
    values: dict[str, object] = {"redis_url": "redis://127.0.0.1:1/0", **overrides}
    settings = Settings(database_url=sqlite_url, artifact_dir=tmp_path / "artifacts", **values)  # type: ignore[arg-type]
    app = create_app(settings, run_background=False)
    key = create_api_key(sqlite_url, "unit", admin=True)
    return TestClient(app, raise_server_exceptions=False, headers={"Authorization": f"Bearer {key}"})


@pytest.fixture
def api(sqlite_url: str, tmp_path: Path) -> Iterator[TestClient]:
    with make_client(sqlite_url, tmp_path, list_max_bytes=64 * 1024) as client:
        yield client


def count(url: str, model: type) -> int:
    with get_sessionmaker(url)() as s:
        return s.scalar(select(func.count()).select_from(model)) or 0


def finished_jobs(url: str, n: int, texts: int) -> list[str]:
    """`n` succeeded embed jobs of `texts` texts each, with results of the real size (384 floats)."""
    ids = []
    with session_scope(url) as session:
        for i in range(n):
            job = create_job(
                session,
                tenant="unit",
                kind="embed",
                params={"texts": [f"text {i}"] * texts},
                queue="inference",
                max_attempts=3,
                model="all-MiniLM-L6-v2",
                batch_cost=texts,
            )
            job.status = JobStatus.SUCCEEDED
            job.result = {"model": "m", "dim": 384, "embeddings": [[0.123456789] * 384] * texts}
            ids.append(str(job.id))
    return ids


# --- 1. bounded listings ----------------------------------------------------------------------


def test_listing_leaves_out_inputs_and_results_unless_included(api: TestClient) -> None:
    finished_jobs(api.app.state.settings.database_url, 3, texts=2)  # type: ignore[attr-defined]
    items = api.get("/v1/jobs").json()["items"]
    assert len(items) == 3 and all(j["result"] is None and j["input"] is None for j in items)
    assert all(j["status"] == "succeeded" for j in items)
    full = api.get("/v1/jobs", params={"include": "input,result"}).json()["items"]
    assert all(len(j["result"]["embeddings"]) == 2 and len(j["input"]["texts"]) == 2 for j in full)
    bad = api.get("/v1/jobs", params={"include": "secrets"})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["query", "include"]


def test_a_listing_with_results_stays_under_the_byte_limit_and_pages_on(api: TestClient) -> None:
    # Each job's result is ~24 KB of JSON; the limit is 64 KiB, so a page holds two of them.
    ids = finished_jobs(api.app.state.settings.database_url, 9, texts=5)  # type: ignore[attr-defined]
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params = {"include": "result", "limit": 200, **({"cursor": cursor} if cursor else {})}
        r = api.get("/v1/jobs", params=params)
        assert r.status_code == 200
        assert len(r.content) <= 64 * 1024, len(r.content)
        page = r.json()
        assert all(len(j["result"]["embeddings"]) == 5 for j in page["items"])
        seen += [j["id"] for j in page["items"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert sorted(seen) == sorted(ids) and len(seen) == len(set(seen))
    assert pages >= 4


def test_an_overflowing_cursor_is_a_422_naming_cursor(api: TestClient) -> None:
    raw = f"0001-01-01T00:00:00+14:00|{uuid.uuid4()}".encode()
    cursor = base64.urlsafe_b64encode(raw).decode().rstrip("=")
    r = api.get("/v1/jobs", params={"cursor": cursor})
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"] == ["query", "cursor"]


# --- 2. stored-data quotas and upload-time label checks ---------------------------------------

ROWS = b'{"text": "good", "label": "pos"}\n{"text": "bad", "label": "neg"}\n'


def test_dataset_quotas_are_413_naming_the_limit_and_whoami_shows_them(
    sqlite_url: str, tmp_path: Path
) -> None:
    with make_client(sqlite_url, tmp_path, tenant_max_datasets=2, tenant_max_dataset_bytes=1024) as api:
        assert api.post("/v1/datasets", content=ROWS).status_code == 201
        big = ROWS * 15  # 975 bytes: over the byte quota with the first
        r = api.post("/v1/datasets", content=big)
        assert r.status_code == 413 and r.json()["detail"]["limit"] == "TENSORQ_TENANT_MAX_DATASET_BYTES", (
            r.text
        )
        assert api.post("/v1/datasets", content=ROWS).status_code == 201
        r = api.post("/v1/datasets", content=ROWS)
        assert r.status_code == 413 and r.json()["detail"]["limit"] == "TENSORQ_TENANT_MAX_DATASETS", r.text
        assert count(sqlite_url, Dataset) == 2
        assert len([p for p in (tmp_path / "artifacts").rglob("*") if p.is_file()]) == 2
        me = api.get("/v1/whoami").json()
        assert me["limits"]["max_datasets"] == 2 and me["limits"]["max_dataset_bytes"] == 1024
        assert me["usage"] == {"active_jobs": 0, "datasets": 2, "dataset_bytes": 2 * len(ROWS)}


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b'{"text": "a", "label": "x"}\n{"text": "b", "label": "x"}\n', "at least 2"),
        (
            b"".join(b'{"text": "t", "label": "l%d"}\n' % i for i in range(MAX_LABELS + 1)),
            f"at most {MAX_LABELS}",
        ),
    ],
)
def test_datasets_a_classifier_cannot_train_on_are_refused_at_upload(
    api: TestClient, body: bytes, words: str
) -> None:
    r = api.post("/v1/datasets", content=body)
    assert r.status_code == 422 and words in r.json()["detail"][0]["msg"], r.text
    assert count(api.app.state.settings.database_url, Dataset) == 0  # type: ignore[attr-defined]


# --- 3. no 500 for any input ------------------------------------------------------------------


def test_a_deeply_nested_jsonl_line_is_a_422_naming_the_line(api: TestClient) -> None:
    body = ROWS + b"[" * 5000 + b"]" * 5000 + b"\n"
    r = api.post("/v1/datasets", content=body)
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"] == ["body", "line", 3]


# --- 5c. strict types -------------------------------------------------------------------------


@pytest.mark.parametrize("admin", ["yes", "true", 1, "1"])
def test_an_admin_flag_is_never_coerced(api: TestClient, admin: object) -> None:
    r = api.post("/v1/keys", json={"admin": admin})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "admin"], r.text
    assert len(api.get("/v1/keys").json()["items"]) == 1  # only the test's own key


def test_versions_and_training_numbers_are_never_coerced(api: TestClient) -> None:
    r = api.put("/v1/models/m/aliases/production", json={"version": "1"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "version"], r.text
    body = {
        "kind": "train-text-classifier",
        "input": {
            "data": [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}],
            "model_name": "m",
            "learning_rate": "0.001",
        },
    }
    r = api.post("/v1/jobs", json=body)
    assert r.status_code == 422 and ["body", "input", "learning_rate"] in [
        e["loc"] for e in r.json()["detail"]
    ]
    assert count(api.app.state.settings.database_url, Job) == 0  # type: ignore[attr-defined]


# --- 5d. webhook hosts ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://[::ffff:0:a00:1]/hook",  # IPv4-translated 10.0.0.1
        "http://[::ffff:0:7f00:1]/hook",  # IPv4-translated 127.0.0.1
        "http://[::ffff:0:a9fe:a9fe]/hook",  # IPv4-translated 169.254.169.254
        "http://[2001:0:4136:e378:8000:63bf:80ff:fffe]/hook",  # Teredo, client 127.0.0.1
        "http://LOCALHOST./hook",
        "http://LocalHost/hook",
        "http://foo.localhost./hook",
        "http://127.1/hook",
        "http://2130706433/hook",
        "http://0x7f.0.0.1/hook",
        "http://0177.0.0.1/hook",
    ],
)
def test_webhook_hosts_carrying_private_ipv4_or_localhost_are_refused(api: TestClient, url: str) -> None:
    r = api.post("/v1/jobs", json={"kind": "embed", "input": {"texts": ["a"]}, "webhook": url})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "webhook"], r.text
    assert count(api.app.state.settings.database_url, Job) == 0  # type: ignore[attr-defined]


def test_public_hosts_in_the_same_forms_are_allowed() -> None:
    from api.webhooks.policy import check_url

    for url in ("http://[::ffff:0:808:808]/", "http://example.com./", "http://8.8.8.8/", "http://1e100.net/"):
        assert check_url(url, []) is None, url


# --- 4. one log record per unexpected error ---------------------------------------------------


def test_an_unexpected_error_is_logged_once_and_answered_as_json(
    api: TestClient, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import api.routes.datasets as routes

    def broken(*_: object, **__: object) -> list[Dataset]:
        raise RuntimeError("the disk fell off")

    monkeypatch.setattr(routes, "list_datasets", broken)
    with caplog.at_level(logging.INFO):
        r = api.get("/v1/datasets")
    assert r.status_code == 500 and "internal error" in r.json()["detail"]
    errors = [rec for rec in caplog.records if rec.levelno >= logging.ERROR]
    assert len(errors) == 1 and "the disk fell off" in caplog.text, [e.getMessage() for e in errors]


# --- 5a. a device no worker has ---------------------------------------------------------------


def test_a_device_no_live_worker_serves_is_refused(sqlite_url: str, tmp_path: Path) -> None:
    r = redis.Redis.from_url(REDIS_URL)
    r.delete(queue_key("gpu.inference"), queue_key("cpu.inference"))
    with make_client(sqlite_url, tmp_path, redis_url=REDIS_URL, worker_presence_cache_seconds=0) as api:
        body = {"kind": "embed", "input": {"texts": ["a"]}, "device": "gpu"}
        refused = api.post("/v1/jobs", json=body)
        assert refused.status_code == 422 and refused.json()["detail"][0]["loc"] == ["body", "device"]
        batch = api.post("/v1/jobs:batch", json={"jobs": [{**body, "device": "any"}, body]})
        assert batch.status_code == 422 and batch.json()["detail"][0]["loc"] == ["body", "jobs", 1, "device"]
        assert count(sqlite_url, Job) == 0
        announcer = Announcer(REDIS_URL, "gpu-worker@test", ["gpu.inference"])
        announcer.announce()
        try:
            assert api.post("/v1/jobs", json=body).status_code == 202
        finally:
            announcer.stop()
        assert api.post("/v1/jobs", json=body).status_code == 422  # gone at once when it stops
