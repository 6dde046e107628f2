"""tensorq.client (sync and async) and the client CLI commands against the real API and worker."""

from __future__ import annotations

import asyncio
import io
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import typer
from rich.console import Console
from typer.testing import CliRunner, Result

from tasks.data import sample_dataset_path
from tensorq.cli.jobs import (
    EXIT_JOB_FAILED,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    EXIT_WAIT_TIMEOUT,
    ProgressView,
    register,
)
from tensorq.client import AsyncClient, Client, TensorqConnectionError, TensorqError, WaitTimeout
from tensorq.core.settings import get_settings
from tests.conftest import Service
from tests.helpers import free_port, wait_until

pytestmark = pytest.mark.integration

# 20 rows, both labels: enough for one tiny training run.
ROWS = b"\n".join(sample_dataset_path().read_bytes().splitlines()[:20]) + b"\n"


@pytest.fixture
def tq(service: Service) -> Iterator[Client]:
    with Client(service.base_url, api_key=service.api_key) as client:
        yield client


def cli(service: Service | None, *args: str) -> Result:
    """Run a command through a typer app built here with `register`, as the main app gets them."""
    app = typer.Typer()
    register(app)
    url = ["--api-url", service.base_url] if service is not None else []
    env = {"TENSORQ_API_KEY": service.api_key} if service is not None else {}
    get_settings.cache_clear()  # the key comes from the environment, as for a user
    try:
        return CliRunner().invoke(app, [*args, *url], env=env)
    finally:
        get_settings.cache_clear()


def cli_json(service: Service, *args: str, code: int = EXIT_OK) -> Any:
    result = cli(service, *args, "--json")
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    return json.loads(result.stdout)  # nothing but JSON on stdout


def test_sync_client_submit_wait_get_list(tq: Client) -> None:
    job = tq.submit("embed", {"texts": ["A man plays guitar."]})
    assert job["status"] == "queued" and job["kind"] == "embed"
    seen: list[str] = []
    done = tq.wait(job["id"], timeout=30, on_change=lambda j: seen.append(j["status"]))
    assert done["status"] == "succeeded" and done["result"]["dim"] == 384
    assert seen[-1] == "succeeded" and len(seen) == len(set(seen))  # each change once
    assert tq.get(job["id"]) == done

    ids = tq.submit_many([("embed", {"texts": [f"text {i}"]}) for i in range(3)])
    assert len(ids) == 3
    assert [tq.wait(i, timeout=30)["status"] for i in ids] == ["succeeded"] * 3

    page = tq.list(kind="embed", status="succeeded", limit=2)
    assert len(page["items"]) == 2 and page["next_cursor"]
    following = tq.list(kind="embed", status="succeeded", limit=2, cursor=page["next_cursor"])
    assert not {j["id"] for j in page["items"]} & {j["id"] for j in following["items"]}
    every = [j["id"] for j in tq.iter_jobs(kind="embed", page_size=2)]  # several pages
    assert {job["id"], *ids} <= set(every) and len(every) == len(set(every))


class CountingTransport(httpx.HTTPTransport):
    def __init__(self) -> None:
        super().__init__()
        self.requests: list[str] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(f"{request.method} {request.url.path}")
        return super().handle_request(request)


def test_run_submits_and_answers_in_one_request(service: Service) -> None:
    transport = CountingTransport()
    with Client(service.base_url, api_key=service.api_key, transport=transport) as tq:
        job = tq.run("embed", {"texts": ["quick"]}, timeout=30)
        assert job["status"] == "succeeded" and job["result"]["dim"] == 384
        assert transport.requests == ["POST /v1/jobs"]
        with pytest.raises(WaitTimeout) as late:
            tq.run("embed", {"texts": ["no time at all"]}, timeout=0)
        assert late.value.job["status"] in ("queued", "running")


