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
from migrations.run import upgrade
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


def _b64(raw: str) -> str:
    import base64

    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


# Inputs random generation rarely reaches: crafted cursors and JSONL bodies (each was a 500 once).
CRAFTED = [
    (
        "GET",
        "/v1/jobs",
        {"params": {"cursor": _b64("0001-01-01T00:00:00+14:00|" + "0" * 8 + "-0000-0000-0000-" + "0" * 12)}},
    ),
    (
        "GET",
        "/v1/jobs",
        {"params": {"cursor": _b64("9999-12-31T23:59:59-14:00|00000000-0000-0000-0000-000000000000")}},
    ),
    ("GET", "/v1/jobs", {"params": {"cursor": _b64("2026-01-01T00:00:00|not-a-uuid")}}),
    ("GET", "/v1/jobs", {"params": {"cursor": "%%%"}}),
    ("POST", "/v1/datasets", {"content": b"[" * 5000 + b"]" * 5000}),
    ("POST", "/v1/datasets", {"content": b'{"text": "a", "label": ' + b"{" * 100000 + b"\n"}),
    ("POST", "/v1/datasets", {"content": b'{"text": "a", "label": "x"}\n' * 2}),
    ("POST", "/v1/datasets", {"content": b"\xff\xfe"}),
    (
        "POST",
        "/v1/jobs",
        {"content": b"[" * 5000 + b"]" * 5000, "headers": {"content-type": "application/json"}},
    ),
]


@pytest.mark.parametrize(("method", "path", "kwargs"), CRAFTED)
def test_crafted_cursors_and_jsonl_bodies_are_4xx_json(
    method: str, path: str, kwargs: dict[str, object]
) -> None:
    with TestClient(app, raise_server_exceptions=False) as client:
        headers = {**AUTH, **kwargs.pop("headers", {})}  # type: ignore[dict-item]
        response = client.request(method, path, headers=headers, **kwargs)  # type: ignore[arg-type]
    assert 400 <= response.status_code < 500, (path, response.status_code, response.text[:300])
    assert response.headers["content-type"].startswith("application/json")
    assert "detail" in response.json()


def test_a_path_no_route_matches_under_openai_v1_answers_in_openai_shape() -> None:
    """Found by schemathesis: a model id holding a newline matched no route, not even the
    catch-all, and answered FastAPI's {"detail"} under /openai/v1."""
    with TestClient(app, raise_server_exceptions=False) as client:
        odd = client.get("/openai/v1/models/%0A0", headers=AUTH)
        plain = client.get("/no/such/path", headers=AUTH)
    assert odd.status_code == 404 and "message" in odd.json()["error"]
    assert plain.status_code == 404 and plain.json() == {"detail": "Not Found"}
