"""Settings, device plans, the registry and the model cache: plain functions."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from tasks.embed import EmbedParams
from tasks.registry import all_kinds, get_kind
from tasks.texts import MAX_TEXT_CHARS, MAX_TEXTS
from tensorq.cli.main import app
from tensorq.core.broker import queue_for, queues_for_worker
from tensorq.core.settings import Settings
from worker.devices import detect_gpu_count, plan_devices
from worker.model_cache import ModelCache


def test_settings_read_prefixed_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TENSORQ_DATABASE_URL", "postgresql://u@h:5432/d")
    monkeypatch.setenv("TENSORQ_MAX_ATTEMPTS", "7")
    monkeypatch.setenv("DATABASE_URL", "sqlite:///wrong.db")
    s = Settings()
    assert s.sqlalchemy_url == "postgresql+psycopg://u@h:5432/d"
    assert s.max_attempts == 7


def test_settings_default_is_sqlite_under_var(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("TENSORQ_DATABASE_URL", "TENSORQ_ARTIFACT_DIR"):
        monkeypatch.delenv(name, raising=False)
    s = Settings()
    assert s.database_url.startswith("sqlite:///./var/")
    assert s.artifact_dir.parts[0] == "var"


def test_device_plans() -> None:
    assert [p.device for p in plan_devices("none", 4)] == ["cpu"]
    assert [p.device for p in plan_devices("all", 0)] == ["cpu"]
    assert [(p.node, p.device, p.cuda_visible_devices) for p in plan_devices("all", 2)] == [
        ("gpu0", "cuda:0", "0"),
        ("gpu1", "cuda:1", "1"),
    ]
    assert [p.cuda_visible_devices for p in plan_devices("0,2", 3)] == ["0", "2"]
    assert plan_devices("none", 0)[0].cuda_visible_devices == ""
    for bad in ("3", "x", "0,,1", "-1"):
        with pytest.raises(ValueError):
            plan_devices(bad, 3)


def test_registry_finds_embed_with_readable_task_name() -> None:
    assert "embed" in all_kinds()
    assert get_kind("embed").task_name == "tensorq.embed"
    with pytest.raises(KeyError):
        get_kind("nope")


@pytest.mark.parametrize(
    "params",
    [
        {"texts": []},
        {"texts": [""]},
        {"texts": ["x" * (MAX_TEXT_CHARS + 1)]},
        {"texts": ["a"] * (MAX_TEXTS + 1)},
        {"texts": "not a list"},
        {"texts": [1]},
        {"texts": ["a"], "extra": 1},
    ],
)
def test_embed_params_reject(params: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        EmbedParams.model_validate(params)


class Blob:
    def __init__(self, n: int) -> None:
        self.n = n

    def nbytes(self) -> int:
        return self.n


def test_model_cache_reuses_and_evicts_least_recently_used() -> None:
    cache = ModelCache(budget_bytes=250)
    loads: list[str] = []

    def loader(key: str, size: int = 100):  # type: ignore[no-untyped-def]
        return lambda: loads.append(key) or Blob(size)

    a = cache.get("a", loader("a"))
    assert cache.get("a", loader("a")) is a
    cache.get("b", loader("b"))
    cache.get("a", loader("a"))  # a is now the most recent
    cache.get("c", loader("c"))  # 300 > 250: evict b
    assert loads == ["a", "b", "c"]
    assert cache.keys() == ["a", "c"]
    assert (cache.stats.hits, cache.stats.misses, cache.stats.evictions) == (2, 3, 1)
    big = cache.get("big", loader("big", 1000))  # alone over budget: kept, the rest evicted
    assert cache.keys() == ["big"] and big.n == 1000


def test_gpu_detection_and_selection_through_the_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stand-in nvidia-smi listing two GPUs: the launcher counts them without touching CUDA."""
    fake = tmp_path / "nvidia-smi"
    fake.write_text(
        "#!/bin/sh\necho 'GPU 0: NVIDIA H100 (UUID: GPU-a)'\necho 'GPU 1: NVIDIA H100 (UUID: GPU-b)'\n"
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    assert detect_gpu_count() == 2
    assert [p.node for p in plan_devices("all", detect_gpu_count())] == ["gpu0", "gpu1"]
    result = CliRunner().invoke(app, ["worker", "--gpus", "5"])
    assert result.exit_code == 2 and "GPU 5 does not exist (2 found)" in result.output


def test_queues_fit_the_device() -> None:
    assert queue_for("training") == "training"
    assert queue_for("inference", "gpu") == "gpu.inference"
    assert set(queues_for_worker(on_gpu=True)) == {"inference", "training", "gpu.inference", "gpu.training"}
    assert set(queues_for_worker(on_gpu=False)) == {"inference", "training", "cpu.inference", "cpu.training"}


# Built from two parts so this guard is not itself a match for the searches it stands beside.
REMOTE_CODE = "trust_remote_code" + "=True"


def test_no_project_code_loads_models_with_remote_code() -> None:
    root = Path(__file__).resolve().parents[2]
    offenders = [
        path
        for package in ("api", "db", "tasks", "tensorq", "worker")
        for path in (root / package).rglob("*.py")
        if REMOTE_CODE in path.read_text().replace(" ", "")
    ]
    assert offenders == []


def test_a_wait_for_the_end_is_not_woken_by_a_running_job() -> None:
    import asyncio
    import json
    import uuid

    from tensorq.core.events import EventListener

    listener = EventListener("redis://unused")
    job_id = uuid.uuid4()

    async def check() -> None:
        with listener.watch(job_id) as any_change, listener.watch(job_id, end_only=True) as end:
            listener._dispatch(json.dumps({"ids": [str(job_id)], "running": True}).encode())
            assert any_change.is_set() and not end.is_set()
            any_change.clear()
            listener._dispatch(json.dumps({"ids": [str(job_id)], "finished": []}).encode())
            assert any_change.is_set() and end.is_set()
        assert not listener._waiters and not listener._end_waiters  # nothing left behind

    asyncio.run(check())


def test_only_final_job_events_mark_messages_as_done() -> None:
    """The worker's main process acknowledges a message without running it only when every job
    it names was reported in a final state (a cancel request for a running job is not one)."""
    import json
    import uuid

    from worker.finished import FinishedJobs

    finished = FinishedJobs("redis://127.0.0.1:1/0")  # never started: events are fed by hand
    a, b, c = (str(uuid.uuid4()) for _ in range(3))
    finished._on_event(json.dumps({"ids": [a, b], "running": False, "final": True}))
    finished._on_event(json.dumps({"ids": [c], "running": False, "final": False}))  # cancel requested
    finished._on_event(json.dumps({"ids": [c], "running": True}))  # claimed
    finished._on_event(b"not json")
    assert finished.hold_all([a]) and finished.hold_all([b, a])
    assert not finished.hold_all([a, c]) and not finished.hold_all([c]) and not finished.hold_all([])


def test_tensorq_up_shows_the_database_url_without_its_password() -> None:
    from tensorq.cli.embedded import without_password

    shown = without_password("postgresql+psycopg://tq:s3cr3t@db.internal:5432/tensorq")
    assert "s3cr3t" not in shown and shown.startswith("postgresql+psycopg://tq:***@db.internal:5432/")
    assert without_password("sqlite:///var/tensorq.db") == "sqlite:///var/tensorq.db"