def test_errors_carry_status_and_detail(tq: Client) -> None:
    with pytest.raises(TensorqError) as bad:
        tq.submit("embed", {"texts": []})
    assert bad.value.status_code == 422 and bad.value.fields == ["body.input.texts"]
    assert "body.input.texts" in str(bad.value)
    with pytest.raises(TensorqError) as batch:
        tq.submit_many([("embed", {"texts": ["fine"]}), ("embed", {"txt": ["x"]})])
    assert "body.jobs.1.input.texts" in batch.value.fields

    with pytest.raises(TensorqError) as missing:
        tq.get(str(uuid.uuid4()))
    assert (missing.value.status_code, missing.value.detail) == (404, "job not found")
    with pytest.raises(TensorqError) as no_model:
        tq.model("no-such-model")
    assert no_model.value.status_code == 404
    with pytest.raises(TensorqError) as traversal:
        tq.model("../jobs")  # escaped into one segment, never another route
    assert traversal.value.status_code in (404, 422)

    done = tq.wait(tq.submit("embed", {"texts": ["x"]})["id"], timeout=30)
    with pytest.raises(TensorqError) as finished:
        tq.cancel(done["id"])
    assert finished.value.status_code == 409 and "succeeded" in str(finished.value.detail)

    with Client(f"http://127.0.0.1:{free_port()}") as away, pytest.raises(TensorqConnectionError) as down:
        away.get(done["id"])
    assert down.value.status_code is None


def test_async_client(service: Service) -> None:
    async def main() -> None:
        async with AsyncClient(service.base_url, api_key=service.api_key) as tq:
            job = await tq.submit("embed", {"texts": ["async hello"]}, device="cpu")
            seen: list[str] = []

            async def record(j: dict[str, Any]) -> None:
                seen.append(j["status"])

            done = await tq.wait(job["id"], timeout=30, on_change=record)
            assert done["status"] == "succeeded" and done["device"] == "cpu" and seen[-1] == "succeeded"
            assert await tq.get(job["id"]) == done
            ran = await tq.run("embed", {"texts": ["run in one call"]}, timeout=30)
            assert ran["status"] == "succeeded" and ran["result"]["dim"] == 384
            ids = await tq.submit_many([("embed", {"texts": ["a"]}), ("embed", {"texts": ["b"]})])
            assert [(await tq.wait(i, timeout=30))["status"] for i in ids] == ["succeeded"] * 2
            page = await tq.list(kind="embed", limit=1)
            assert len(page["items"]) == 1 and page["next_cursor"]
            listed = [j["id"] async for j in tq.iter_jobs(kind="embed", page_size=2)]
            assert {job["id"], *ids} <= set(listed)

            dataset = await tq.upload_dataset(ROWS, name="async-rows")
            assert dataset["rows"] == 20 and dataset["labels"] == ["negative", "positive"]
            assert isinstance(await tq.models(), list)

            with pytest.raises(TensorqError) as bad:
                await tq.upload_dataset(b'{"label": "x"}\n')  # no text
            assert bad.value.status_code == 422 and bad.value.fields == ["body.line.1"]
            with pytest.raises(TensorqError) as missing:
                await tq.cancel(str(uuid.uuid4()))
            assert missing.value.status_code == 404
            with pytest.raises(TensorqError) as no_alias:
                await tq.set_alias("no-such-model", "production", 1)
            assert no_alias.value.status_code == 404

    asyncio.run(main())


def test_cli_submit_status_jobs_and_exit_codes(service: Service) -> None:
    job = cli_json(service, "submit", "embed", "--text", "one", "--text", "two", "--wait")
    assert job["status"] == "succeeded" and len(job["result"]["embeddings"]) == 2
    assert cli_json(service, "status", job["id"])["id"] == job["id"]
    assert cli_json(service, "wait", job["id"])["status"] == "succeeded"

    human = cli(service, "submit", "embed", "--input", '{"texts": ["hi"]}', "--wait")
    assert human.exit_code == EXIT_OK, human.output
    assert "succeeded" in human.stdout and "1 embedding(s) of dim 384" in human.stdout

    listed = cli_json(service, "jobs", "--kind", "embed", "--limit", "2")
    assert [j["id"] for j in listed][1] == job["id"] and all(j["kind"] == "embed" for j in listed)
    table = cli(service, "jobs", "--kind", "embed", "--limit", "2")
    assert table.exit_code == EXIT_OK and all(j["id"] in table.stdout for j in listed)

    # A classify job for a model that does not exist is accepted, then fails: exit 1.
    failed = cli_json(
        service, "submit", "classify", "--model", "ghost", "--text", "x", "--wait", code=EXIT_JOB_FAILED
    )
    assert failed["status"] == "failed" and failed["error"]["type"] == "ModelNotFound"
    assert cli_json(service, "status", failed["id"], code=EXIT_JOB_FAILED)["status"] == "failed"
    shown = cli(service, "wait", failed["id"])
    assert shown.exit_code == EXIT_JOB_FAILED and "ModelNotFound" in shown.stdout

    # 4xx: exit 2 with the API's detail naming the field on stderr, nothing on stdout.
    bad = cli(service, "submit", "embed", "--input", '{"texts": []}', "--json")
    assert bad.exit_code == EXIT_USAGE and bad.stdout == ""
    assert "body.input.texts" in bad.stderr and "at least 1 item" in bad.stderr
    assert cli(service, "status", str(uuid.uuid4())).exit_code == EXIT_USAGE
    assert cli(service, "cancel", job["id"]).exit_code == EXIT_USAGE  # 409: already succeeded
    assert cli(service, "submit", "embed", "--input", "{nope").exit_code == EXIT_USAGE
    assert cli(service, "models", "no-such-model").exit_code == EXIT_USAGE

    # Unreachable API: exit 3.
    away = cli(None, "status", job["id"], "--api-url", f"http://127.0.0.1:{free_port()}")
    assert away.exit_code == EXIT_UNAVAILABLE and "cannot reach" in away.stderr


