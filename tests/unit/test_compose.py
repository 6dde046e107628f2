"""compose.yaml and the Dockerfile, checked by parsing (no Docker engine runs here)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import typer
import yaml

from tensorq.cli.main import app
from tensorq.core.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def resolve(argv: list[str]) -> Any:
    """Walk `tensorq a b --opt x` through the real CLI; fail on an unknown command or option."""
    assert argv[0] == "tensorq", argv
    cmd: Any = typer.main.get_command(app)
    args = argv[1:]
    # typer ships its own click; duck-type the group instead of naming its class.
    while hasattr(cmd, "list_commands") and args:
        sub = cmd.get_command(None, args[0])
        assert sub is not None, f"no such command: {argv}"
        cmd, args = sub, args[1:]
    known = {opt for p in cmd.params for opt in getattr(p, "opts", [])}
    for arg in args:
        if arg.startswith("--"):
            assert arg.split("=")[0] in known, f"{argv}: unknown option {arg}"
    return cmd


def test_every_service_command_is_a_real_tensorq_subcommand() -> None:
    services = compose()["services"]
    ours = [s for s in services.values() if s.get("image", "").startswith("tensorq")]
    assert {"migrate", "api", "worker", "worker-cpu", "flower"} <= set(services)
    assert len(ours) >= 5
    for svc in ours:
        resolve(svc["command"])


def test_every_tensorq_variable_is_a_setting() -> None:
    text = (ROOT / "compose.yaml").read_text()
    names = set(re.findall(r"\b(TENSORQ_[A-Z0-9_]+)\s*:", text))
    assert "TENSORQ_DATABASE_URL" in names and "TENSORQ_REDIS_URL" in names
    for name in names:
        assert name.removeprefix("TENSORQ_").lower() in Settings.model_fields, name


def test_gpu_reservation_healthchecks_volumes_and_protected_flower() -> None:
    doc = compose()
    services = doc["services"]
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    for name in ("redis", "postgres", "api", "flower"):
        assert "healthcheck" in services[name], name
    assert {"pg-data", "artifacts", "redis-data"} <= set(doc["volumes"])
    assert "pg-data:/var/lib/postgresql/data" in services["postgres"]["volumes"]
    assert services["flower"]["environment"]["TENSORQ_FLOWER_BASIC_AUTH"].startswith(
        "${TENSORQ_FLOWER_BASIC_AUTH:?"
    )
    # Encryption at rest: every tensorq container gets the master key, which has no default.
    for name in ("migrate", "api", "worker", "worker-cpu", "flower"):
        assert services[name]["environment"]["TENSORQ_MASTER_KEY"].startswith("${TENSORQ_MASTER_KEY:?"), name
    assert services["migrate"]["command"] == ["tensorq", "db", "upgrade"]
    assert services["api"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"


def test_dockerfile_installs_pinned_torch_then_the_project() -> None:
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    runs = [line for line in lines if line.startswith("RUN")]
    assert "torch==2.13.0" in runs[0]
    assert any('pip install ".[all]"' in r for r in runs[1:])  # server and worker: the image runs both
    for pkg in ("api", "worker", "tasks", "db", "migrations", "tensorq"):
        assert any(line.startswith(f"COPY {pkg} ") for line in lines), pkg


def test_workers_keep_the_shared_environment_and_expose_their_metrics_to_the_network() -> None:
    services = compose()["services"]
    for name in ("worker", "worker-cpu"):
        env = services[name]["environment"]
        assert env["TENSORQ_DATABASE_URL"] == services["api"]["environment"]["TENSORQ_DATABASE_URL"], name
        assert env["TENSORQ_REDIS_URL"] == services["api"]["environment"]["TENSORQ_REDIS_URL"], name
        # Inside a container, 127.0.0.1 is unreachable for a Prometheus in another one.
        assert env["TENSORQ_WORKER_METRICS_HOST"] == "0.0.0.0", name
