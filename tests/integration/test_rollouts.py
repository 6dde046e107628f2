"""Gradual rollouts behind an alias (splits, shadows, guards, rollback, history) on PostgreSQL,
Redis and a real worker. One tiny classifier is trained for the module; further versions are
copies of its artifact directory registered straight into the registry (one made unreadable)."""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import typer
from typer.testing import CliRunner, Result

from db.registry import register_version
from db.session import session_scope
from tasks.classifier import WEIGHTS_FILE
from tasks.data import sample_dataset_path
from tensorq.cli.jobs import register
from tensorq.core.settings import Settings, get_settings
from tests.helpers import (
    Service,
    copy_sealed_dir,
    service_files,
    tenant_of,
    training_job,
    wait_job,
    wait_until,
)

pytestmark = pytest.mark.integration

TEXTS = [json.loads(line)["text"] for line in sample_dataset_path().read_text().splitlines()[:40]]
GOOD, COPY, SHADOW, BAD = 1, 2, 3, 4  # versions: trained, copy, copy, unreadable copy


@dataclass
class Registered:
    name: str
    tenant: str


@pytest.fixture(scope="module")
def model(service: Service) -> Registered:
    """`roll`: version 1 trained (1 epoch, 40 rows); 2 and 3 copies of it; 4 a copy whose weights
    are unreadable."""
    name = f"roll-{uuid.uuid4().hex[:6]}"
    with service.client() as client:
        r = client.post("/v1/jobs", json=training_job(name, epochs=1, rows=40, max_seq_length=16))
        assert r.status_code == 202, r.text
        trained = wait_job(client, r.json()["id"], timeout=600)
        assert trained["status"] == "succeeded", trained
        tenant = tenant_of(client)
        artifact = client.get(f"/v1/models/{name}").json()["versions"][0]["artifact"]
    root = Path(service.env["TENSORQ_ARTIFACT_DIR"])
    url = Settings(database_url=service.env["TENSORQ_DATABASE_URL"]).sqlalchemy_url
    files = service_files(service, tenant)  # files are sealed for their path: copies are resealed
    with session_scope(url) as session:
        for version in (COPY, SHADOW, BAD):
            copy = f"copies/{name}/v{version}"
            copy_sealed_dir(files, root / artifact, root / copy)
            if version == BAD:
                files.write(root / copy / WEIGHTS_FILE, b"unreadable: not safetensors")
            registered = register_version(
                session,
                tenant=tenant,
                name=name,
                artifact_path=copy,
                labels=["negative", "positive"],
                metrics={},
                job_id=None,
            )
            assert registered.version == version
    return Registered(name, tenant)


def classify_many(client: httpx.Client, ref: str, n: int) -> list[str]:
    jobs = [{"kind": "classify", "input": {"model": ref, "texts": [TEXTS[i % len(TEXTS)]]}} for i in range(n)]
    ids: list[str] = []
    for start in range(0, n, 500):
        r = client.post("/v1/jobs:batch", json={"jobs": jobs[start : start + 500]})
        assert r.status_code == 202, r.text
        ids += r.json()["ids"]
    return ids


def wait_all(client: httpx.Client, ids: list[str], timeout: float = 300) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    return [wait_job(client, i, timeout=max(1.0, deadline - time.monotonic())) for i in ids]


def put_alias(client: httpx.Client, name: str, alias: str, body: dict[str, Any]) -> httpx.Response:
    return client.put(f"/v1/models/{name}/aliases/{alias}", json=body)