def test_train_cancel_models_and_classify(service: Service, tq: Client, tmp_path: Path) -> None:
    """The one training job (1 epoch, 16 rows of 16 tokens), and what needs one around."""
    rows = tmp_path / "rows.jsonl"
    rows.write_bytes(ROWS)
    dataset = tq.upload_dataset(rows, name="client-rows")
    assert dataset["rows"] == 20

    name = f"client-{uuid.uuid4().hex[:8]}"
    params = {
        "dataset_id": dataset["id"],
        "epochs": 1,
        "max_seq_length": 16,
        "batch_size": 4,
        "validation_split": 0.2,
        "seed": 1,
        "model_name": name,
    }
    (tmp_path / "train.json").write_text(json.dumps(params))
    train = cli_json(service, "submit", "train-text-classifier", "--input-file", str(tmp_path / "train.json"))
    assert train["status"] == "queued" and train["input"]["epochs"] == 1

    with pytest.raises(WaitTimeout) as early:
        tq.wait(train["id"], timeout=0)
    assert early.value.job["status"] in ("queued", "running")
    timed_out = cli(service, "wait", train["id"], "--timeout", "0", "--json")
    assert timed_out.exit_code == EXIT_WAIT_TIMEOUT and json.loads(timed_out.stdout)["id"] == train["id"]

    # While the only worker trains, a new job stays queued, so cancelling it is immediate.
    wait_until(lambda: tq.get(train["id"])["status"] != "queued", timeout=30, what="training started")
    behind = tq.submit("embed", {"texts": ["behind the training job"]})
    cancelled = cli_json(service, "cancel", behind["id"])
    assert cancelled["status"] == "cancelled"
    assert cli(service, "status", behind["id"]).exit_code == EXIT_JOB_FAILED

    watched = cli(service, "wait", train["id"], "--timeout", "60")
    assert watched.exit_code == EXIT_OK, watched.output
    assert "epoch 1/1" in watched.stderr and "step " in watched.stderr and "loss " in watched.stderr
    assert "succeeded" in watched.stdout and f"registered {name}:1" in watched.stdout

    model = tq.model(name)
    assert model["latest_version"] == 1 and model["versions"][0]["job_id"] == train["id"]
    assert name in [m["name"] for m in tq.models()]
    assert tq.set_alias(name, "production", 1) == {"model": name, "alias": "production", "version": 1}
    assert name in [m["name"] for m in cli_json(service, "models")]
    assert cli_json(service, "models", name)["aliases"] == {"production": 1}
    shown = cli(service, "models", name)
    assert shown.exit_code == EXIT_OK and "production" in shown.stdout

    classified = cli_json(
        service, "submit", "classify", "--model", f"{name}@production", "--text", "I love it", "--wait"
    )
    assert classified["status"] == "succeeded", classified
    assert classified["result"]["version"] == 1 and len(classified["result"]["predictions"]) == 1


def test_progress_bar_on_a_terminal() -> None:
    out = io.StringIO()
    view = ProgressView(Console(file=out, force_terminal=True, width=120))
    assert view.live
    job: dict[str, Any] = {"id": "j1", "status": "running", "worker": "cpu@host", "progress": None}
    for step in (0, 2, 4):
        progress = {"epoch": 1, "epochs": 2, "step": step, "total_steps": 8, "loss": 0.5 if step else None}
        view({**job, "progress": progress})
    view.close()
    text = out.getvalue()
    assert (
        "j1: running on cpu@host" in text and "epoch 1/2" in text and "4/8" in text and "loss 0.5000" in text
    )
