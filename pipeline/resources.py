"""What each stage asks Ray for, and whether a Ray can give it: checked before a local Ray starts, explained when
a cluster cannot place it.

A stage's actors are placed together (one placement group per stage), so a stage fits when the sum of its
bundles fits. Each role's ask comes from two config keys (`<section>.num_cpus` / `num_gpus` per actor, times its
count), which is what an error names. No Ray import here: preflight runs before Ray starts.
"""

from __future__ import annotations

import math
import os
from typing import Protocol

from rayrlhf.core.config import Config, role_cpus

# A local Ray's logical CPUs may exceed the cores (the roles take turns, each runs torch on its own threads),
# but not without bound: at most this many per core unless `ray.num_cpus` says otherwise.
MAX_CPUS_PER_CORE = 4

# role -> (config section of its per-actor resources, key of its actor count or None for one actor)
ROLE_KEYS: dict[str, tuple[str, str | None]] = {
    "learner": ("ppo", "ppo.learner_workers"),
    "reference": ("reference", "reference.replicas"),
    "reward": ("reward", "reward.replicas"),
    "rollout": ("rollout", "rollout.num_workers"),
    "sft": ("sft", "sft.workers"),
    "rm": ("rm", "rm.workers"),
    "judge": ("rm", "rm.workers"),
    "eval": ("eval", None),
    "serve": ("serve", "serve.num_replicas"),
}

Bundles = dict[str, list[dict[str, float]]]  # role -> one bundle per actor, in placement order


class RoleSection(Protocol):
    """A role's config section: what each of its actors asks Ray for."""

    num_cpus: float
    num_gpus: float
    resources: dict[str, float]


def role_asks(section: RoleSection) -> dict[str, float]:
    """What one actor of a role asks Ray for, from its config section (no CPU for num_cpus 0), custom resources
    included."""
    builtin = {"CPU": section.num_cpus, "GPU": section.num_gpus}
    return {**{k: v for k, v in builtin.items() if v > 0}, **section.resources}


def actor_options(section: RoleSection) -> dict:
    """The `.options(...)` of one actor of a role."""
    return {"num_cpus": section.num_cpus, "num_gpus": section.num_gpus, "resources": dict(section.resources)}


def bundle(section: RoleSection) -> dict[str, float]:
    """A placement bundle for one actor of a role (Ray refuses an empty bundle: a token CPU then)."""
    return role_asks(section) or {"CPU": 0.01}


def role_bundles(cfg: Config) -> Bundles:
    """The PPO placement group's bundles per role, in placement order."""
    return {
        "learner": [bundle(cfg.ppo)] * cfg.ppo.learner_workers,
        "reference": [bundle(cfg.reference)] * cfg.reference.replicas,
        "reward": [bundle(cfg.reward)] * cfg.reward.replicas,
        "rollout": [bundle(cfg.rollout)] * cfg.rollout.num_workers,
    }


def stage_bundles(cfg: Config, command: str) -> dict[str, Bundles]:
    """The placement groups `command` creates, one per stage, each of which must fit on its own (stages run one
    after another)."""
    def one(role: str) -> Bundles:
        section = getattr(cfg, ROLE_KEYS[role][0])
        count = {"sft": cfg.sft.workers, "rm": cfg.rm.workers, "judge": cfg.rm.workers,
                 "serve": cfg.serve.num_replicas}.get(role, 1)
        return {role: [bundle(section)] * count}

    stages = {"train": ["sft", "rm", "judge", "ppo", "eval"], "sft": ["sft"], "rm": ["rm"], "judge": ["judge"],
              "ppo": ["ppo"], "eval": ["eval"], "serve": ["serve"]}[command]
    if command == "train" and cfg.data.judge_fraction == 0:
        stages.remove("judge")
    return {stage: role_bundles(cfg) if stage == "ppo" else one(stage) for stage in stages}


def local_cpus(cfg: Config) -> int:
    """Logical CPUs of a local Ray: `ray.num_cpus`, else enough for the roles, bounded by the machine."""
    cores = os.cpu_count() or 1
    return cfg.ray.num_cpus or max(cores, min(math.ceil(role_cpus(cfg)), MAX_CPUS_PER_CORE * cores))


def local_gpus() -> int:
    """GPUs a local Ray would see (the ones torch sees: CUDA_VISIBLE_DEVICES applies to both)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def gpus_needed(bundles: Bundles) -> int:
    """Whole GPUs the bundles take together: an ask of one or more GPUs takes that many; fractions share a GPU
    only as far as they fit in it (Ray places each fractional ask on one GPU), packed first fit, largest first."""
    whole, free_in_shared = 0, []
    for ask in sorted((b.get("GPU", 0.0) for group in bundles.values() for b in group), reverse=True):
        if ask >= 1:
            whole += math.ceil(ask - 1e-9)
        elif ask > 0:
            i = next((i for i, room in enumerate(free_in_shared) if room >= ask - 1e-9), None)
            if i is None:
                free_in_shared.append(1.0 - ask)
            else:
                free_in_shared[i] -= ask
    return whole + len(free_in_shared)


def shortfall(bundles: Bundles, capacity: dict[str, float]) -> str | None:
    """None if `bundles` fit together in `capacity` (resource -> amount); else what is short, naming each
    role's ask and the keys that set it."""
    need: dict[str, float] = {}
    for group in bundles.values():
        for b in group:
            for res, amount in b.items():
                need[res] = need.get(res, 0.0) + amount
    if "GPU" in need:
        need["GPU"] = max(need["GPU"], gpus_needed(bundles))
    short = [res for res, amount in need.items() if amount > capacity.get(res, 0.0) + 1e-9]
    if not short:
        return None
    parts = []
    for res in short:
        key = f"num_{res.lower()}s" if res in ("CPU", "GPU") else f"resources.{res}"
        asks = []
        for role, group in bundles.items():
            if group and group[0].get(res):
                section, count_key = ROLE_KEYS[role]
                count = f" x {count_key}={len(group)}" if count_key else ""
                asks.append(f"{role} {section}.{key}={group[0][res]:g}{count}")
        parts.append(f"{need[res]:g} {res} ({', '.join(asks)}) but {capacity.get(res, 0.0):g} exist")
    return "; ".join(parts)
