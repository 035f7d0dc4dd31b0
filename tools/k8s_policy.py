"""The project's failure and placement policy for a RayJob that runs rayrlhf, checked offline against the config
its entrypoint runs (`k8s_validate` calls `job_problems` for every RayJob whose entrypoint is a `rayrlhf`
command). The same policy as a run on a `ray start` cluster (docs/fault-tolerance.md):

- A deadline: `spec.activeDeadlineSeconds` bounds a run that hangs while holding its GPUs.
- KubeRay's own retries (`spec.backoffLimit` > 0) run the entrypoint again on a new cluster: only an entrypoint
  that continues its run (`--resume RUN_DIR`) may be retried, anything else would start the run over.
- Within the job, a lost worker pod is survived by rayrlhf: rollout, reference and reward actors restart
  (`ppo.max_actor_restarts`) and a learner rank's loss resumes from the last checkpoint
  (`ppo.max_learner_restarts`, at least 1 here) once KubeRay has replaced the pod.
- Worker groups per role: each `<role>.resources` custom resource that the entrypoint's config asks for is
  advertised by a worker group (`rayStartParams.resources`) with room for all of the role's actors
  (replicas x amount); a group that advertises a `role_*` resource no role asks for would idle.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from rayrlhf.core.config import Config, ConfigError, load_config
from rayrlhf.tools.k8s_manifests import Manifest, Problem, mapping, ray_resources

PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # holds configs/, as the image's WORKDIR does


def _entrypoint_config(argv: list[str]) -> Config:
    """The config a `rayrlhf <command> [--config F] [--set K=V ...]` entrypoint runs with (F relative to the
    image's WORKDIR, which holds the repository's configs/)."""
    config = argv[argv.index("--config") + 1] if "--config" in argv else None
    overrides = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--set"]
    return load_config(PACKAGE_ROOT / config if config else None, overrides)


def _role_actors(cfg: Config) -> dict[str, tuple[int, dict[str, float]]]:
    """config section of a role -> (its actors, custom resources per actor)."""
    actors = {"ppo": cfg.ppo.learner_workers, "rollout": cfg.rollout.num_workers,
              "reference": cfg.reference.replicas,
              "reward": cfg.reward.replicas if cfg.reward.backend == "local" else 0,
              "sft": cfg.sft.workers, "rm": cfg.rm.workers, "eval": 1}
    return {section: (n, dict(getattr(cfg, section).resources)) for section, n in actors.items() if n}


def _group_resources(spec: dict) -> dict[str, tuple[str, float]]:
    """custom resource -> (worker group, amount the group's replicas advertise together)."""
    groups = {}
    cluster = mapping(spec.get("rayClusterSpec"))
    for group in cluster.get("workerGroupSpecs") or []:
        value = mapping(mapping(group).get("rayStartParams")).get("resources")
        try:
            advertised = ray_resources(value) if isinstance(value, str) else {}
        except ValueError:
            continue  # reported by `k8s_validate._ray_resources_problems`
        for name, amount in advertised.items():
            groups[name] = (str(group.get("groupName")), float(amount) * int(group.get("replicas", 1)))
    return groups


def job_problems(m: Manifest) -> list[Problem]:
    spec = mapping(m.doc.get("spec"))
    entrypoint = spec.get("entrypoint")
    try:
        argv = shlex.split(entrypoint) if isinstance(entrypoint, str) else []
    except ValueError:
        argv = []
    if not argv or argv[0] != "rayrlhf":
        return []
    problems = []
    if not spec.get("activeDeadlineSeconds"):
        problems.append(Problem.of(m, "$.spec.activeDeadlineSeconds", "missing: a run that hangs would hold its "
                                   "cluster without end; set a deadline above the run's expected wall time"))
    if int(spec.get("backoffLimit") or 0) > 0 and "--resume" not in argv:
        problems.append(Problem.of(m, "$.spec.backoffLimit", f"{spec['backoffLimit']}: a retry runs the entrypoint "
                                   "again, which starts this run over; retry only an entrypoint with --resume RUN_DIR"))
    try:
        cfg = _entrypoint_config(argv)
    except (ConfigError, OSError) as e:
        return [*problems, Problem.of(m, "$.spec.entrypoint", f"its config does not load: {e}")]
    groups = _group_resources(spec)
    asked = set()
    for section, (count, resources) in _role_actors(cfg).items():
        for name, per_actor in resources.items():
            asked.add(name)
            if name not in groups:
                problems.append(Problem.of(m, "$.spec.entrypoint", f"{section}.resources asks for {name!r}, which "
                                           "no worker group advertises (rayStartParams.resources): its actors "
                                           "never start"))
            elif per_actor * count > groups[name][1]:
                group, room = groups[name]
                problems.append(Problem.of(m, "$.spec.entrypoint", f"{count} {section} actor(s) x {name} {per_actor:g} "
                                           f"exceed worker group {group}'s {room:g} (replicas x amount)"))
    for name, (group, _) in groups.items():
        if name.startswith("role_") and name not in asked:
            problems.append(Problem.of(m, "$.spec.rayClusterSpec.workerGroupSpecs", f"worker group {group} advertises "
                                       f"{name!r} but no role's <section>.resources asks for it: its pods would idle"))
    if cfg.ppo.resources and cfg.ppo.max_learner_restarts < 1:
        problems.append(Problem.of(m, "$.spec.entrypoint", "ppo.max_learner_restarts 0: a lost learner pod would end "
                                   "the job; give it at least 1 (the run resumes once KubeRay replaced the pod)"))
    return problems
