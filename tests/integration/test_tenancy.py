"""Two tenants on the real service: every /v1 route tried crosswise; another tenant's objects are 404."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from db.registry import register_version, set_alias
from db.session import session_scope
from tasks.data import sample_dataset_path
from tensorq.core.settings import Settings
from tests.conftest import Service
from tests.helpers import insert_queued_row, tenant_of, wait_job

pytestmark = pytest.mark.integration

ROWS = b"\n".join(sample_dataset_path().read_bytes().splitlines()[:20]) + b"\n"


@dataclass
class Owned:
    """What tenant A owns, and a client for tenant B, who must not reach any of it."""

    a: httpx.Client
    b: httpx.Client
    job: str
    queued_job: str
    dataset: str
    model: str
    key_id: str


@pytest.fixture(scope="module")
def owned(service: Service) -> Iterator[Owned]:
    suffix = os.urandom(3).hex()
    a = service.client(service.new_key(f"acme-{suffix}", admin=True))
    b = service.client(service.new_key(f"globex-{suffix}", admin=True))
    job = a.post("/v1/jobs", json={"kind": "embed", "input": {"texts": ["acme's text"]}}).json()["id"]
    wait_job(a, job)
    # A job no worker serves (it requires a GPU, which the API now refuses at submission when no
    # GPU worker runs), written past the API, so it stays queued and cancellable.
    queued = insert_queued_row(
        service.env["TENSORQ_DATABASE_URL"],
        f"acme-{suffix}",
        "embed",
        {"texts": ["q"]},
        published=True,
        queue="gpu.inference",
    )
    dataset = a.post("/v1/datasets", content=ROWS, params={"name": "acme-rows"}).json()["id"]
    model = f"secret-{suffix}"
    url = Settings(database_url=service.env["TENSORQ_DATABASE_URL"]).sqlalchemy_url
    with session_scope(url) as session:
        register_version(
            session,
            tenant=f"acme-{suffix}",
            name=model,
            artifact_path="jobs/none/model",
            labels=["negative", "positive"],
            metrics={},
            job_id=None,
        )
        set_alias(session, f"acme-{suffix}", model, "production", 1)
    key_id = a.post("/v1/keys", json={"label": "second"}).json()["id"]
    yield Owned(a, b, job, queued, dataset, model, key_id)
    a.close()
    b.close()


# Every /v1 operation, and how tenant B tries it against tenant A's objects.
CROSSWISE = {
    ("POST", "/v1/jobs"),
    ("GET", "/v1/jobs"),
    ("POST", "/v1/jobs:batch"),
    ("GET", "/v1/jobs/{job_id}"),
    ("GET", "/v1/jobs/{job_id}/events"),
    ("POST", "/v1/jobs/{job_id}/cancel"),
    ("POST", "/v1/datasets"),
    ("GET", "/v1/datasets"),
    ("GET", "/v1/datasets/{dataset_id}"),
    ("GET", "/v1/models"),
    ("GET", "/v1/models/{name}"),
    ("PUT", "/v1/models/{name}/aliases/{alias}"),
    ("GET", "/v1/models/{name}/aliases/{alias}"),
    ("POST", "/v1/models/{name}/aliases/{alias}/rollback"),
    ("GET", "/v1/keys"),
    ("POST", "/v1/keys"),
    ("POST", "/v1/keys/{key_id}/revoke"),
    ("GET", "/v1/webhook-secret"),
    ("POST", "/v1/webhook-secret:rotate"),
    ("GET", "/v1/whoami"),
}


def test_the_crosswise_list_covers_every_v1_operation(owned: Owned) -> None:
    paths = owned.a.get("/openapi.json").json()["paths"]
    ops = {(m.upper(), p) for p, methods in paths.items() if p.startswith("/v1") for m in methods}
    assert ops == CROSSWISE, "a /v1 route was added or removed: try it crosswise below too"


def test_another_tenants_jobs_answer_404(owned: Owned) -> None:
    a, b = owned.a, owned.b
    for path in (f"/v1/jobs/{owned.job}", f"/v1/jobs/{owned.job}?wait=1", f"/v1/jobs/{owned.job}/events"):
        r = b.get(path)
        assert r.status_code == 404 and r.json() == {"detail": "job not found"}, (path, r.text)
    missing = b.get(f"/v1/jobs/{uuid.uuid4()}")
    assert missing.status_code == 404 and missing.json() == b.get(f"/v1/jobs/{owned.job}").json()

    assert b.post(f"/v1/jobs/{owned.queued_job}/cancel").status_code == 404
    assert a.get(f"/v1/jobs/{owned.queued_job}").json()["status"] == "queued"  # untouched

    mine = b.post("/v1/jobs", json={"kind": "embed", "input": {"texts": ["globex"]}}).json()["id"]
    batch = b.post("/v1/jobs:batch", json={"jobs": [{"kind": "embed", "input": {"texts": ["g"]}}]}).json()[
        "ids"
    ]
    listed = {j["id"] for j in b.get("/v1/jobs", params={"limit": 200}).json()["items"]}
    assert {mine, *batch} <= listed and not {owned.job, owned.queued_job} & listed
    assert not {owned.job, owned.queued_job} & {
        j["id"] for j in b.get("/v1/jobs", params={"kind": "embed", "status": "succeeded"}).json()["items"]
    }
    assert owned.job in {j["id"] for j in a.get("/v1/jobs").json()["items"]}
    assert mine not in {j["id"] for j in a.get("/v1/jobs").json()["items"]}
    a.post(f"/v1/jobs/{owned.queued_job}/cancel")


def test_another_tenants_datasets_and_models_answer_404(owned: Owned) -> None:
    a, b = owned.a, owned.b
    assert b.get(f"/v1/datasets/{owned.dataset}").status_code == 404
    assert a.get(f"/v1/datasets/{owned.dataset}").status_code == 200
    own = b.post("/v1/datasets", content=ROWS).json()["id"]
    assert {d["id"] for d in b.get("/v1/datasets").json()["items"]} == {own}

    assert b.get(f"/v1/models/{owned.model}").status_code == 404
    assert owned.model not in {m["name"] for m in b.get("/v1/models").json()["items"]}
    r = b.put(f"/v1/models/{owned.model}/aliases/production", json={"version": 1})
    assert r.status_code == 404
    assert b.get(f"/v1/models/{owned.model}/aliases/production").status_code == 404
    assert b.post(f"/v1/models/{owned.model}/aliases/production/rollback", json={}).status_code == 404
    assert a.get(f"/v1/models/{owned.model}").json()["aliases"] == {"production": 1}
    assert a.get(f"/v1/models/{owned.model}/aliases/production").status_code == 200


def test_workers_resolve_models_and_datasets_in_the_jobs_tenant(owned: Owned, pg_url: str) -> None:
    b = owned.b
    classify = b.post("/v1/jobs", json={"kind": "classify", "input": {"model": owned.model, "texts": ["x"]}})
    stolen = {"dataset_id": owned.dataset, "model_name": "stolen"}
    # The API refuses another tenant's dataset as it does a missing one, and stores nothing...
    refused = b.post("/v1/jobs", json={"kind": "train-text-classifier", "input": stolen})
    assert refused.status_code == 422
    assert refused.json()["detail"][0]["loc"] == ["body", "input", "dataset_id"]
    assert b.get("/v1/jobs", params={"kind": "train-text-classifier"}).json()["items"] == []
    # ...and a job naming it anyway (written to the database, past the API) fails in the worker.
    tenant = tenant_of(b)
    train = insert_queued_row(
        pg_url, tenant, "train-text-classifier", stolen, published=False, model="stolen", queue="training"
    )
    done = [wait_job(b, classify.json()["id"]), wait_job(b, train)]
    assert [(j["status"], j["error"]["type"]) for j in done] == [
        ("failed", "ModelNotFound"),
        ("failed", "DatasetNotFound"),
    ]
    assert b.get("/v1/models/stolen").status_code == 404


def test_keys_and_webhook_secrets_stay_in_their_tenant(owned: Owned) -> None:
    a, b = owned.a, owned.b
    assert b.post(f"/v1/keys/{owned.key_id}/revoke").status_code == 404
    assert owned.key_id not in {k["id"] for k in b.get("/v1/keys").json()["items"]}
    assert owned.key_id in {k["id"] for k in a.get("/v1/keys").json()["items"]}
    assert b.post("/v1/keys", json={}).json()["tenant"] == b.get("/v1/whoami").json()["tenant"]
    secret_a = a.get("/v1/webhook-secret").json()["webhook_secret"]
    rotated_b = b.post("/v1/webhook-secret:rotate").json()["webhook_secret"]
    assert a.get("/v1/webhook-secret").json()["webhook_secret"] == secret_a != rotated_b
