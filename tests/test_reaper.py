"""A local Ray started by rayrlhf ends with the command, however it ends (the watchdog of `pipeline.reaper`).

Ray's agents outlive a driver killed with SIGKILL by about a minute, reparented to PID 1 and deaf to SIGTERM;
the first tests stand in for them with processes that ignore SIGTERM, so they fail without the watchdog every
time. The last one kills a command running a real local Ray, whose agents carry no mark in their environment.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from rayrlhf.pipeline.reaper import MARK, SCAN_S, end, end_stale, marked, session_processes

ROOT = Path(__file__).resolve().parents[1]
DEAF = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"

# A command that guards its "local Ray" (a SIGTERM-deaf process in a session of its own), then works forever.
COMMAND = f"""
import subprocess, sys, time
from rayrlhf.pipeline.reaper import guard_local_ray
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
    deadline = time.monotonic() + 10  # a loaded machine's process table can lag the child's start (CI once)
    while not marked(f"{cmd.pid}:") and time.monotonic() < deadline:
        time.sleep(0.1)
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
        with caplog.at_level("WARNING", logger="rayrlhf.pipeline.reaper"):
            assert end_stale() >= 1
        orphan.wait(timeout=10)  # (already reaped by the reaper's wait when it is this process's child)
        assert not psutil.pid_exists(orphan.pid)  # SIGTERM ignored, then killed
        assert "left by an earlier rayrlhf run's local Ray" in caplog.text
    finally:
        if orphan.poll() is None:
            orphan.kill()


# A command that guards a real local Ray, as `pipeline.cluster.connect` does, and names its session directory.
RAY_COMMAND = """
import time, ray
from rayrlhf.pipeline.reaper import guard_local_ray
guard_local_ray()
ray.init(num_cpus=1, include_dashboard=False, object_store_memory=100 * 1024**2)
print(ray._private.worker.global_worker.node.get_session_dir_path(), flush=True)
time.sleep(600)
"""


def test_a_command_killed_with_sigkill_leaves_no_process_of_its_real_local_ray():
    """Ray's agents rewrite their environment away (no mark): they are found by the session directory they hold
    open, and the test lists that Ray's processes the same way (`session_processes`) as well as by the mark."""
    env = {k: v for k, v in os.environ.items() if k not in (MARK, "RAY_ADDRESS")}
    cmd = subprocess.Popen([sys.executable, "-c", RAY_COMMAND], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                           text=True)
    session = None
    try:
        assert select.select([cmd.stdout], [], [], 120)[0], "ray.init did not return within 120 s"
        session = cmd.stdout.readline().strip()
        assert session.endswith(f"_{cmd.pid}"), session  # this command's own Ray, not another on the machine

        def left() -> list[psutil.Process]:
            procs = marked(f"{cmd.pid}:")
            return procs + [p for p in session_processes({session}) if p not in procs and p.is_running()]

        deadline = time.monotonic() + 60
        while not {"ray::DashboardAgent", "ray::RuntimeEnvAgent"} <= {p.name() for p in left()}:
            assert time.monotonic() < deadline, f"the agents did not start: {[p.name() for p in left()]}"
            time.sleep(0.5)
        time.sleep(SCAN_S + 0.5)  # a scan of the watchdog has read the command's process tree
        cmd.send_signal(signal.SIGKILL)
        cmd.wait(timeout=10)
        deadline = time.monotonic() + 10
        while (procs := left()) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert procs == [], [f"{p.pid} {p.name()}" for p in procs]
    finally:
        if cmd.poll() is None:
            cmd.kill()
            cmd.wait()
        if session:
            end(session_processes({session}))  # whatever a failure left of this test's Ray
