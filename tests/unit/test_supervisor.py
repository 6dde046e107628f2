"""`tensorq worker --gpus all` on a multi-GPU host: one child per GPU, kept running, each stop
signal passed on once (a second SIGINT is a cold shutdown to Celery, killing running jobs)."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from tensorq.cli.supervisor import Command, RestartPolicy, Supervisor
from tests.helpers import wait_until

# Stands in for `tensorq worker --gpus <name>`: logs each SIGINT; "crashy" dies on its first run.
FAKE_WORKER = textwrap.dedent(
    """
    import pathlib, signal, sys, time
    name, root = sys.argv[1], pathlib.Path(sys.argv[2])
    log = root / f"{name}.signals"
    if name == "crashy" and not (root / "crashed").exists():
        (root / "crashed").touch()
        sys.exit(3)
    signal.signal(signal.SIGINT, lambda *_: log.open("a").write("INT\\n"))
    (root / f"{name}.ready").touch()
    while not log.exists():
        time.sleep(0.05)
    time.sleep(0.5)  # a second signal, were one sent, would arrive and be logged now
    """
)


def test_a_crashed_gpu_worker_is_restarted_and_ctrl_c_reaches_each_worker_once(tmp_path: Path) -> None:
    script = tmp_path / "fake_worker.py"
    script.write_text(FAKE_WORKER)
    commands = {name: [sys.executable, str(script), name, str(tmp_path)] for name in ("steady", "crashy")}
    run = "import json, sys; from tensorq.cli.supervisor import Supervisor; sys.exit(Supervisor(json.loads(sys.argv[1])).run())"
    # Its own session, like a shell's foreground job: a Ctrl-C goes to the whole process group.
    supervisor = subprocess.Popen([sys.executable, "-c", run, json.dumps(commands)], start_new_session=True)
    try:
        wait_until(
            lambda: (tmp_path / "steady.ready").exists() and (tmp_path / "crashy.ready").exists(),
            timeout=30,
            what="both workers up, the crashed one started again",
        )
        os.killpg(supervisor.pid, signal.SIGINT)  # Ctrl-C at the terminal
        assert supervisor.wait(timeout=30) == 0
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
    for name in ("steady", "crashy"):
        assert (tmp_path / f"{name}.signals").read_text() == "INT\n", name


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


SENT: list[tuple[int, int]] = []  # (pid, signal) in the order sent


class FakeChild:
    """A process that exits by itself `lives` seconds after it started (never, for None)."""

    def __init__(self, clock: FakeClock, pid: int, lives: float | None) -> None:
        self.clock, self.pid, self.started = clock, pid, clock.now
        self.dies_at = None if lives is None else clock.now + lives
        self.code: int | None = None
        self.signals: list[int] = []

    def poll(self) -> int | None:
        if self.code is None and self.dies_at is not None and self.clock.now >= self.dies_at:
            self.code = -9
        return self.code

    def send_signal(self, sig: int) -> None:
        self.signals.append(sig)
        SENT.append((self.pid, sig))
        if self.code is None:
            self.code = -sig if sig == signal.SIGKILL else 0


def fake_supervisor(
    lifetimes: dict[str, list[float | None]], **kwargs: Any
) -> tuple[Supervisor, FakeClock, list[str], list[FakeChild]]:
    """A Supervisor on a fake clock: each name's successive children live the given seconds."""
    clock = FakeClock()
    lines: list[str] = []
    spawned: list[FakeChild] = []
    queues = {name: iter(lives) for name, lives in lifetimes.items()}
    commands = {name: Command([name]) for name in lifetimes}

    def spawn(command: Command) -> FakeChild:
        child = FakeChild(clock, 1000 + len(spawned), next(queues[command.argv[0]]))
        spawned.append(child)
        return child

    supervisor = Supervisor(
        commands,
        label=str,
        announce=lambda line, _error: lines.append(line),
        spawn=spawn,
        cleanup=lambda _pgid: None,
        clock=clock,
        sleep=clock.sleep,
        **kwargs,
    )
    return supervisor, clock, lines, spawned


