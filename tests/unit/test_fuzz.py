"""Schemathesis against the project's own OpenAPI document: no 5xx, and every 4xx is JSON.

The app runs in-process on a migrated SQLite database with a real Redis; no worker consumes the
queue, so fuzzed jobs are stored and left alone.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings

from api.app import create_app
from db.migrate import upgrade
from tensorq.core.settings import Settings
from tests.helpers import create_api_key

_tmp = Path(tempfile.mkdtemp(prefix="tensorq-fuzz-"))
_url = f"sqlite:///{_tmp / 'fuzz.db'}"
app = create_app(
    Settings(database_url=_url, redis_url="redis://127.0.0.1:6379/15", artifact_dir=_tmp / "artifacts"),
    run_background=False,
)
# POST /openai/v1/embeddings waits for a worker (there is none here) up to a minute per example.
schema = schemathesis.openapi.from_asgi("/openapi.json", app).exclude(path="/openai/v1/embeddings")


@schemathesis.serializer("application/x-ndjson")
def ndjson(ctx: object, value: object) -> bytes:
    # The dataset upload's body is free-form bytes; send what was generated as it is.
    if isinstance(value, bytes):
        return value
    return str(value).encode("utf-8", "surrogatepass")


AUTH: dict[str, str] = {}


@pytest.fixture(scope="module", autouse=True)
def running_app() -> Iterator[None]:
    upgrade(_url)
    AUTH["Authorization"] = f"Bearer {create_api_key(_url, 'fuzz', admin=True)}"
    with TestClient(app):  # runs the lifespan: publisher and event listener
        yield


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_never_answers_5xx_and_errors_are_json(case: schemathesis.Case) -> None:
    response = case.call(headers=AUTH)
    assert response.status_code < 500, (case.method, case.path, response.status_code, response.text[:500])
    if 400 <= response.status_code < 500:
        ctype = response.headers.get("content-type") or [""]
        assert (ctype[0] if isinstance(ctype, list) else ctype).startswith("application/json"), response.text[
            :200
        ]
        # /openai/v1 answers in OpenAI's error shape, everything else in the API's own (a path
        # whose dot segments climbed out of /openai/v1 is the rest of the API's).
        sent = urlsplit(str(response.request.url)).path
        assert ("error" if sent.startswith("/openai/v1/") else "detail") in response.json()
