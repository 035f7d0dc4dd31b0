"""The control channel of elastic rollout: how many rollout workers a running PPO job should have.

`ScaleControl` is the plain state behind the named `actors.RolloutScaler` actor: `rayrlhf scale` sets the
count from any process connected to the cluster; the driver reads it at the start of each step and reports
back what it has. It holds the request only; `pipeline.pool.RolloutPool` keeps the guarantees.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, replace

SCALER_NAMESPACE = "rayrlhf"


def scaler_name(run_name: str) -> str:
    """Name of a PPO run's scaler actor: from its run directory's name (the driver writes to `<run>/ppo`)."""
    return f"rayrlhf-scaler-{run_name}"


@dataclass(frozen=True)
class ScaleStatus:
    """The rollout worker count a run was asked for, and what its driver had at its last step."""

    desired: int
    active: int  # workers the batches are sharded over
    starting: int  # actors started, not yet holding the current weights
    step: int  # metrics step of the driver's last report


def placeable(per_worker: dict[str, float], free: dict[str, float]) -> int:
    """How many more workers, each asking `per_worker` (resource -> amount), fit in the `free` resources; a
    worker that asks for nothing (num_cpus 0) always fits (sys.maxsize)."""
    fits = [math.floor(free.get(res, 0.0) / amount + 1e-9) for res, amount in per_worker.items() if amount > 0]
    return max(0, min(fits)) if fits else sys.maxsize


class ScaleControl:
    def __init__(self, workers: int, weight_sync: str, per_worker: dict[str, float] | None = None):
        self.status = ScaleStatus(desired=workers, active=workers, starting=0, step=0)
        self.weight_sync = weight_sync
        self.per_worker = dict(per_worker if per_worker is not None else {"CPU": 1.0})  # one rollout worker's ask

    def set_desired(self, n: int) -> ScaleStatus:
        """Ask for `n` rollout workers; returns the status before the request. ValueError if it cannot be met."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"rollout workers must be an integer >= 1, got {n!r}")
        if self.weight_sync != "object_store":
            # A torch.distributed group has a world size fixed when it is created.
            raise ValueError(f"elastic scaling needs ppo.weight_sync=object_store (this run uses {self.weight_sync})")
        before, self.status = self.status, replace(self.status, desired=n)
        return before

    def report(self, active: int, starting: int, step: int) -> None:
        self.status = replace(self.status, active=active, starting=starting, step=step)