def test_a_70_30_split_lands_near_it_and_each_job_names_its_version(
    client: httpx.Client, model: Registered
) -> None:
    r = put_alias(client, model.name, "canary", {"split": {str(GOOD): 70, str(COPY): 30}})
    assert r.status_code == 200, r.text
    assert r.json() == {"model": model.name, "alias": "canary", "version": GOOD, "split": {"1": 70, "2": 30}}
    started = time.monotonic()
    jobs = wait_all(client, classify_many(client, f"{model.name}@canary", 400))
    elapsed = time.monotonic() - started
    assert all(j["status"] == "succeeded" for j in jobs), [j for j in jobs if j["status"] != "succeeded"][:2]
    # Each job ran on the version it was assigned (its result says so too).
    assert all(j["result"]["version"] == j["model_version"] for j in jobs)
    landed = Counter(j["model_version"] for j in jobs)
    share = landed[GOOD] / len(jobs) * 100
    print(f"\n400 jobs on a 70/30 split: {share:.1f}/{100 - share:.1f} in {elapsed:.1f}s")
    assert set(landed) == {GOOD, COPY} and abs(share - 70) <= 7
    # Jobs of both versions were batched, each batch with one version only (batch_size counts them).
    assert max(j["metrics"]["batch_size"] for j in jobs) > 1

    detail = client.get(f"/v1/models/{model.name}/aliases/canary").json()
    stats = {s["version"]: s for s in detail["stats"]}
    assert stats[GOOD]["by_status"] == {"succeeded": landed[GOOD]} and stats[GOOD]["role"] == "baseline"
    assert stats[COPY]["by_status"] == {"succeeded": landed[COPY]} and stats[COPY]["role"] == "candidate"
    assert (
        stats[COPY]["failure_rate"] == 0 and stats[COPY]["run_ms"]["p95"] >= stats[COPY]["run_ms"]["p50"] > 0
    )
    assert sum(stats[GOOD]["labels"].values()) == landed[GOOD]
    assert [h["action"] for h in detail["history"]] == ["set"] and detail["history"][0]["key_id"]

    # Retried or not, a job keeps its version; a change affects only jobs assigned after it.
    assert put_alias(client, model.name, "canary", {"version": COPY}).status_code == 200
    later = wait_all(client, classify_many(client, f"{model.name}@canary", 10))
    assert {j["model_version"] for j in later} == {COPY}
    again = [client.get(f"/v1/jobs/{j['id']}").json() for j in jobs[:20]]
    assert [j["model_version"] for j in again] == [j["model_version"] for j in jobs[:20]]


def test_shadow_runs_are_stored_apart_and_never_fail_the_job(
    client: httpx.Client, model: Registered, service: Service
) -> None:
    for alias, shadow in (("shadowed", SHADOW), ("shadow-bad", BAD)):
        body = {"version": GOOD, "shadow": {"version": shadow, "percent": 100}}
        assert put_alias(client, model.name, alias, body).status_code == 200
        jobs = wait_all(client, classify_many(client, f"{model.name}@{alias}", 12))
        # The job's result is its own version's, whatever its shadow did.
        assert all(j["status"] == "succeeded" and j["model_version"] == GOOD for j in jobs), jobs[0]
        assert all(
            j["result"]["version"] == GOOD and set(j["result"]) == {"model", "version", "predictions"}
            for j in jobs
        )

        def shadowed(alias: str = alias, shadow: int = shadow) -> dict[str, Any] | None:
            detail = client.get(f"/v1/models/{model.name}/aliases/{alias}").json()
            found = {s["version"]: s for s in detail["stats"]}.get(shadow)
            return found if found and found["shadow"] and found["shadow"]["runs"] >= 12 else None

        stats = wait_until(shadowed, timeout=60, what=f"shadow runs of {alias}")
        assert stats["role"] == "shadow" and stats["jobs"] == 0  # no job's result came from it
        if shadow == SHADOW:  # the same weights: every top label agrees
            assert stats["shadow"] == {"runs": 12, "failed": 0, "agreement": 1.0}
        else:
            assert stats["shadow"]["failed"] == 12 and stats["shadow"]["agreement"] is None


