"""Starting the PPO roles: one placement group with a bundle per role, a frozen set of role handles.

Each role's bundles are declared once (`role_bundles`); `Placement` numbers them in that order, so no bundle
index is computed by hand. Strategy PACK: the roles land on as few nodes as possible, each on its own GPU(s)
when there are GPUs. The learner group's bundles come first, so its ranks are packed together before the other
roles fill in (its collectives are the run's heaviest traffic).

A learner group (`ppo.learner_workers` > 1) is N `LearnerWorker` ranks behind one `LearnerGroup`: every call
goes to every rank (FSDP2's collectives join them), the driver reads rank 0's result. The SFT and reward-model
stages' groups (`sft.workers`, `rm.workers`) are the same: `run_group`.

Rollout workers, the reference and the reward scorer are restarted by Ray when they die
(`ppo.max_actor_restarts`); the driver then dispatches their lost work again. The learner is not: its state is
the run, and a dead learner ends the run, to be resumed from its last checkpoint.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import ray
from ray.actor import ActorHandle
from ray import ObjectRef
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError, RayTaskError
from ray.util.placement_group import PlacementGroup, placement_group, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

from rayrlhf.actors import (
    LearnerWorker, ReferenceWorker, RemoteRewardWorker, RewardWorker, RolloutScaler, RolloutWorker,
)
from rayrlhf.core.config import Config
from rayrlhf.core.experience import Experience, ShardRefs
from rayrlhf.core.scaling import SCALER_NAMESPACE, scaler_name
from rayrlhf.pipeline.calls import RoleTimeout, first_line, ray_get
from rayrlhf.pipeline.resources import Bundles, RoleSection, actor_options, bundle, role_asks, role_bundles, shortfall


@dataclass(frozen=True)
class Placement:
    """Which bundle of the placement group each role's i-th actor takes."""

    group: PlacementGroup
    first_bundle: dict[str, int]  # role -> index of its first bundle

    @classmethod
    def create(cls, bundles: Bundles, timeout_s: float) -> Placement:
        """Reserve `bundles` (role -> one bundle per actor); a placement the cluster cannot give within
        `timeout_s` (`ray.startup_timeout_s`) is removed and raises, naming the roles and what they ask."""
        first, flat = {}, []
        for role, group in bundles.items():
            first[role] = len(flat)
            flat += group
        group = placement_group(flat, strategy="PACK")
        try:
            ray.get(group.ready(), timeout=timeout_s)
        except GetTimeoutError:
            remove_placement_group(group)
            raise RuntimeError(unplaced(bundles, timeout_s)) from None
        return cls(group, first)

    def on(self, role: str, i: int = 0) -> PlacementGroupSchedulingStrategy:
        return PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=self.first_bundle[role] + i)

    def nodes(self, role: str, count: int) -> list[str]:
        """The node id each of the role's first `count` bundles was placed on (now: Ray moves the bundles of a
        dead node)."""
        where = placement_group_table(self.group)["bundles_to_node_id"]
        return [where[self.first_bundle[role] + i] for i in range(count)]


class LearnerLost(RuntimeError):
    """A learner rank's actor died (its node lost, its process killed): the run can go on from its last
    checkpoint with new ranks, which `workflow.ppo` does within `ppo.max_learner_restarts`."""

    def __init__(self, message: str, nodes: list[str]):
        super().__init__(message)
        self.nodes = nodes  # `describe_node` of each dead rank's node


def describe_node(node_id: str | None) -> str:
    """A node as Ray knows it: its id, address and whether it is alive."""
    if node_id is None:
        return "an unknown node"
    info = next((n for n in ray.nodes() if n["NodeID"] == node_id), None)
    if info is None:
        return f"node {node_id[:12]}"
    # A rank on a lost node dies before Ray's health checks declare the node dead: say what Ray knows now.
    state = "alive" if info["Alive"] else "dead"
    return f"node {node_id[:12]} ({info['NodeManagerAddress']}; Ray reports it {state})"


def unplaced(bundles: Bundles, timeout_s: float) -> str:
    """Why a placement was not ready in time: the resources short in the whole cluster, named per role and key;
    else (enough in total) that others hold them or no single node has room."""
    roles = ", ".join(bundles)
    head = f"Ray could not place {roles} within ray.startup_timeout_s={timeout_s:g}s"
    total = ray.cluster_resources()
    short = shortfall(bundles, total)
    if short is not None:
        return f"{head}: they ask for {short} in this cluster (lower those keys or add nodes that have them)"
    free = {k: round(v, 2) for k, v in ray.available_resources().items() if k in ("CPU", "GPU")}
    asks = {role: group[0] for role, group in bundles.items()}
    return (f"{head}: the cluster has enough in total but not free, or not on one node (asks per actor {asks}, "
            f"free now {free}); see `ray status`")


