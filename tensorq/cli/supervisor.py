"""Keeps one worker process per GPU running: `tensorq worker --gpus all` on a multi-GPU host.

Each child runs in its own session, so a Ctrl-C at the terminal reaches only this process, which
passes each signal on exactly once: Celery reads a second SIGINT as a cold shutdown that kills
running jobs, and a child in our process group would get the terminal's copy besides ours.
A child that dies while we are not stopping is started again (after a growing delay, reset once
it has run a minute), so one GPU's crash does not leave that GPU idle while the others work.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time

log = logging.getLogger(__name__)

FIRST_DELAY_S = 1.0
MAX_DELAY_S = 60.0
HEALTHY_AFTER_S = 60.0


class Supervisor:
    def __init__(self, commands: dict[str, list[str]]) -> None:
        self.commands = commands  # a name (the GPU index) -> its command line
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self.started: dict[str, float] = {}
        self.delay = dict.fromkeys(commands, FIRST_DELAY_S)
        self.stopping = False

    def start(self, name: str) -> None:
        self.children[name] = subprocess.Popen(self.commands[name], start_new_session=True)
        self.started[name] = time.monotonic()

    def forward(self, signum: int, _frame: object = None) -> None:
        self.stopping = True
        for child in self.children.values():
            if child.returncode is None:
                child.send_signal(signum)

    def run(self) -> int:
        """Until every child has exited after a stop signal; the highest exit code."""
        signal.signal(signal.SIGTERM, self.forward)
        signal.signal(signal.SIGINT, self.forward)
        for name in self.commands:
            self.start(name)
        codes: dict[str, int] = {}
        while any(child.returncode is None for child in self.children.values()):
            pid, status = os.wait()
            found = [n for n, c in self.children.items() if c.pid == pid]
            if not found:
                continue
            name = found[0]
            code = os.waitstatus_to_exitcode(status)
            self.children[name].returncode = code  # reaped here; Popen must not wait for it again
            codes[name] = code
            if not self.stopping:
                self.restart(name, code)
        return max(codes.values(), default=0)

    def restart(self, name: str, code: int) -> None:
        if time.monotonic() - self.started[name] >= HEALTHY_AFTER_S:
            self.delay[name] = FIRST_DELAY_S
        delay = self.delay[name]
        self.delay[name] = min(MAX_DELAY_S, delay * 2)
        log.error("worker for GPU %s exited with %d; starting it again in %.0f s", name, code, delay)
        deadline = time.monotonic() + delay
        while not self.stopping and time.monotonic() < deadline:
            time.sleep(0.1)
        if not self.stopping:
            self.start(name)
