"""Connecting to Ray: a given cluster (`ray.address` or RAY_ADDRESS) or a local one sized for the roles."""

from __future__ import annotations

import logging
import math
import os

from pipeline.config import Config

log = logging.getLogger(__name__)


def role_cpus(cfg: Config) -> float:
    """Logical CPUs that the PPO roles ask for together (the offline stages run one at a time)."""
    ppo = (cfg.rollout.num_workers * cfg.rollout.num_cpus + cfg.reward.num_cpus + cfg.reference.num_cpus
           + cfg.ppo.num_cpus)
    return max(ppo, cfg.sft.num_cpus, cfg.rm.num_cpus, cfg.serve.num_cpus * cfg.serve.num_replicas)


def connect(cfg: Config) -> None:
    """ray.init against the configured cluster, or start a local one.

    Token auth: `enable_token_auth()` must run before Ray is imported (the CLI does it first thing);
    Ray then stores a token in ~/.ray/auth_token unless RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH gives one.
    """
    import ray

    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("connecting to Ray at %s", address)
        ray.init(address=address, log_to_driver=True)
        return
    # Logical CPUs may exceed the cores: roles take turns, and each actor runs torch on its own threads.
    num_cpus = cfg.ray.num_cpus or max(os.cpu_count() or 1, math.ceil(role_cpus(cfg)))
    ray.init(num_cpus=num_cpus, include_dashboard=cfg.ray.include_dashboard, log_to_driver=True,
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}},
             _system_config={"worker_niceness": cfg.ray.worker_niceness})


def enable_token_auth() -> None:
    """Ask for Ray's token auth explicitly (Ray 2.60's default for local clusters), unless the user chose.

    Ray reads RAY_AUTH_MODE once, when it is first imported, so this runs before any `import ray`.
    """
    os.environ.setdefault("RAY_AUTH_MODE", "token")


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