@contextmanager
def placed(bundles: Bundles, timeout_s: float) -> Iterator[Placement]:
    """A placement for the duration of a stage, removed however it ends."""
    placement = Placement.create(bundles, timeout_s)
    try:
        yield placement
    finally:
        remove_placement_group(placement.group)


class RankGroup:
    """The ranks of a trainer group (the PPO learner, or an SFT / reward-model stage) behind one handle. Each
    call goes to every rank (each runs its share; FSDP's collectives join them) and returns every rank's ref;
    rank 0's result is the group's."""

    def __init__(self, ranks: list[ActorHandle], role: str = "learner", nodes: list[str] | None = None):
        self.ranks, self.role = tuple(ranks), role
        self.nodes = list(nodes) if nodes is not None else [None] * len(self.ranks)  # node id of each rank, as placed

    @property
    def world(self) -> int:
        return len(self.ranks)

    def names(self) -> list[str]:
        return [self.role] if self.world == 1 else [f"{self.role} rank {i}" for i in range(self.world)]

    def _each(self, remote: Callable[..., ObjectRef], *args) -> list[ObjectRef]:
        """`remote(rank, *args)` on every rank; its refs."""
        if self.world > 1:  # one copy in the object store that every rank reads, not one per call
            args = tuple(a if isinstance(a, (str, int, float)) else ray.put(a) for a in args)
        return [remote(r, *args) for r in self.ranks]

    def rendezvous(self, timeout_s: float) -> None:
        """Form the group's torch.distributed process group at an address rank 0 chooses on its own node (each
        rank's `join`); a rank that does not join within `timeout_s` is named."""
        if self.world == 1:
            return
        try:
            addr, port = ray.get(self.ranks[0].address.remote(), timeout=timeout_s)
        except GetTimeoutError as e:
            raise RoleTimeout(f"{self.role} rank 0", timeout_s, key="ray.startup_timeout_s",
                              did="give an address") from e
        joins = [r.join.remote(addr, port, timeout_s) for r in self.ranks]
        _, pending = ray.wait(joins, num_returns=len(joins), timeout=timeout_s + 5)
        if pending:
            late = [f"{self.role} rank {i}" for i, r in enumerate(joins) if r in pending]
            raise RoleTimeout(", ".join(late), timeout_s, key="ray.startup_timeout_s",
                              did=f"join the {self.role} group at {addr}:{port}")
        for i, r in enumerate(joins):
            try:
                ray.get(r)
            except (RayActorError, RayTaskError) as e:
                raise RuntimeError(f"{self.role} rank {i} failed to join the {self.role} group: "
                                   f"{first_line(e, 500)}") from e

    def run_to_end(self):
        """An offline stage's `run` on every rank, waited for; rank 0's result. The first rank to fail ends the
        wait naming itself (its peers would otherwise block in a collective until their timeout)."""
        results = self._each(lambda r: r.run.remote())
        pending = list(results)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            i = results.index(done[0])
            try:
                ray.get(done[0])
            except (RayActorError, RayTaskError) as e:
                who = self.role if self.world == 1 else f"{self.role} rank {i}"
                raise RuntimeError(f"{who} failed: {first_line(e, 500)}") from e
        return ray.get(results[0])

    def dead_ranks(self, timeout_s: float) -> list[int]:
        """The ranks whose actor has died, asked after a failure. A rank that answers is alive; one busy in a
        collective with a dead peer does not answer, so this waits up to `timeout_s` for Ray to declare a death (a
        lost node takes its health checks' time) and returns as soon as one is declared, or every rank answered."""
        ready = [r.__ray_ready__.remote() for r in self.ranks]
        deadline = time.monotonic() + timeout_s
        while True:
            done, _ = ray.wait(ready, num_returns=len(ready), timeout=0.5)
            dead, answered = [], 0
            for i, ref in enumerate(ready):
                if ref not in done:
                    continue
                try:
                    ray.get(ref)
                    answered += 1
                except ActorUnavailableError:  # unreachable for now (e.g. a head failover): not known to be dead
                    ready[i] = self.ranks[i].__ray_ready__.remote()
                except RayActorError:
                    dead.append(i)
            if dead or answered == len(ready) or time.monotonic() > deadline:
                return dead

    def lost(self, cause: BaseException, timeout_s: float) -> LearnerLost | None:
        """After `cause` ended a call to the group: a `LearnerLost` naming the ranks that died and their nodes,
        or None when every rank is alive (`cause` is the group's own error)."""
        dead = self.dead_ranks(timeout_s)
        if not dead:
            return None
        nodes = [describe_node(self.nodes[i]) for i in dead]
        who = ", ".join(f"{self.role} rank {i} on {n}" if self.world > 1 else f"{self.role} on {n}"
                        for i, n in zip(dead, nodes))
        return LearnerLost(f"{who} died ({type(cause).__name__}: {first_line(cause)})", nodes)

    def kill(self) -> None:
        for r in self.ranks:
            ray.kill(r)


