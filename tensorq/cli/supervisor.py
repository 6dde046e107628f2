"""Keeps child processes running: one worker per GPU (`tensorq worker --gpus all`), and every part
of the embedded stack (`tensorq up`: redis-server, worker, API, Flower).

Each child runs in its own session, so a Ctrl-C at the terminal reaches only this process, which
passes each signal on exactly once: Celery reads a second SIGINT as a cold shutdown that kills
running jobs, and a child in our process group would get the terminal's copy besides ours.
A child that dies while we are not stopping is started again after a delay (`RestartPolicy`: 1 s,
doubling up to 60 s, back to 1 s once it had run a minute), so one crash does not leave a GPU idle
or the embedded stack without its broker; a crash loop costs a start a minute, not a busy loop.
Whatever the dead child left in its process group (a pool process, were one to outlive its
parent) is killed before the new one starts. Nothing is started again once a stop signal came.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Protocol

log = logging.getLogger(__name__)

FIRST_DELAY_S = 1.0
MAX_DELAY_S = 60.0
HEALTHY_AFTER_S = 60.0
TICK_S = 0.1


class RestartPolicy:
    """The delay before one child starts again: `first`, doubling up to `cap` while it keeps dying;
    a child that ran `healthy_after` seconds or more before it died starts over at `first`."""

    def __init__(
        self, first: float = FIRST_DELAY_S, cap: float = MAX_DELAY_S, healthy_after: float = HEALTHY_AFTER_S
    ) -> None:
        self.first, self.cap, self.healthy_after = first, cap, healthy_after
        self.next_delay = first

    def delay_after(self, ran_for: float) -> float:
        if ran_for >= self.healthy_after:
            self.next_delay = self.first
        delay = self.next_delay
        self.next_delay = min(self.cap, delay * 2)
        return delay


@dataclass(frozen=True)
class Command:
    argv: Sequence[str]
    env: Mapping[str, str] | None = None  # None: this process's environment
    quiet: bool = False  # its stdout to /dev/null (redis-server's banner and log)


class Child(Protocol):
    """What the supervisor needs of a started process (a `subprocess.Popen`)."""

    @property
    def pid(self) -> int: ...

    def poll(self) -> int | None: ...

    def send_signal(self, sig: int) -> None: ...


def popen(command: Command) -> Child:
    stdout: int | IO[bytes] | None = subprocess.DEVNULL if command.quiet else None
    return subprocess.Popen(
        list(command.argv),
        env=dict(command.env) if command.env is not None else None,
        stdout=stdout,
        start_new_session=True,
    )


def kill_group(pgid: int) -> None:
    """SIGKILL what is left in a child's process group (its session, see `popen`)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


class Supervisor:
    """Starts each command and keeps it running until a stop signal.

    `stop_grace_s=None` (the GPU workers): each stop signal is passed on to every child as it came,
    and `run` returns the highest exit code once all have exited. A number (`tensorq up`): on the
    first stop signal the children get SIGTERM one at a time, the last started first (Flower, the
    API and the worker before the Redis they use), each given `stop_grace_s` seconds before SIGKILL;
    a second stop signal SIGKILLs what is left.
    """

    def __init__(
        self,
        commands: Mapping[str, Sequence[str] | Command],
        *,
        label: Callable[[str], str] = lambda name: f"worker for GPU {name}",
        announce: Callable[[str, bool], None] | None = None,
        stop_grace_s: float | None = None,
        spawn: Callable[[Command], Child] = popen,
        cleanup: Callable[[int], None] = kill_group,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.commands = {n: c if isinstance(c, Command) else Command(c) for n, c in commands.items()}
        self.label = label
        self.announce = announce or (
            lambda line, error: log.log(logging.ERROR if error else logging.INFO, line)
        )
        self.stop_grace_s = stop_grace_s
        self.spawn, self.cleanup, self.clock, self.sleep = spawn, cleanup, clock, sleep
        self.policies = {name: RestartPolicy() for name in self.commands}
        self.children: dict[str, Child] = {}
        self.started: dict[str, float] = {}
        self.due: dict[str, float] = {}  # a dead child's name -> when it starts again
        self.codes: dict[str, int] = {}
        self.restarts: list[tuple[str, int, float]] = []  # (name, exit code, delay), for tests and logs
        self.exited: set[str] = set()  # names whose current child has exited and been seen to
        self.signals: list[int] = []  # received, not yet acted on
        self.stopping = False

    # Signals: the handler only records them; `step`, in the main loop, acts on them.
    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.on_signal)
        signal.signal(signal.SIGINT, self.on_signal)

    def on_signal(self, signum: int, _frame: object = None) -> None:
        self.stopping = True
        self.signals.append(signum)

    def start(self, name: str) -> Child:
        child = self.spawn(self.commands[name])
        self.children[name] = child
        self.started[name] = self.clock()
        self.exited.discard(name)
        return child

    def running(self) -> list[str]:
        return [name for name, child in self.children.items() if child.poll() is None]

    def run(self) -> int:
        """Start every command, then `supervise`."""
        self.install_signal_handlers()
        for name in self.commands:
            self.start(name)
        return self.supervise()

    def supervise(self) -> int:
        """Until every child has exited after a stop signal; the highest exit code."""
        while True:
            self.step()
            if self.stopping and not self.running():
                return max(self.codes.values(), default=0)
            self.sleep(TICK_S)

    def step(self) -> None:
        """One pass: act on stop signals, notice children that exited, start those that are due."""
        while self.signals:
            self.stop(self.signals.pop(0))
        now = self.clock()
        for name, child in list(self.children.items()):
            code = None if name in self.exited else child.poll()
            if code is None:
                continue
            self.exited.add(name)
            self.codes[name] = code
            self.cleanup(child.pid)
            if not self.stopping:
                delay = self.policies[name].delay_after(now - self.started[name])
                self.due[name] = now + delay
                self.restarts.append((name, code, delay))
                self.announce(f"{self.label(name)} exited (code {code}); restarting in {delay:.1f}s", True)
        if self.stopping:
            self.due.clear()
            return
        for name, when in list(self.due.items()):
            if now >= when:
                del self.due[name]
                child = self.start(name)
                self.announce(f"{self.label(name)} restarted (pid {child.pid})", False)

    def stop(self, signum: int) -> None:
        self.stopping = True
        self.due.clear()
        if self.stop_grace_s is None:
            for name in self.running():
                self.children[name].send_signal(signum)
            return
        for name in reversed(self.running()):
            child = self.children[name]
            if self.signals:  # a second stop signal: no more waiting
                child.send_signal(signal.SIGKILL)
                continue
            child.send_signal(signal.SIGTERM)
            deadline = self.clock() + self.stop_grace_s
            while child.poll() is None and self.clock() < deadline and not self.signals:
                self.sleep(TICK_S)
            if child.poll() is None:
                self.announce(f"{self.label(name)} did not stop; killing it", True)
                child.send_signal(signal.SIGKILL)
        self.signals.clear()
