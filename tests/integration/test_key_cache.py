"""API keys cached in each API process (api/keycache.py): a revocation through one process is
refused at once there and by another API process within 100 ms (the issue's bound)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest

from tests.helpers import Proc, Service, free_port, wait_until

pytestmark = pytest.mark.integration

REVOCATION_BOUND_S = 0.100  # issue #23: revocation reaches every API process within 100 ms


@pytest.fixture
def second_api(service: Service, tmp_path: Path) -> Iterator[str]:
    """Another API process of the same service (same database and Redis)."""
    port = free_port()
    proc = Proc("api-b", ["api", "--port", str(port)], service.env, tmp_path)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert proc.alive(), proc.log()
        try:
            return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(ready, timeout=60, interval=0.2, what="the second API process")
    yield url
    proc.stop()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def new_key(admin: httpx.Client) -> tuple[str, str]:
    made = admin.post("/v1/keys", json={"label": "cache test"})
    assert made.status_code in (200, 201), made.text
    return made.json()["key"], made.json()["id"]


def revoke_behind_the_apis_back(pg_url: str, key_id: str) -> None:
    with psycopg.connect(pg_url) as conn:
        conn.execute("UPDATE api_keys SET revoked_at = now() WHERE id = %s", (key_id,))


def test_a_key_revoked_through_one_api_process_is_refused_by_another_within_100_ms(
    service: Service, second_api: str, pg_url: str
) -> None:
    with service.client() as admin, httpx.Client(base_url=second_api, timeout=10) as b:

        def cache_in_use() -> bool:
            # A key revoked in SQL alone (no message) still works while cached: proof that B answers
            # from its cache, so the refusal below came from the revocation message, not a lookup.
            key, key_id = new_key(admin)
            assert b.get("/v1/whoami", headers=bearer(key)).status_code == 200
            revoke_behind_the_apis_back(pg_url, key_id)
            return b.get("/v1/whoami", headers=bearer(key)).status_code == 200

        wait_until(cache_in_use, timeout=30, interval=0.1, what="the second process's key cache")

        key, key_id = new_key(admin)
        with service.client(key) as a:
            assert a.get("/v1/whoami").status_code == 200
            assert b.get("/v1/whoami", headers=bearer(key)).status_code == 200
            assert b.get("/v1/whoami", headers=bearer(key)).status_code == 200  # cached now
            assert admin.post(f"/v1/keys/{key_id}/revoke").status_code == 200
            revoked = time.perf_counter()
            # In the process that revoked it: refused on the very next request.
            assert a.get("/v1/whoami").status_code == 401
            while (r := b.get("/v1/whoami", headers=bearer(key))).status_code == 200:
                assert time.perf_counter() - revoked < 5, "the revocation never reached the second process"
            refused = time.perf_counter() - revoked
        assert r.status_code == 401 and r.json() == {"detail": "unknown or revoked API key"}
        print(f"second API process refused the key {refused * 1000:.1f} ms after the revocation")
        assert refused <= REVOCATION_BOUND_S, f"refused {refused * 1000:.1f} ms after the revocation"
