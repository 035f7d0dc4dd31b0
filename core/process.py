"""Process set-up shared by every entry point and actor: token auth before Ray loads, torch threads, priority.

No Ray import: these run before Ray is imported (the CLI) or inside an actor that already has it.
"""

from __future__ import annotations

import logging
import os


def enable_token_auth() -> None:
    """Ask for Ray's token auth explicitly (Ray 2.60's default for local clusters), unless the user chose.

    Ray reads RAY_AUTH_MODE once, when it is first imported, so this runs before any `import ray`.
    """
    os.environ.setdefault("RAY_AUTH_MODE", "token")


def node_cores() -> int:
    """Cores this process may run on (its CPU affinity; Ray does not pin workers)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def init_worker_process(num_cpus: float, nice: int = 0) -> None:
    """Inside an actor: torch threads match the actor's CPUs (oversubscribed OpenMP threads spin and stall).

    `nice` lowers the process's CPU priority. The scoring actors (reference, reward) use it so that, where they
    share cores with the learner, the learner (the critical path of asynchronous PPO) is not slowed: they run on
    the cycles it leaves idle. Where each role has cores of its own it changes nothing.
    """
    import torch

    if nice:
        os.nice(nice)  # increments; clamped at 19 by the OS

    threads = max(1, int(num_cpus))
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    quiet_transformers()


def quiet_transformers() -> None:
    """Per-load reports and progress bars from transformers drown the pipeline's own progress."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
