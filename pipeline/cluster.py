"""Connecting to Ray: a given cluster (`ray.address` or RAY_ADDRESS) or a local one sized for the roles.

The per-process set-up of every role (threads, priority, token auth) is `core.process`.
"""

from __future__ import annotations

import logging
import math
import os

from core.config import Config, role_cpus
from core.metrics import wandb_env

log = logging.getLogger(__name__)


def connect(cfg: Config) -> None:
    """ray.init against the configured cluster, or start a local one.

    Token auth: `core.process.enable_token_auth()` must run before Ray is imported (the CLI does it first thing);
    Ray then stores a token in ~/.ray/auth_token unless RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH gives one.
    """
    import ray

    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("connecting to Ray at %s", address)
        # The stages' actors run on the cluster's nodes: hand them the W&B variables set here. Inside a job
        # (`rayrlhf submit`) the job's runtime env already carries them, and Ray refuses a key given twice.
        env = {} if "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ else wandb_env(cfg)
        ray.init(address=address, log_to_driver=True, runtime_env={"env_vars": env} if env else None)
        return
    from pipeline.reaper import guard_local_ray

    guard_local_ray()  # its processes end with this one, however it ends
    # Logical CPUs may exceed the cores: roles take turns, and each actor runs torch on its own threads.
    num_cpus = cfg.ray.num_cpus or max(os.cpu_count() or 1, math.ceil(role_cpus(cfg)))
    # Ray's metrics endpoint is plain HTTP without auth on all interfaces: a local Ray serves it only with the
    # dashboard, which reads it (rayrlhf's own metrics go to metrics.jsonl and TensorBoard).
    ray.init(num_cpus=num_cpus, include_dashboard=cfg.ray.include_dashboard, log_to_driver=True,
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}},
             _system_config={"worker_niceness": cfg.ray.worker_niceness,
                             "enable_metrics_collection": cfg.ray.include_dashboard})