def test_a_failing_candidate_trips_the_guard_and_the_alias_rolls_back(
    client: httpx.Client, model: Registered
) -> None:
    assert put_alias(client, model.name, "guarded", {"version": GOOD}).status_code == 200
    body = {"split": {str(GOOD): 50, str(BAD): 50}, "guard": {"max_failure_rate": 0.05, "min_jobs": 20}}
    assert put_alias(client, model.name, "guarded", body).status_code == 200
    jobs = wait_all(client, classify_many(client, f"{model.name}@guarded", 100))
    bad = [j for j in jobs if j["model_version"] == BAD]
    assert len(bad) >= 20 and all(j["status"] == "failed" for j in bad)
    assert all(j["status"] == "succeeded" for j in jobs if j["model_version"] == GOOD)

    detail = client.get(f"/v1/models/{model.name}/aliases/guarded").json()
    assert detail["split"] == {str(GOOD): 100} and detail["guard"] is None
    rolled = [h for h in detail["history"] if h["action"] == "auto-rollback"]
    assert len(rolled) == 1 and rolled[0]["key_id"] is None, detail["history"]
    assert f"version {BAD} failed" in rolled[0]["reason"] and "max_failure_rate 0.05" in rolled[0]["reason"]
    assert rolled[0]["from"]["split"] == {str(GOOD): 50, str(BAD): 50} and rolled[0]["to"]["split"] == {
        "1": 100
    }
    print(f"\n{rolled[0]['reason']}")
    after = wait_all(client, classify_many(client, f"{model.name}@guarded", 20))
    assert all(j["status"] == "succeeded" and j["model_version"] == GOOD for j in after)


def test_rollback_restores_the_previous_assignment(client: httpx.Client, model: Registered) -> None:
    assert put_alias(client, model.name, "manual", {"version": GOOD}).status_code == 200
    split = {"split": {str(GOOD): 80, str(COPY): 20}, "shadow": {"version": SHADOW, "percent": 10}}
    assert put_alias(client, model.name, "manual", split).status_code == 200
    r = client.post(f"/v1/models/{model.name}/aliases/manual/rollback", json={"reason": "not today"})
    assert r.status_code == 200, r.text
    detail = r.json()
    assert (detail["version"], detail["split"], detail["shadow"]) == (GOOD, {"1": 100}, None)
    assert detail["history"][0]["action"] == "rollback" and detail["history"][0]["reason"] == "not today"
    assert client.get(f"/v1/models/{model.name}/aliases/manual").json()["revision"] == 3
    ids = classify_many(client, f"{model.name}@manual", 5)
    assert {j["model_version"] for j in wait_all(client, ids)} == {GOOD}
    # Nothing before the first assignment.
    assert put_alias(client, model.name, "fresh", {"version": GOOD}).status_code == 200
    assert client.post(f"/v1/models/{model.name}/aliases/fresh/rollback").status_code == 409


BAD_INPUTS = [
    ({"split": {"1": 60, "2": 30}}, ["body", "split"]),
    ({"split": {"1": 20, "2": 20, "3": 20, "4": 20, "5": 20}}, ["body", "split"]),
    ({"split": {"1": 50, "9": 50}}, ["body", "split", "9"]),
    ({"version": 9}, ["body", "version"]),
    ({"split": {"1": 50, "2": 50}, "shadow": {"version": 2, "percent": 10}}, ["body", "shadow", "version"]),
    ({"version": 1, "shadow": {"version": 1, "percent": 10}}, ["body", "shadow", "version"]),
    ({"version": 1, "shadow": {"version": 9, "percent": 10}}, ["body", "shadow", "version"]),
    (
        {"split": {"1": 50, "2": 50}, "guard": {"max_failure_rate": 1.5, "min_jobs": 20}},
        ["body", "guard", "max_failure_rate"],
    ),
    (
        {"split": {"1": 50, "2": 50}, "guard": {"max_failure_rate": -0.1, "min_jobs": 20}},
        ["body", "guard", "max_failure_rate"],
    ),
    (
        {"split": {"1": 50, "2": 50}, "guard": {"max_failure_rate": "0.1", "min_jobs": 20}},
        ["body", "guard", "max_failure_rate"],
    ),
    ({"split": {"1": "50", "2": 50}}, ["body", "split", "1"]),
    ({"split": {"1": 50.0, "2": 50}}, ["body", "split", "1"]),
    ({"split": {"x": 100}}, ["body", "split", "x", "[key]"]),
    ({"version": "1"}, ["body", "version"]),
    ({"version": 1, "split": {"1": 100}}, ["body"]),
]