def run_for(supervisor: Supervisor, clock: FakeClock, seconds: float) -> None:
    end = clock.now + seconds
    while clock.now < end:
        supervisor.step()
        clock.sleep(0.1)


def test_restart_policy_doubles_to_a_cap_and_starts_over_after_a_healthy_run() -> None:
    policy = RestartPolicy(first=1.0, cap=60.0, healthy_after=60.0)
    assert [policy.delay_after(ran_for=0.5) for _ in range(8)] == [1, 2, 4, 8, 16, 32, 60, 60]
    assert policy.delay_after(ran_for=59.9) == 60  # not yet healthy
    assert policy.delay_after(ran_for=60.0) == 1  # ran a minute: starts over
    assert policy.delay_after(ran_for=0.1) == 2


def test_a_crash_loop_backs_off_and_a_healthy_run_resets_it_without_real_sleeps() -> None:
    # "worker" crashes 0.5 s after each start, five times, then runs 90 s, crashes, and then runs on.
    supervisor, clock, lines, spawned = fake_supervisor(
        {"worker": [0.5] * 5 + [90.0, None], "api": [None]}, stop_grace_s=30
    )
    for name in supervisor.commands:
        supervisor.start(name)
    run_for(supervisor, clock, 400)
    assert [(n, d) for n, _, d in supervisor.restarts] == [("worker", d) for d in (1, 2, 4, 8, 16, 1)]
    assert lines[:2] == ["worker exited (code -9); restarting in 1.0s", "worker restarted (pid 1002)"]
    assert lines[-2:] == [
        "worker exited (code -9); restarting in 1.0s",
        f"worker restarted (pid {spawned[-1].pid})",
    ]
    assert len(spawned) == 8  # the API's one child, the worker's first and six restarts
    # Each restart came its delay after the crash (within two 0.1 s ticks): 0.5 s + 1 s, + 0.5 s + 2 s, ...
    workers = [c for c in spawned if c is not spawned[1]]
    gaps = [b.started - a.started for a, b in itertools.pairwise(workers)]
    assert gaps == pytest.approx([1.5, 2.5, 4.5, 8.5, 16.5, 91.0], abs=0.25)


def test_a_stop_signal_stops_in_reverse_order_and_cancels_a_pending_restart() -> None:
    supervisor, clock, lines, spawned = fake_supervisor(
        {"redis": [None], "worker": [0.5, None], "api": [None]}, stop_grace_s=30
    )
    for name in supervisor.commands:
        supervisor.start(name)
    run_for(supervisor, clock, 0.7)  # the worker died; its restart is due at 1.5 s
    assert supervisor.due
    supervisor.on_signal(signal.SIGINT)
    assert supervisor.supervise() == 0
    run_for(supervisor, clock, 5)
    redis, worker, api = spawned
    assert len(spawned) == 3 and not supervisor.due  # nothing started during the shutdown
    # The API before the Redis it uses; the dead worker gets nothing.
    assert SENT[-2:] == [(api.pid, signal.SIGTERM), (redis.pid, signal.SIGTERM)] and worker.signals == []
    assert lines == ["worker exited (code -9); restarting in 1.0s"]


def test_a_second_stop_signal_kills_what_is_left_at_once() -> None:
    supervisor, clock, _lines, spawned = fake_supervisor({"redis": [None], "worker": [None]}, stop_grace_s=30)
    for name in supervisor.commands:
        supervisor.start(name)
    redis, worker = spawned
    worker.send_signal = lambda sig: (worker.signals.append(sig), supervisor.on_signal(signal.SIGINT))  # type: ignore[method-assign]
    supervisor.on_signal(signal.SIGINT)
    supervisor.step()  # the worker ignores SIGTERM, and a second Ctrl-C comes
    assert worker.signals == [signal.SIGTERM, signal.SIGKILL] and redis.signals == [signal.SIGKILL]
    assert clock.now < 1  # no 30 s grace waited out
