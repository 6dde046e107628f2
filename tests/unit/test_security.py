"""Keys, limits, webhook destinations and signatures, in-process on SQLite (and the real Redis for rates)."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import os
import socket
import sqlite3
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from api.app import create_app
from api.background.webhooks import WebhookDispatcher
from api.webhooks.policy import UnsafeDestination, check_url, resolve_destination
from db.jobs import Outcome, claim_job, create_job, finish_jobs
from db.models import ApiKey, Job, JobStatus, WebhookState
from db.session import get_sessionmaker, session_scope
from db.tenants import authenticate, create_key, ensure_tenant, hash_key, revoke_key
from migrations.run import upgrade
from tensorq.client import verify_signature
from tensorq.core.artifacts import ArtifactStore, UnsafePath
from tensorq.core.broker import celery_config
from tensorq.core.settings import Settings
from tensorq.core.signing import sign
from tests.helpers import create_api_key

REDIS_URL = os.environ.get("TENSORQ_TEST_REDIS_URL", "redis://127.0.0.1:6379/11")
EMBED = {"kind": "embed", "input": {"texts": ["a"]}}
LOOPBACK = [ipaddress.ip_network("127.0.0.0/8")]


def make_api(sqlite_url: str, **settings: Any) -> TestClient:
    options: dict[str, Any] = {"database_url": sqlite_url, "redis_url": "redis://127.0.0.1:1/0", **settings}
    return TestClient(create_app(Settings(**options), run_background=False), raise_server_exceptions=False)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def job_count(url: str) -> int:
    with get_sessionmaker(url)() as s:
        return s.scalar(select(func.count()).select_from(Job)) or 0


@pytest.fixture
def api(sqlite_url: str) -> Iterator[TestClient]:
    with make_api(sqlite_url) as client:
        yield client


def test_only_the_hash_of_a_key_is_stored_and_revocation_is_immediate(sqlite_url: str) -> None:
    with session_scope(sqlite_url) as session:
        row, key = create_key(session, "acme")
    assert key.startswith("tq_") and len(key) >= 40
    raw = sqlite3.connect(sqlite_url.removeprefix("sqlite:///")).execute("select * from api_keys").fetchall()
    assert key not in repr(raw) and hash_key(key) in repr(raw)
    with session_scope(sqlite_url) as session:
        assert authenticate(session, key) is not None
        assert authenticate(session, key[:-1] + ("A" if key[-1] != "A" else "B")) is None
        revoke_key(session, session.get(ApiKey, row.id))  # type: ignore[arg-type]
    with session_scope(sqlite_url) as session:
        assert authenticate(session, key) is None


def test_every_v1_route_demands_a_key_and_health_does_not(api: TestClient, sqlite_url: str) -> None:
    paths = api.get("/openapi.json").json()["paths"]
    v1 = [(method.upper(), path) for path, ops in paths.items() if path.startswith("/v1") for method in ops]
    assert len(v1) >= 15
    fill = {"job_id": "6a1b8ad2-9f3e-4f4e-9b8e-0c6f0c1d2e3f", "dataset_id": "6a1b8ad2-9f3e-4f4e-9b8e-0c6f0c1d2e3f",
            "key_id": "6a1b8ad2-9f3e-4f4e-9b8e-0c6f0c1d2e3f", "name": "m", "alias": "prod"}  # fmt: skip
    for method, template in v1:
        path = template.format(**fill)
        for headers in ({}, bearer("tq_not-a-key"), {"Authorization": "Basic dXNlcjpwYXNz"}):
            r = api.request(method, path, headers=headers, json=EMBED)
            assert r.status_code == 401, (method, path, headers, r.status_code, r.text)
            assert r.headers["www-authenticate"] == "Bearer" and "detail" in r.json()
    assert job_count(sqlite_url) == 0
    assert api.get("/healthz").status_code == 200


def test_a_revoked_key_is_refused_on_the_next_request(api: TestClient, sqlite_url: str) -> None:
    with session_scope(sqlite_url) as session:
        row, key = create_key(session, "acme")
    assert api.get("/v1/jobs", headers=bearer(key)).status_code == 200
    with session_scope(sqlite_url) as session:
        revoke_key(session, session.get(ApiKey, row.id))  # type: ignore[arg-type]
    assert api.get("/v1/jobs", headers=bearer(key)).status_code == 401


def test_admin_routes_need_an_admin_key_and_stay_in_the_tenant(api: TestClient, sqlite_url: str) -> None:
    user = create_api_key(sqlite_url, "acme")
    admin = create_api_key(sqlite_url, "acme", admin=True)
    other_admin = create_api_key(sqlite_url, "globex", admin=True)
    assert api.get("/v1/keys", headers=bearer(user)).status_code == 403
    assert api.get("/v1/webhook-secret", headers=bearer(user)).status_code == 403
    assert api.get("/v1/whoami", headers=bearer(user)).json()["tenant"] == "acme"

    made = api.post("/v1/keys", headers=bearer(admin), json={"label": "ci"})
    assert made.status_code == 201 and made.json()["key"].startswith("tq_")
    new_key = made.json()["key"]
    listed = api.get("/v1/keys", headers=bearer(admin)).json()["items"]
    assert {k["tenant"] for k in listed} == {"acme"} and len(listed) == 3
    assert new_key not in json.dumps(listed)  # listings never show keys

    # Another tenant's admin cannot see or revoke acme's keys: 404, as for a key that does not exist.
    assert api.post(f"/v1/keys/{made.json()['id']}/revoke", headers=bearer(other_admin)).status_code == 404
    assert api.get("/v1/jobs", headers=bearer(new_key)).status_code == 200
    assert api.post(f"/v1/keys/{made.json()['id']}/revoke", headers=bearer(admin)).status_code == 200
    assert api.get("/v1/jobs", headers=bearer(new_key)).status_code == 401

    first = api.get("/v1/webhook-secret", headers=bearer(admin)).json()["webhook_secret"]
    rotated = api.post("/v1/webhook-secret:rotate", headers=bearer(admin)).json()["webhook_secret"]
    assert first != rotated and first.startswith("whsec_")
    assert api.get("/v1/webhook-secret", headers=bearer(other_admin)).json()["webhook_secret"] not in (
        first,
        rotated,
    )


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080/hook",
        "http://localhost/hook",
        "http://api.localhost/hook",
        "http://10.0.0.5/hook",
        "http://192.168.1.10/hook",
        "http://172.16.0.1/hook",
        "http://169.254.169.254/latest/meta-data/",  # cloud metadata
        "http://[::1]/hook",
        "http://[fe80::1]/hook",
        "http://[::ffff:127.0.0.1]/hook",
        "http://0.0.0.0/hook",
        "http://100.64.0.1/hook",
        "http://user:secret@example.com/hook",
        "http://[64:ff9b::a9fe:a9fe]/hook",  # NAT64 of 169.254.169.254
        "http://[2002:a00:1::1]/hook",  # 6to4 of 10.0.0.1
    ],
)
def test_private_destinations_are_refused_at_submission(api: TestClient, sqlite_url: str, url: str) -> None:
    key = create_api_key(sqlite_url, "acme")
    r = api.post("/v1/jobs", headers=bearer(key), json={**EMBED, "webhook": url})
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"] == ["body", "webhook"]
    batch = api.post("/v1/jobs:batch", headers=bearer(key), json={"jobs": [EMBED, {**EMBED, "webhook": url}]})
    assert batch.status_code == 422 and batch.json()["detail"][0]["loc"] == ["body", "jobs", 1, "webhook"]
    assert job_count(sqlite_url) == 0


@pytest.mark.parametrize(
    "url", ["https://a..b.com/hook", "https://.example.com/hook", f"https://{'x' * 64}.example.com/hook"]
)
def test_host_names_that_cannot_be_looked_up_are_refused_at_submission(
    api: TestClient, sqlite_url: str, url: str
) -> None:
    """Valid URLs to the URL parser, but the resolver cannot encode them (an empty or over-long label)."""
    key = create_api_key(sqlite_url, "acme")
    r = api.post("/v1/jobs", headers=bearer(key), json={**EMBED, "webhook": url})
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"] == ["body", "webhook"] and "host name" in r.json()["detail"][0]["msg"]
    assert job_count(sqlite_url) == 0


def test_url_checks_and_the_allowlist() -> None:
    assert check_url("https://hooks.example.com/x?token=1", []) is None
    assert check_url("ftp://example.com/x", []) is not None
    assert check_url("http://127.0.0.1:9/x", LOOPBACK) is None
    assert check_url("http://10.0.0.1/x", LOOPBACK) is not None
    # Names are resolved at delivery, and the request goes to the checked address.
    url, host, sni = resolve_destination("http://localhost:8123/cb?x=1", LOOPBACK)
    assert url in ("http://127.0.0.1:8123/cb?x=1", "http://[::1]:8123/cb?x=1") and host == "localhost:8123"
    assert sni == "localhost"
    with pytest.raises(UnsafeDestination):
        resolve_destination("http://localhost:8123/cb", [])


@pytest.mark.parametrize(
    ("address", "inner"),
    [
        ("64:ff9b::a9fe:a9fe", "169.254.169.254"),  # NAT64 (RFC 6052): the last 32 bits
        ("64:ff9b::a00:1", "10.0.0.1"),
        ("64:ff9b::7f00:1", "127.0.0.1"),
        ("2002:a00:1::", "10.0.0.1"),  # 6to4 (RFC 3056): bits 16-48
        ("2002:a9fe:a9fe:1::1", "169.254.169.254"),
        ("::a00:1", "10.0.0.1"),  # IPv4-compatible (deprecated), routed to IPv4 by automatic tunnels
        ("64:ff9b:1::a00:1", None),  # local-use NAT64 (RFC 8215): the translator decides the layout
    ],
)
def test_ipv6_forms_that_carry_a_private_ipv4_address_are_refused(
    address: str, inner: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert check_url(f"http://[{address}]/x", []) is not None
    if inner is not None:  # the allowlist is read for the IPv4 address inside, as for ::ffff:a.b.c.d
        assert check_url(f"http://[{address}]/x", [ipaddress.ip_network(f"{inner}/32")]) is None
    # At delivery too: a DNS64 resolver answers names of private IPv4 hosts with such addresses.
    monkeypatch.setattr(
        socket, "getaddrinfo", lambda *a, **k: [(socket.AF_INET6, 1, 6, "", (address, 80, 0, 0))]
    )
    with pytest.raises(UnsafeDestination, match="non-public address"):
        resolve_destination("http://hooks.example.com/x", [])


def test_ipv6_forms_that_carry_a_public_ipv4_address_are_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    for address in ("64:ff9b::808:808", "2002:808:808::1", "2606:4700::1111"):
        assert check_url(f"http://[{address}]/x", []) is None
    monkeypatch.setattr(
        socket, "getaddrinfo", lambda *a, **k: [(socket.AF_INET6, 1, 6, "", ("64:ff9b::808:808", 443, 0, 0))]
    )
    url, host, _ = resolve_destination("https://hooks.example.com/x", [])
    assert url == "https://[64:ff9b::808:808]/x" and host == "hooks.example.com"


def test_signatures_verify_only_the_signed_body_and_a_fresh_timestamp() -> None:
    body = b'{"id": "x", "status": "succeeded"}'
    header = sign("whsec_abc", body, 1_700_000_000)
    expected = hmac.new(b"whsec_abc", b"1700000000." + body, hashlib.sha256).hexdigest()
    assert header == f"t=1700000000,v1={expected}"
    assert verify_signature("whsec_abc", body, header, now=1_700_000_100)
    assert not verify_signature("whsec_abc", body + b" ", header, now=1_700_000_100)
    assert not verify_signature("whsec_other", body, header, now=1_700_000_100)
    assert not verify_signature("whsec_abc", body, header, now=1_700_001_000)  # replayed later
    assert not verify_signature("whsec_abc", body, "garbage", now=1_700_000_100)


def test_per_request_limits_are_settings_and_name_the_field(sqlite_url: str) -> None:
    key = create_api_key(sqlite_url, "acme")
    with make_api(sqlite_url, max_texts_per_job=3, max_batch_jobs=2) as api:
        r = api.post("/v1/jobs", headers=bearer(key), json={"kind": "embed", "input": {"texts": ["a"] * 4}})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "input", "texts"]
        r = api.post("/v1/jobs:batch", headers=bearer(key), json={"jobs": [EMBED] * 3})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "jobs"]
        assert api.post("/v1/jobs:batch", headers=bearer(key), json={"jobs": [EMBED] * 2}).status_code == 202
    with make_api(sqlite_url, max_body_bytes=2048) as api:
        big = {"kind": "embed", "input": {"texts": ["x" * 3000]}}
        assert api.post("/v1/jobs", headers=bearer(key), json=big).status_code == 413
    assert job_count(sqlite_url) == 2


def test_the_list_page_size_is_a_setting(sqlite_url: str) -> None:
    key = create_api_key(sqlite_url, "acme")
    with make_api(sqlite_url) as api:
        assert api.post("/v1/jobs:batch", headers=bearer(key), json={"jobs": [EMBED] * 4}).status_code == 202
        assert api.get("/v1/jobs", headers=bearer(key), params={"limit": 200}).status_code == 200
        r = api.get("/v1/jobs", headers=bearer(key), params={"limit": 201})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", "limit"]
    with make_api(sqlite_url, list_page_max=3) as api:
        r = api.get("/v1/jobs", headers=bearer(key), params={"limit": 4})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", "limit"]
        assert r.json()["detail"][0]["ctx"] == {"le": "3"}
        page = api.get("/v1/jobs", headers=bearer(key), params={"limit": 3}).json()
        assert len(page["items"]) == 3 and page["next_cursor"]
        # Without a limit, the default page (50) is cut to the setting rather than refused.
        page = api.get("/v1/jobs", headers=bearer(key)).json()
        assert len(page["items"]) == 3 and page["next_cursor"]


def test_the_client_lists_every_job_where_pages_are_smaller_than_it_asks(sqlite_url: str) -> None:
    from tensorq.client import Client

    key = create_api_key(sqlite_url, "acme")
    with make_api(sqlite_url, list_page_max=3) as api:
        ids = api.post("/v1/jobs:batch", headers=bearer(key), json={"jobs": [EMBED] * 7}).json()["ids"]

        def through_api(request: httpx.Request) -> httpx.Response:
            r = api.request(request.method, request.url.raw_path.decode(), headers=request.headers)
            return httpx.Response(r.status_code, json=r.json())

        with Client("http://testserver", api_key=key, transport=httpx.MockTransport(through_api)) as tq:
            assert [job["id"] for job in tq.iter_jobs(page_size=50)] == ids[::-1]


def test_the_active_job_quota_is_per_tenant(sqlite_url: str) -> None:
    acme, globex = create_api_key(sqlite_url, "acme"), create_api_key(sqlite_url, "globex")
    with make_api(sqlite_url, tenant_max_active_jobs=3) as api:
        assert api.post("/v1/jobs:batch", headers=bearer(acme), json={"jobs": [EMBED] * 2}).status_code == 202
        over = api.post("/v1/jobs:batch", headers=bearer(acme), json={"jobs": [EMBED] * 2})
        assert (
            over.status_code == 429
            and int(over.headers["retry-after"]) >= 1
            and "quota" in over.json()["detail"]
        )
        last = api.post("/v1/jobs", headers=bearer(acme), json=EMBED)
        assert last.status_code == 202
        assert api.post("/v1/jobs", headers=bearer(acme), json=EMBED).status_code == 429
        assert api.post("/v1/jobs", headers=bearer(globex), json=EMBED).status_code == 202  # its own quota
        # A job that ends makes room at once: the API's cached count is re-read before refusing.
        assert api.post(f"/v1/jobs/{last.json()['id']}/cancel", headers=bearer(acme)).status_code == 200
        assert api.post("/v1/jobs", headers=bearer(acme), json=EMBED).status_code == 202
    assert job_count(sqlite_url) == 5


def test_the_submission_rate_is_a_token_bucket_per_tenant_in_redis(sqlite_url: str) -> None:
    redis.Redis.from_url(REDIS_URL).delete("tensorq:rate:acme", "tensorq:rate:globex")
    acme, globex = create_api_key(sqlite_url, "acme"), create_api_key(sqlite_url, "globex")
    with make_api(sqlite_url, redis_url=REDIS_URL, tenant_submit_rate=0.5, tenant_submit_burst=3) as api:
        assert api.post("/v1/jobs:batch", headers=bearer(acme), json={"jobs": [EMBED] * 3}).status_code == 202
        limited = api.post("/v1/jobs", headers=bearer(acme), json=EMBED)
        assert limited.status_code == 429 and 1 <= int(limited.headers["retry-after"]) <= 2, limited.headers
        assert "jobs/s" in limited.json()["detail"]
        too_big = api.post("/v1/jobs:batch", headers=bearer(globex), json={"jobs": [EMBED] * 4})
        assert too_big.status_code == 429 and "burst" in too_big.json()["detail"]
        assert api.post("/v1/jobs", headers=bearer(globex), json=EMBED).status_code == 202
    assert job_count(sqlite_url) == 4


def test_sqlite_upgrade_keeps_existing_rows_in_the_default_tenant(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    upgrade(url, "0003")
    db = sqlite3.connect(tmp_path / "old.db")
    db.execute("insert into models (name, created_at) values ('sentiment', '2026-01-01 00:00:00')")
    db.commit()
    db.close()
    upgrade(url)
    db = sqlite3.connect(tmp_path / "old.db")
    assert db.execute("select tenant, name from models").fetchall() == [("default", "sentiment")]
    # Names are unique per tenant now: another tenant may use the same one, the same tenant may not.
    db.execute("insert into models (tenant, name, created_at) values ('acme', 'sentiment', '2026-01-01')")
    with pytest.raises(sqlite3.IntegrityError):
        db.execute("insert into models (tenant, name, created_at) values ('acme', 'sentiment', '2026-01-01')")


@pytest.mark.parametrize(
    "relative",
    ["../x", "../../etc/passwd", "/etc/passwd", "a/../../x", "..\\x", "a\\..\\..\\x", "x\x00y", "", "//etc"],
)
def test_artifact_paths_cannot_escape_the_store(tmp_path: Path, relative: str) -> None:
    with pytest.raises(UnsafePath):
        ArtifactStore(tmp_path / "store").path(relative)


def test_encoded_and_linked_artifact_paths_stay_inside(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "store")
    # Percent-encoding is not decoded: "%2e%2e" is an odd but harmless name inside the store.
    assert store.path("%2e%2e/x").is_relative_to(store.root)
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "link").symlink_to(tmp_path)  # a link that leads out is refused too
    with pytest.raises(UnsafePath):
        store.path("link/secret")


@pytest.mark.parametrize(
    "path", ["/v1/datasets/..%2F..%2Fetc%2Fpasswd", "/v1/models/..%2F..%2Fetc", "/v1/models/%2Fetc"]
)
def test_traversal_in_route_parameters_is_refused(api: TestClient, sqlite_url: str, path: str) -> None:
    key = create_api_key(sqlite_url, "acme")
    assert api.get(path, headers=bearer(key)).status_code in (404, 422)


def test_celery_speaks_json_only() -> None:
    config = celery_config(Settings())
    assert config["accept_content"] == ["json"]
    assert config["task_serializer"] == config["result_serializer"] == "json"


def finished_job_with_webhook(url: str, hook: str, tenant: str = "acme") -> uuid.UUID:
    with session_scope(url) as session:
        ensure_tenant(session, tenant)
        job = create_job(
            session,
            tenant=tenant,
            kind="embed",
            params={"texts": ["a"]},
            queue="inference",
            max_attempts=3,
            webhook_url=hook,
        )
        job_id = job.id
    with session_scope(url) as session:
        claimed = claim_job(session, job_id, worker="w", device="cpu", lease_seconds=30)
        assert claimed is not None and claimed.claim_token is not None
        finish_jobs(session, [Outcome(job_id, claimed.claim_token, JobStatus.SUCCEEDED, result={"dim": 384})])
    return job_id


def test_webhooks_are_delivered_on_the_embedded_sqlite_default(sqlite_url: str) -> None:
    """The dispatcher's claim and bookkeeping on SQLite: delivered once, then nothing is due."""
    received: list[tuple[dict[str, str], bytes]] = []

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            received.append((dict(self.headers), self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    hook = f"http://127.0.0.1:{server.server_address[1]}/done"
    job_id = finished_job_with_webhook(sqlite_url, hook)
    with session_scope(sqlite_url) as session:
        secret = ensure_tenant(session, "acme").webhook_secret
    dispatcher = WebhookDispatcher(Settings(database_url=sqlite_url, webhook_allowed_networks=LOOPBACK))
    try:
        assert dispatcher.dispatch_due() == 1
        assert dispatcher.dispatch_due() == 0
    finally:
        dispatcher.pool.shutdown()
        dispatcher.transport.close()
        server.shutdown()
    [(headers, body)] = received
    assert json.loads(body)["id"] == str(job_id) and json.loads(body)["result"] == {"dim": 384}
    assert verify_signature(secret, body, headers["X-Tensorq-Signature"])
    with session_scope(sqlite_url) as session:
        row = session.get(Job, job_id)
        assert row is not None and row.webhook_state == WebhookState.DELIVERED and row.webhook_attempts == 1


def test_no_connection_is_reused_from_one_delivery_to_the_next(sqlite_url: str) -> None:
    """Deliveries go to a checked address: a kept TLS connection would be found by that address
    and could carry another host name's webhook over a certificate checked for the first."""
    clients: list[tuple[str, int]] = []

    class Receiver(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # would keep the connection open for the next request

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            clients.append(self.client_address)
            self.send_response(204)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    dispatcher = WebhookDispatcher(Settings(database_url=sqlite_url, webhook_allowed_networks=LOOPBACK))
    try:
        for host in ("127.0.0.1", "localhost"):
            finished_job_with_webhook(sqlite_url, f"http://{host}:{port}/hook")
            assert dispatcher.dispatch_due() == 1
            for future in list(dispatcher._in_flight):
                future.result(timeout=30)
    finally:
        dispatcher.stop()
        server.shutdown()
    assert len(clients) == 2 and clients[0] != clients[1], clients


def dispatch_once(url: str) -> int:
    dispatcher = WebhookDispatcher(Settings(database_url=url))
    try:
        return dispatcher.dispatch_due()
    finally:
        dispatcher.stop()  # waits for the deliveries it started


def webhook_of(url: str, job_id: uuid.UUID) -> Job:
    with session_scope(url) as session:
        row = session.get(Job, job_id)
        assert row is not None
        return row


def test_a_stored_url_whose_host_cannot_be_looked_up_fails_for_good(sqlite_url: str) -> None:
    """Such URLs were accepted before the submission check refused them: the delivery must end."""
    job_id = finished_job_with_webhook(sqlite_url, "https://a..b.com/hook")
    assert dispatch_once(sqlite_url) == 1
    row = webhook_of(sqlite_url, job_id)
    assert row.webhook_state == WebhookState.FAILED and row.webhook_attempts == 1
    assert row.webhook_error is not None and "host name" in row.webhook_error
    assert dispatch_once(sqlite_url) == 0


def test_an_unexpected_error_in_a_delivery_is_recorded_as_a_failed_attempt(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever a delivery raises, the attempt is counted and retried later, never left unrecorded."""

    def broken_resolver(*args: object, **kwargs: object) -> list[Any]:
        raise UnicodeError("label empty or too long")  # what a name the checks missed used to raise

    monkeypatch.setattr(socket, "getaddrinfo", broken_resolver)
    job_id = finished_job_with_webhook(sqlite_url, "https://hooks.example.com/hook?token=abc")
    assert dispatch_once(sqlite_url) == 1
    row = webhook_of(sqlite_url, job_id)
    assert row.webhook_state == WebhookState.PENDING and row.webhook_attempts == 1
    assert row.webhook_error == "UnicodeError posting to https://hooks.example.com"
    assert row.webhook_next_at is not None
    assert dispatch_once(sqlite_url) == 0  # the retry waits for its backoff


class SlowReceivers(BaseHTTPRequestHandler):
    """Answers that take their time. /hold answers once /other has arrived; /trickle-status and
    /trickle-body send a byte every 0.2 s until the client hangs up; /endless-<code> sends a 64 MiB
    body as fast as it can. Each notes when its request arrived, when it ended, and whether the
    client hung up before the answer was complete."""

    protocol_version = "HTTP/1.1"
    arrived: dict[str, threading.Event]
    ended: dict[str, threading.Event]
    cut: set[str]
    release: threading.Event  # set when a test ends, so that no handler outlives it
    held_until_other: list[bool]

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.arrived.setdefault(self.path, threading.Event()).set()
        try:
            if self.path == "/hold":
                other = self.arrived.setdefault("/other", threading.Event())
                self.held_until_other.append(other.wait(20))
            if self.path.startswith("/trickle"):
                self._trickle(status_line=self.path == "/trickle-status")
            elif self.path.startswith("/endless-"):
                self._endless(int(self.path.rpartition("-")[2]))
            else:
                self.send_response(204)
                self.send_header("Content-Length", "0")
                self.end_headers()
        except (BrokenPipeError, ConnectionResetError):
            self.cut.add(self.path)
            self.close_connection = True
        finally:
            self.ended.setdefault(self.path, threading.Event()).set()

    def _trickle(self, *, status_line: bool) -> None:
        if status_line:
            self.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
        else:
            self.wfile.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        while not self.release.wait(0.2):
            self.wfile.write(b"a" if status_line else b"1\r\na\r\n")
            self.wfile.flush()
        self.close_connection = True

    def _endless(self, code: int) -> None:
        self.send_response(code)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        chunk = b"%x\r\n" % (64 << 10) + b"x" * (64 << 10) + b"\r\n"
        for _ in range(1024):
            self.wfile.write(chunk)
        self.wfile.write(b"0\r\n\r\n")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def slow_receivers() -> Iterator[tuple[str, type[SlowReceivers]]]:
    handler = type(
        "Receivers",
        (SlowReceivers,),
        {"arrived": {}, "ended": {}, "cut": set(), "release": threading.Event(), "held_until_other": []},
    )
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        handler.release.set()
        server.shutdown()


def wait_for(event: dict[str, threading.Event], path: str, what: str) -> None:
    assert event.setdefault(path, threading.Event()).wait(30), what


def stop_within(dispatcher: WebhookDispatcher, seconds: float) -> None:
    stopper = threading.Thread(target=dispatcher.stop, daemon=True)
    stopper.start()
    stopper.join(seconds)
    assert not stopper.is_alive(), f"stop() still waiting after {seconds} s"


def test_a_slow_receiver_does_not_hold_up_other_tenants_webhooks(
    sqlite_url: str, slow_receivers: tuple[str, type[SlowReceivers]]
) -> None:
    base, receivers = slow_receivers
    dispatcher = WebhookDispatcher(
        Settings(database_url=sqlite_url, webhook_allowed_networks=LOOPBACK, webhook_timeout_seconds=30)
    )
    dispatcher.start()
    try:
        held = finished_job_with_webhook(sqlite_url, f"{base}/hold", tenant="evil")
        dispatcher.wake()
        wait_for(receivers.arrived, "/hold", "the first webhook was sent")
        other = finished_job_with_webhook(sqlite_url, f"{base}/other", tenant="globex")
        dispatcher.wake()
        wait_for(receivers.arrived, "/other", "the other tenant's webhook was sent")
    finally:
        stop_within(dispatcher, 60)
    # The receiver holding its answer saw the other webhook arrive meanwhile, not after it answered.
    assert receivers.held_until_other == [True]
    for job_id in (held, other):
        row = webhook_of(sqlite_url, job_id)
        assert row.webhook_state == WebhookState.DELIVERED and row.webhook_attempts == 1


@pytest.mark.parametrize("where", ["status", "body"])
def test_a_trickling_receiver_is_cut_at_the_delivery_budget_and_stop_does_not_wait_longer(
    sqlite_url: str, slow_receivers: tuple[str, type[SlowReceivers]], where: str
) -> None:
    """Each byte comes well within the timeout; the timeout bounds the whole delivery all the same."""
    base, receivers = slow_receivers
    dispatcher = WebhookDispatcher(
        Settings(database_url=sqlite_url, webhook_allowed_networks=LOOPBACK, webhook_timeout_seconds=1)
    )
    job_id = finished_job_with_webhook(sqlite_url, f"{base}/trickle-{where}")
    dispatcher.start()
    wait_for(receivers.arrived, f"/trickle-{where}", "the webhook was sent")
    stop_within(dispatcher, 30)  # the trickle goes on until the test ends: stop() must not wait for it
    wait_for(receivers.ended, f"/trickle-{where}", "the answer ended")
    assert receivers.cut == {f"/trickle-{where}"}
    row = webhook_of(sqlite_url, job_id)
    assert row.webhook_attempts == 1
    if where == "status":
        assert row.webhook_state == WebhookState.PENDING and row.webhook_next_at is not None
        assert row.webhook_error == "ReadTimeout posting to http://127.0.0.1"
    else:  # the status line is the receiver's answer; the rest of the body is not needed
        assert row.webhook_state == WebhookState.DELIVERED and row.webhook_error is None


@pytest.mark.parametrize("code", [200, 500])
def test_an_endless_answer_is_not_read_to_its_end(
    sqlite_url: str, slow_receivers: tuple[str, type[SlowReceivers]], code: int
) -> None:
    base, receivers = slow_receivers
    job_id = finished_job_with_webhook(sqlite_url, f"{base}/endless-{code}")
    dispatcher = WebhookDispatcher(Settings(database_url=sqlite_url, webhook_allowed_networks=LOOPBACK))
    assert dispatcher.dispatch_due() == 1
    stop_within(dispatcher, 30)
    wait_for(receivers.ended, f"/endless-{code}", "the answer ended")
    assert receivers.cut == {f"/endless-{code}"}, "the dispatcher read all 64 MiB"
    row = webhook_of(sqlite_url, job_id)
    assert row.webhook_attempts == 1
    if code == 200:
        assert row.webhook_state == WebhookState.DELIVERED and row.webhook_error is None
    else:
        assert row.webhook_state == WebhookState.PENDING
        assert row.webhook_error == "HTTP 500 from http://127.0.0.1"
