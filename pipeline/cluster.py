"""Connecting to Ray: a given cluster (`ray.address` or RAY_ADDRESS) or a local one sized for the roles.

The per-process set-up of every role (threads, priority, token auth) is `core.process`.
"""

from __future__ import annotations

import logging
import os
import socket

from rayrlhf.core.config import Config
from rayrlhf.core.metrics import wandb_env
from rayrlhf.pipeline.resources import local_cpus

log = logging.getLogger(__name__)


class AddressError(ValueError):
    """A Ray address that is malformed, of the wrong kind, or where nothing answers."""


def check_address(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast, in one line, on a Ray cluster address nothing can connect to: Ray itself retries a dead
    address for minutes. Accepts HOST:PORT (the head's GCS), ray://HOST:PORT (Ray Client) and auto (the
    cluster `ray start` last recorded on this machine)."""
    given = address
    if address.startswith(("http://", "https://")):
        raise AddressError(f"{given} is a dashboard URL (what `rayrlhf submit` and `jobs` take); give the "
                           "cluster's GCS address HOST:6379, or ray://HOST:10001")
    if address == "auto":
        from ray._private.services import canonicalize_bootstrap_address

        try:
            address = canonicalize_bootstrap_address("auto")
        except (ConnectionError, ValueError):  # nothing recorded, or a recorded address that is not one
            address = None
        if address is None:
            raise AddressError("address auto: no running Ray cluster is recorded on this machine (`ray start "
                               "--head` records one); give HOST:PORT")
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not (port.isascii() and port.isdecimal()) or not 1 <= int(port) <= 65535:
        raise AddressError(f"{given!r} is not a Ray address: expected HOST:PORT (e.g. 10.0.0.5:6379), "
                           "ray://HOST:PORT or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise AddressError(f"nothing answers at {address} ({e.strerror or e}): is the Ray cluster running? "
                           f"(`ray status --address {address}`)") from None


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
    from rayrlhf.pipeline.reaper import guard_local_ray

    guard_local_ray()  # its processes end with this one, however it ends
    num_cpus = local_cpus(cfg)  # preflight checked that every stage fits in it
    # Ray's metrics endpoint is plain HTTP without auth on all interfaces: a local Ray serves it only with the
    # dashboard, which reads it (rayrlhf's own metrics go to metrics.jsonl and TensorBoard).
    # address="local": a new Ray sized as preflight checked, not a `ray start` cluster Ray would otherwise join
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=cfg.ray.include_dashboard, log_to_driver=True,
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}},
             _system_config={"worker_niceness": cfg.ray.worker_niceness,
                             "enable_metrics_collection": cfg.ray.include_dashboard})
