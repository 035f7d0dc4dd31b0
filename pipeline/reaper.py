"""No process of a local Ray that rayrlhf started outlives the rayrlhf command, even one killed with SIGKILL.

`connect` marks its environment (`MARK` = "<its pid>:<random>") before `ray.init`, so the processes of that
Ray inherit the mark: GCS, raylet, the workers (the agents lose it, below). A watchdog (`python -m rayrlhf.pipeline.reaper PID MARK`),
in a session of its own so that a kill of the command does not reach it, waits for the command to end and then
ends every process of its Ray: SIGTERM, then SIGKILL for those that ignore it (Ray's agents do).

The mark alone misses Ray's agents (`ray::DashboardAgent`, `ray::RuntimeEnvAgent`): they rewrite their process
title over their environment, so /proc/PID/environ reads empty. They still hold their logs open in the Ray's
session directory (<temp dir>/session_<date>_<pid>/logs/). So while the command lives, the watchdog reads
which session directories its descendants name (raylet and GCS on their command line, every process in its open
files); once it is gone, "the processes of its Ray" are those carrying the mark or naming one of those
directories. Both are scoped to this command's Ray: another Ray on the machine has another mark and session.

Should a watchdog itself have been killed, the next local start finds processes whose marking command is gone,
ends them (and those naming their session directories) and says so.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import subprocess
import sys
import time

import psutil

MARK = "RAYRLHF_LOCAL_RAY"
# Ray names a session directory session_<date>_<time>_<microseconds>_<pid of the process that started it>
# (ray/_private/node.py); `session_latest`, a link to the newest one of any Ray, does not match.
SESSION_DIR = re.compile(r"(?:/[^/\s=]+)*/session_\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_\d+_\d+(?![^/])")
SCAN_S = 2.0  # how often the watchdog reads the command's process tree (about 5 ms of CPU for ~100 processes)
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


def session_dirs(p: psutil.Process) -> set[str]:
    """The Ray session directories `p` names on its command line or in its open files (none if it is gone)."""
    try:
        names = p.cmdline() + [f.path for f in p.open_files()]
    except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
        return set()
    return {m.group() for name in names for m in SESSION_DIR.finditer(name)}


def session_processes(sessions: set[str]) -> list[psutil.Process]:
    """Processes (not this one) that name one of `sessions` on their command line or in their open files."""
    if not sessions:
        return []
    return [p for p in psutil.process_iter(["pid"]) if p.pid != os.getpid() and session_dirs(p) & sessions]


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
    sessions = set().union(*(session_dirs(p) for p in stale))
    stale += [p for p in session_processes(sessions) if p not in stale]  # the agents, which lost the mark
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
    subprocess.Popen([sys.executable, "-m", "rayrlhf.pipeline.reaper", str(os.getpid()), mark], env=env,
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     start_new_session=True, close_fds=True)
    os.environ[MARK] = mark
    return mark


def watch(parent: int, mark: str, poll_s: float = 0.5) -> int:
    """Wait for `parent` to end, learning the session directories of its Ray, then end that Ray's processes."""
    sessions: set[str] = set()
    read: dict[psutil.Process, list[str]] = {}  # live descendant -> the command line its dirs were read at
    next_scan = time.monotonic()
    try:
        proc = psutil.Process(parent)
        while proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:  # is_running also checks pid reuse
            if time.monotonic() >= next_scan:
                next_scan = time.monotonic() + SCAN_S
                now: dict[psutil.Process, list[str]] = {}
                for child in proc.children(recursive=True):
                    try:
                        now[child] = child.cmdline()
                    except psutil.Error:
                        continue
                    # Read again when the command line changes: a fork shows its parent's until it execs, and
                    # the agents retitle themselves.
                    if child.pid != os.getpid() and read.get(child) != now[child]:
                        sessions |= session_dirs(child)
                read = now
            time.sleep(poll_s)
    except psutil.NoSuchProcess:
        pass
    procs = marked(mark)
    procs += [p for p in session_processes(sessions) if p not in procs]
    return end(procs)


if __name__ == "__main__":
    watch(int(sys.argv[1]), sys.argv[2])