def test_bad_input_is_a_422_naming_the_field_and_changes_nothing(
    client: httpx.Client, model: Registered, service: Service
) -> None:
    assert put_alias(client, model.name, "strict", {"version": GOOD}).status_code == 200
    before = client.get(f"/v1/models/{model.name}/aliases/strict").json()
    for body, loc in BAD_INPUTS:
        r = put_alias(client, model.name, "strict", body)
        assert r.status_code == 422, (body, r.text)
        assert loc in [e["loc"] for e in r.json()["detail"]], (body, r.json())
    assert client.get(f"/v1/models/{model.name}/aliases/strict").json() == before

    with service.client(service.new_key(f"other-{uuid.uuid4().hex[:6]}")) as other:
        assert put_alias(other, model.name, "strict", {"version": GOOD}).status_code == 404
        assert other.get(f"/v1/models/{model.name}/aliases/strict").status_code == 404
        assert other.post(f"/v1/models/{model.name}/aliases/strict/rollback").status_code == 404
        # Another tenant's job naming the alias is assigned nothing and finds no such model.
        r = other.post(
            "/v1/jobs", json={"kind": "classify", "input": {"model": f"{model.name}@strict", "texts": ["x"]}}
        )
        done = wait_job(other, r.json()["id"])
        assert (
            done["status"] == "failed"
            and done["error"]["type"] == "ModelNotFound"
            and done["model_version"] is None
        )
    assert client.get(f"/v1/models/{model.name}/aliases/strict").json() == before
    assert client.get(f"/v1/models/{model.name}/aliases/nope").status_code == 404


@pytest.fixture
def cli(service: Service) -> Iterator[Any]:
    app = typer.Typer()
    register(app)

    def run(*args: str) -> Result:
        return CliRunner().invoke(
            app, [*args, "--api-url", service.base_url], env={"TENSORQ_API_KEY": service.api_key}
        )

    get_settings.cache_clear()
    yield run
    get_settings.cache_clear()


def test_cli_split_history_and_rollback(cli: Any, model: Registered) -> None:
    assert cli("models", "split", model.name, "cli", "1=100").exit_code == 0
    done = cli(
        "models",
        "split",
        model.name,
        "cli",
        "1=90",
        "2=10",
        "--shadow",
        "3:20",
        "--guard-max-failure-rate",
        "0.1",
        "--guard-min-jobs",
        "30",
    )
    assert done.exit_code == 0, done.output
    assert "1=90% 2=10% shadow 3:20% guard 0.1 over 30 jobs" in done.stdout
    shown = json.loads(cli("models", "history", model.name, "cli", "--json").stdout)
    assert shown["split"] == {"1": 90, "2": 10} and shown["guard"] == {
        "max_failure_rate": 0.1,
        "min_jobs": 30,
    }
    table = cli("models", "history", model.name, "cli")
    assert table.exit_code == 0 and "FAILURE_RATE" in table.stdout and "set" in table.stdout
    rolled = cli("models", "rollback", model.name, "cli")
    assert rolled.exit_code == 0 and "rolled back to 1=100%" in rolled.stdout
    assert cli("models", "split", model.name, "cli", "1=60", "2=30").exit_code == 2  # 422
    assert cli("models", "split", model.name, "cli", "1-100").exit_code == 2  # not VERSION=PERCENT
    # The model commands as they were.
    assert model.name in [m["name"] for m in json.loads(cli("models", "--json").stdout)]
    assert json.loads(cli("models", model.name, "--json").stdout)["aliases"]["cli"] == 1
    assert cli("models", "no-such-model").exit_code == 2
