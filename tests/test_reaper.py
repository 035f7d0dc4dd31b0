"""A local Ray started by rayrlhf ends with the command, however it ends (the watchdog of `pipeline.reaper`).

Ray's agents sometimes outlive a driver killed with SIGKILL, reparented to PID 1 and deaf to SIGTERM; these
tests stand in for them with processes that ignore SIGTERM, so they fail without the watchdog every time.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from pipeline.reaper import MARK, end_stale, marked

ROOT = Path(__file__).resolve().parents[1]
DEAF = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"

# A command that guards its "local Ray" (a SIGTERM-deaf process in a session of its own), then works forever.
COMMAND = f"""
import subprocess, sys, time
from pipeline.reaper import guard_local_ray
guard_local_ray()
subprocess.Popen([sys.executable, "-c", {DEAF!r}], start_new_session=True)
print("ready", flush=True)
time.sleep(600)
"""


def _wait_gone(prefix: str, seconds: float) -> list[psutil.Process]:
    deadline = time.monotonic() + seconds
    while (left := [p for p in marked(prefix) if p.is_running()]) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def test_a_command_killed_with_sigkill_leaves_none_of_its_marked_processes():
    env = {k: v for k, v in os.environ.items() if k != MARK}
    cmd = subprocess.Popen([sys.executable, "-c", COMMAND], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    assert cmd.stdout.readline().strip() == "ready"
    assert len(marked(f"{cmd.pid}:")) == 1  # the deaf process carries the command's mark
    cmd.send_signal(signal.SIGKILL)
    cmd.wait(timeout=10)
    assert _wait_gone(f"{cmd.pid}:", 30) == []


def test_processes_of_an_earlier_run_whose_command_is_gone_are_ended_at_the_next_start(caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid no command holds any more
    mark = f"{dead.pid}:stale"
    orphan = subprocess.Popen([sys.executable, "-c", DEAF], env={**os.environ, MARK: mark}, start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while not marked(mark) and time.monotonic() < deadline:
            time.sleep(0.1)
        with caplog.at_level("WARNING", logger="pipeline.reaper"):
            assert end_stale() >= 1
        orphan.wait(timeout=10)  # (already reaped by the reaper's wait when it is this process's child)
        assert not psutil.pid_exists(orphan.pid)  # SIGTERM ignored, then killed
        assert "left by an earlier rayrlhf run's local Ray" in caplog.text
    finally:
        if orphan.poll() is None:
            orphan.kill()