class LearnerGroup(RankGroup):
    """The PPO learner's ranks (`LearnerWorker`): each method runs on every rank, returns every rank's ref."""

    def train_step(self, batch: Experience | ShardRefs) -> list[ObjectRef]:
        return self._each(lambda r, b: r.train_step.remote(b), batch)

    def save(self, out_dir: str) -> list[ObjectRef]:
        return self._each(lambda r, d: r.save.remote(d), out_dir)

    def load(self, ckpt_dir: str) -> list[ObjectRef]:
        return self._each(lambda r, d: r.load.remote(d), ckpt_dir)

    def broadcast_weights(self) -> list[ObjectRef]:
        return self._each(lambda r: r.broadcast_weights.remote())

    def bucket_layouts(self) -> list[ObjectRef]:
        return self._each(lambda r: r.bucket_layouts.remote())

    def packet(self) -> ObjectRef:
        """Rank 0's weights packet (every rank takes part in gathering it; the others return None)."""
        return self._each(lambda r: r.make_packet.remote())[0]


def run_group(stage: type, role: str, workers: int, section: RoleSection, args: tuple, timeout_s: float):
    """An offline stage (`SFTStage`, `RMStage`) run to its end by `workers` ranks: one bundle per rank in a PACK
    placement group (the ranks as close as the cluster allows), the process group formed, `run` on every rank;
    rank 0's result. The actors and the placement group are released however it ends."""
    with placed({role: [bundle(section)] * workers}, timeout_s) as placement:
        group = RankGroup([stage.options(**actor_options(section), scheduling_strategy=placement.on(role, i))
                           .remote(*args, rank=i, world=workers) for i in range(workers)], role)
        try:
            group.rendezvous(timeout_s)
            return group.run_to_end()
        finally:
            group.kill()


@dataclass(frozen=True)
class RoleHandles:
    """The actors of one PPO run. Tests may replace a role (`dataclasses.replace`) before the driver uses it."""

    learner: LearnerGroup
    references: tuple[ActorHandle, ...]  # reference replicas
    rewards: tuple[ActorHandle, ...]  # reward scorer replicas
    rollouts: tuple[ActorHandle, ...]  # the workers started with the run; the pool adds and removes others
    scaler: ActorHandle
    placement: Placement | None = None

    def name_of(self, actor: ActorHandle) -> str:
        return next(name for name, a in self.named().items() if a == actor)

    def named(self) -> dict[str, ActorHandle]:
        return {**dict(zip(self.learner.names(), self.learner.ranks)),
                **_replicas("reference", self.references), **_replicas("reward scorer", self.rewards),
                "rollout scaler": self.scaler, **{f"rollout worker {i}": w for i, w in enumerate(self.rollouts)}}


def _replicas(role: str, actors: tuple[ActorHandle, ...]) -> dict[str, ActorHandle]:
    return {role: actors[0]} if len(actors) == 1 else {f"{role} replica {i}": a for i, a in enumerate(actors)}


def rollout_restarts(cfg: Config) -> int:
    """A restarted rollout worker cannot rejoin a torch.distributed group, whose world size is fixed."""
    return cfg.ppo.max_actor_restarts if cfg.ppo.weight_sync == "object_store" else 0


def inflight_concurrency(cfg: Config) -> int:
    """In-flight rollout: calls a worker runs at once, a thread each: every shard of the batches in flight (at most a
    prompt each, all of them on one worker at worst), with room to spare for the loads and version reads, which
    must never wait for a thread behind generate calls waiting for them."""
    return cfg.ppo.prompts_per_step * (cfg.ppo.max_staleness + 1) + 16


def launch_rollout_worker(cfg: Config, sft_checkpoint: str, index: int,
                          strategy: PlacementGroupSchedulingStrategy | None = None) -> ActorHandle:
    """A rollout worker; outside the placement group (a worker added while the run goes) without `strategy`."""
    rollout_cfg = cfg.rollout
    opts = {**actor_options(rollout_cfg), "max_restarts": rollout_restarts(cfg)}
    if rollout_cfg.inflight:  # generate calls and weight loads meet in the worker's decode loop (`roles.inflight`)
        opts["max_concurrency"] = inflight_concurrency(cfg)
    if strategy is not None:
        opts["scheduling_strategy"] = strategy
    return RolloutWorker.options(**opts).remote(cfg, sft_checkpoint, index)


