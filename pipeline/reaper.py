"""No process of a local Ray that rayrlhf started outlives the rayrlhf command, even one killed with SIGKILL.

`connect` marks its environment (`MARK` = "<its pid>:<random>") before `ray.init`, so every process of that
Ray inherits the mark: GCS, raylet, the agents, the workers. A watchdog (`python -m pipeline.reaper PID MARK`),
in a session of its own so that a kill of the command does not reach it, waits for the command to end and then
ends every process still carrying the mark: SIGTERM, then SIGKILL for those that ignore it (Ray's agents do).
Should a watchdog itself have been killed, the next local start finds processes whose marking command is gone,
ends them and says so.
"""

from __future__ import annotations

import logging
import os
import secrets
import subprocess
import sys
import time

import psutil

MARK = "RAYRLHF_LOCAL_RAY"
log = logging.getLogger(__name__)


def marked(prefix: str = "") -> list[psutil.Process]:
    """Processes of this user whose environment carries a mark starting with `prefix` (not this process)."""
    found = []
    for p in psutil.process_iter(["pid"]):
        if p.pid == os.getpid():
            continue
        try:
            value = p.environ().get(MARK)
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
        if value is not None and value.startswith(prefix):
            found.append(p)
    return found


def end(procs: list[psutil.Process], grace_s: float = 3.0) -> int:
    """SIGTERM, then SIGKILL after `grace_s` for the processes still alive; returns how many there were."""
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=grace_s)
    return len(procs)


def end_stale() -> int:
    """End the processes of earlier local Rays whose rayrlhf command is gone (their watchdog did not run)."""
    stale = []
    for p in marked():
        try:
            owner = int(p.environ()[MARK].split(":", 1)[0])
        except (psutil.Error, KeyError, ValueError):
            continue
        if not psutil.pid_exists(owner):
            stale.append(p)
    if stale:
        log.warning("ending %d processes left by an earlier rayrlhf run's local Ray: %s", len(stale),
                    ", ".join(str(p.pid) for p in stale))
        end(stale)
    return len(stale)


def guard_local_ray() -> str:
    """Before `ray.init` of a local Ray: end stale processes, mark this environment, start the watchdog."""
    end_stale()
    mark = f"{os.getpid()}:{secrets.token_hex(8)}"
    env = {k: v for k, v in os.environ.items() if k != MARK}  # the watchdog must not end itself
    subprocess.Popen([sys.executable, "-m", "pipeline.reaper", str(os.getpid()), mark], env=env,
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     start_new_session=True, close_fds=True)
    os.environ[MARK] = mark
    return mark


def watch(parent: int, mark: str, poll_s: float = 0.5) -> int:
    """Wait for `parent` to end, then end the processes carrying `mark`."""
    try:
        proc = psutil.Process(parent)
        while proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:  # is_running also checks pid reuse
            time.sleep(poll_s)
    except psutil.NoSuchProcess:
        pass
    return end(marked(mark))


if __name__ == "__main__":
    watch(int(sys.argv[1]), sys.argv[2])
