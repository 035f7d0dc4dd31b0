"""Batches in flight: per shard, the request and the ObjectRefs of its three chained calls; how a batch's
failures are classified into work to dispatch again and errors that end the run.

Each call returns two objects (`num_returns=2`): its result, whose tensors the next roles read from the object
store (the reference and the reward scorer the rollout's, the learner all three), and a small `CallInfo`, all the
driver reads. A call that failed fails both, so the driver finds every failure on the infos alone."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import ray
from ray import ObjectRef
from ray.actor import ActorHandle
from ray.exceptions import RayActorError, RayTaskError

from rayrlhf.core.experience import (
    EXPERIENCE_ROLES, BatchInfo, CallInfo, Experience, Role, RolloutInfo, RolloutRequest, ShardRefs, VersionMismatch,
)
from rayrlhf.pipeline.calls import RoleTimeout, first_line

# The calls of one shard, in chain order: reference and reward both read the rollout's result.
ROLES = EXPERIENCE_ROLES


@dataclass(kw_only=True)
class ShardCalls:
    """One shard of a dispatched batch: its request, its rollout worker, the reference and reward replicas
    that score it, and its three calls (each a result and its info, `dispatch`)."""

    request: RolloutRequest
    worker: ActorHandle
    reference_actor: ActorHandle
    reward_actor: ActorHandle
    regenerated: bool = False  # streamed: generated again once already for its stale tokens (ppo.stale_tokens)
    infos: tuple[RolloutInfo, CallInfo, CallInfo] | None = None  # streamed: its calls' infos, once read
    failures: int = 0  # streamed: times its calls failed and went again
    # each set by `dispatch`
    rollout: ObjectRef | None = None  # -> RolloutBatch
    reference: ObjectRef | None = None  # -> RefLogprobs
    reward: ObjectRef | None = None  # -> Scores
    rollout_info: ObjectRef | None = None  # -> RolloutInfo
    reference_info: ObjectRef | None = None  # -> CallInfo
    reward_info: ObjectRef | None = None  # -> CallInfo

    def dispatch(self, role: Role) -> None:
        """(Re)issue the call of `role`: generate the request, or score the shard's current rollout."""
        self.infos = None
        if role == Role.ROLLOUT:
            self.rollout, self.rollout_info = self.worker.generate.remote(self.request)
        elif role == Role.REFERENCE:
            self.reference, self.reference_info = self.reference_actor.logprobs.remote(self.rollout)
        else:
            self.reward, self.reward_info = self.reward_actor.score.remote(self.rollout)

    def calls(self) -> list[ObjectRef]:
        return [self.rollout_info, self.reference_info, self.reward_info]

    def call(self, role: Role) -> ObjectRef:
        """The info of the call of `role`: what the driver waits for and reads."""
        return {Role.ROLLOUT: self.rollout_info, Role.REFERENCE: self.reference_info, Role.REWARD: self.reward_info}[role]


@dataclass
class InFlight:
    """One dispatched batch; `info` once collected; `experience` once joined (a batch buffered at a checkpoint is
    saved joined, and comes back so from it)."""

    batch_id: int
    version: int  # the policy version every shard is generated with
    shards: list[ShardCalls]
    experience: Experience | None = None
    info: BatchInfo | None = None
    # streamed (rollout.inflight_batches stream): the shards a step took, from any batches, their rollouts' infos
    taken: list[RolloutInfo] | None = None

    @property
    def streamed(self) -> bool:
        return self.taken is not None

    def infos(self) -> list[ObjectRef]:
        return [s.call(role) for role in ROLES for s in self.shards]

    def results(self, pad_id: int) -> ShardRefs:
        """Where the collected batch's tensors are: what the learner reads (`read_batch`)."""
        return ShardRefs([s.rollout for s in self.shards], [s.reference for s in self.shards],
                         [s.reward for s in self.shards], pad_id, self.batch_id if self.streamed else None)


@dataclass(frozen=True)
class ShardFailure:
    """A shard's first failed call in chain order, failed because its actor died (or came back restarted
    without the batch's weights): the work to dispatch again."""

    role: Role
    error: str


@dataclass
class BatchResults:
    """The infos of a batch's calls, per role in shard order."""

    rollouts: list[RolloutInfo]
    references: list[CallInfo]
    rewards: list[CallInfo]


def classify_failures(batch_id: int, errors: list[tuple[str, int, BaseException]]) -> dict[int, ShardFailure]:
    """{shard: failure} from the errors of a batch's calls, given in chain order (every rollout, then every
    reference call, then every reward call). A dead actor or a version mismatch is work to dispatch again;
    a later call of a shard already failed fails with it (its input failed) and goes again with it; any other
    error ends the run naming the role, batch and shard."""
    failed: dict[int, ShardFailure] = {}
    for role, shard, e in errors:
        if isinstance(e, (RayActorError, VersionMismatch)):
            if shard not in failed:
                failed[shard] = ShardFailure(role, first_line(e))
        elif shard not in failed:
            raise RuntimeError(f"{role} of batch {batch_id} shard {shard} failed: {getattr(e, 'cause', e)!r}") from e
    return failed


def finished_shards(flights: list[InFlight]) -> tuple[list[tuple[InFlight, ShardCalls]], list[ObjectRef]]:
    """Streamed batches: the shards whose three calls all finished (well or not), in the order of `flights` and
    of their shards; and the infos of the calls still running."""
    infos = [ref for fl in flights for sh in fl.shards for ref in sh.calls()]
    if not infos:
        return [], []
    _, running = ray.wait(infos, num_returns=len(infos), timeout=0)
    late = set(running)
    return [(fl, sh) for fl in flights for sh in fl.shards if not late.intersection(sh.calls())], running


def await_batch(flight: InFlight, timeout_s: float, worker_index: Callable[[ActorHandle], int]) -> None:
    """Wait until every call of the batch has finished; a RoleTimeout naming the calls that did not."""
    infos = flight.infos()
    _, pending = ray.wait(infos, num_returns=len(infos), timeout=timeout_s)
    if pending:
        late = [f"{role} of shard {s}" + (f" (rollout worker {worker_index(shard.worker)})" if role == Role.ROLLOUT else "")
                for role in ROLES for s, shard in enumerate(flight.shards) if shard.call(role) in pending]
        raise RoleTimeout(f"batch {flight.batch_id}: {', '.join(late)}", timeout_s)


def gather(flight: InFlight) -> tuple[BatchResults, dict[int, ShardFailure]]:
    """The infos of every call of a batch that has finished, and the failures among them by shard id: one
    `ray.get` of the whole batch's infos; only when a call failed are they read one by one, to name which."""
    infos, n = flight.infos(), len(flight.shards)
    try:
        values = ray.get(infos)
    except (RayActorError, VersionMismatch, RayTaskError):
        pass  # read them one by one below
    else:
        return BatchResults(*(values[i * n : (i + 1) * n] for i in range(len(ROLES)))), {}  # infos() is in role order
    results: dict[Role, list] = {role: [None] * n for role in ROLES}
    errors = []
    for role in ROLES:
        for s, shard in enumerate(flight.shards):
            try:
                results[role][s] = ray.get(shard.call(role))
            except (RayActorError, VersionMismatch, RayTaskError) as e:
                errors.append((role, shard.request.shard, e))  # its id: a streamed batch's shards leave it
    failed = classify_failures(flight.batch_id, errors)
    return BatchResults(results[Role.ROLLOUT], results[Role.REFERENCE], results[Role.REWARD]), failed