def launch_roles(cfg: Config, sft_checkpoint: str, rm_checkpoint: str, run_name: str) -> RoleHandles:
    """Create the placement group and every PPO role; returns at once (see `await_started`)."""
    placement = Placement.create(role_bundles(cfg), cfg.ray.startup_timeout_s)
    restarts = cfg.ppo.max_actor_restarts

    def on(role: str, section: RoleSection, i: int = 0) -> dict:
        return {**actor_options(section), "scheduling_strategy": placement.on(role, i)}

    world = cfg.ppo.learner_workers
    learner = LearnerGroup([LearnerWorker.options(**on("learner", cfg.ppo, i)).remote(
        cfg, sft_checkpoint, rm_checkpoint, i, world) for i in range(world)], nodes=placement.nodes("learner", world))
    references = tuple(ReferenceWorker.options(**on("reference", cfg.reference, i),
                                               max_restarts=restarts).remote(cfg, sft_checkpoint)
                       for i in range(cfg.reference.replicas))
    if cfg.reward.backend == "local":
        rewards = tuple(RewardWorker.options(**on("reward", cfg.reward, i),
                                             max_restarts=restarts).remote(cfg, rm_checkpoint)
                        for i in range(cfg.reward.replicas))
    else:
        # no CPU asked: it lives on the driver's node, which on KubeRay is a head that offers none
        rewards = (RemoteRewardWorker.options(num_cpus=0, max_restarts=restarts,
                                              scheduling_strategy=on_this_node()).remote(cfg, sft_checkpoint),)
    rollouts = tuple(launch_rollout_worker(cfg, sft_checkpoint, i, placement.on("rollout", i))
                     for i in range(cfg.rollout.num_workers))
    name = scaler_name(run_name)
    try:
        scaler = RolloutScaler.options(name=name, namespace=SCALER_NAMESPACE,
                                       scheduling_strategy=on_this_node()).remote(
            cfg.rollout.num_workers, cfg.ppo.weight_sync, role_asks(cfg.rollout))
    except ValueError as e:  # the name is taken
        learner.kill()
        for a in (*references, *rewards, *rollouts):
            ray.kill(a)
        remove_placement_group(placement.group)
        raise RuntimeError(f"a PPO run named {run_name!r} is already running on this Ray cluster "
                           f"({name} exists); give the run directory another name") from e
    return RoleHandles(learner, references, rewards, rollouts, scaler, placement)


def on_this_node() -> NodeAffinitySchedulingStrategy:
    """The driver's own node, for the small actors that should share its fate (not die with a worker node)."""
    return NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)


def await_started(actors: dict[str, ActorHandle], timeout_s: float) -> None:
    """Wait for every actor's constructor (model loading may take minutes) under `ray.startup_timeout_s`, so
    `ppo.sync_timeout_s` bounds only the calls of the loop."""
    ready = {name: a.__ray_ready__.remote() for name, a in actors.items()}
    _, pending = ray.wait(list(ready.values()), num_returns=len(ready), timeout=timeout_s)
    if pending:
        late = [name for name, r in ready.items() if r in pending]
        raise RoleTimeout(", ".join(late), timeout_s, key="ray.startup_timeout_s", did="start",
                          hint=" (resources? see `ray status`)")
    for name, r in ready.items():
        try:
            ray.get(r)
        except RayActorError as e:
            raise RuntimeError(f"{name} failed to start: {first_line(e, 500)}") from e


def join_weight_sync_group(roles: RoleHandles, timeout_s: float) -> None:
    """The collective transport's process group: the learner (rank 0 of a learner group) is rank 0, at an address
    it chooses on its own node; rollout worker i is rank i + 1."""
    world = 1 + len(roles.rollouts)
    learner = roles.learner
    addr, port = ray_get(learner.ranks[0].address.remote(), "learner address", timeout_s)
    # The layout first: the learner's join returns only once all workers joined, so a worker's join that
    # waited on its result would deadlock until the timeout. Every rank of a group gathers; rank 0 answers.
    layouts = ray_get(learner.bucket_layouts(), "weight-sync bucket layout", timeout_s)[0]
    learner_join = learner.ranks[0].join_group.remote(addr, port, world, timeout_s, layouts)
    joins = [w.join_group.remote(addr, port, i + 1, world, timeout_s, layouts) for i, w in enumerate(roles.rollouts)]
    ray_get([learner_join, *joins], "weight-sync group set-up", timeout_s)


def close_roles(roles: RoleHandles, rollout_workers: list[ActorHandle]) -> None:
    """Kill every actor of the run (`rollout_workers`: the pool's, which may differ from those started with
    the run) and free the placement group."""
    roles.learner.kill()
    for a in [*rollout_workers, *roles.references, *roles.rewards, roles.scaler]:
        ray.kill(a)
    if roles.placement is not None:
        remove_placement_group(roles.placement.group)
