"""`tensorq worker --gpus all` on a multi-GPU host: one child per GPU, kept running, each stop
signal passed on once (a second SIGINT is a cold shutdown to Celery, killing running jobs)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

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
            timeout=30, what="both workers up, the crashed one started again",
        )  # fmt: skip
        os.killpg(supervisor.pid, signal.SIGINT)  # Ctrl-C at the terminal
        assert supervisor.wait(timeout=30) == 0
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
    for name in ("steady", "crashy"):
        assert (tmp_path / f"{name}.signals").read_text() == "INT\n", name
