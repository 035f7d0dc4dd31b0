"""Typed messages between the PPO roles. Shapes: B sequences, P prompt tokens (left-padded), R response tokens.

Messages of more than four fields are built by keyword only (`kw_only`): a call site names what it sets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


class Role(StrEnum):
    """The PPO roles, one name each: in the driver's calls, the ledger, timings (`timing/<role>_s`) and metrics
    (`perf/<role>_mfu`, `perf/<role>_tokens_per_s`)."""

    ROLLOUT = "rollout"
    REFERENCE = "reference"
    REWARD = "reward"
    LEARNER = "learner"


EXPERIENCE_ROLES = (Role.ROLLOUT, Role.REFERENCE, Role.REWARD)  # the roles that make a batch's experience, in that order


@dataclass(frozen=True, kw_only=True)
class RolloutRequest:
    """One shard of a PPO batch for one rollout worker."""

    batch_id: int  # the PPO step that will consume it
    shard: int
    prompt_indices: list[int]  # indices into the PPO prompt set, each repeated `samples_per_prompt` times
    prompts: list[list[int]]  # token ids, already truncated
    seed: int
    version: int | None = None  # the policy version it must be generated with; None: whatever the worker holds
    # in-flight rollout (`rollout.inflight`): the request's place in its worker's order (deterministic mode runs
    # them in it; None: re-sent to a restarted worker, run on arrival), and (decode step, version): from that step
    # on, its tokens are sampled by that version (deterministic mode; None: versions apply as they arrive)
    seq: int | None = None
    switch: tuple[int, int] | None = None


class VersionMismatch(RuntimeError):
    """A rollout worker was asked for a version it does not hold (it restarted and lost its weights)."""


@dataclass(kw_only=True)
class RolloutBatch:
    """Responses sampled by one worker with exactly one policy version.

    prompts (B, P) / prompt_mask (B, P): left-padded queries; the n samples of a prompt are adjacent.
    responses (B, R) / response_mask (B, R): cut after the first EOS, padded to R = max_new_tokens.
    logprobs (B, R): behaviour log-probs log softmax(logits / T) of the sampled tokens, 0 on padding.
    token_versions (B, R): the policy version that sampled each token, -1 on padding (in-flight rollout, where a
    weight version can arrive mid-sequence; None: every token is `policy_version`'s). `policy_version` is then the
    oldest of them.
    """

    batch_id: int
    shard: int
    worker: int
    policy_version: int
    prompt_indices: list[int]
    prompts: Tensor
    prompt_mask: Tensor
    responses: Tensor
    response_mask: Tensor
    logprobs: Tensor
    seconds: float = 0.0  # of the generation
    mfu: float | None = 0.0  # model FLOPs utilisation of the generation (core.work); None: not measured
    # max |log-prob| difference between the engine and the weights it was sent, on the probe of the load of this
    # version (vLLM); None where the model that generates is the one loaded (HF)
    engine_probe_diff: float | None = None
    token_versions: Tensor | None = None
    started: float | None = None  # in-flight: wall clock (time.time) when its rows joined the worker's loop

    def info(self) -> RolloutInfo:
        return RolloutInfo(batch_id=self.batch_id, shard=self.shard, seconds=self.seconds, mfu=self.mfu,
                           worker=self.worker, policy_version=self.policy_version,
                           prompt_indices=tuple(self.prompt_indices), sequences=self.responses.shape[0],
                           prompt_tokens=int(self.prompt_mask.sum()), response_tokens=int(self.response_mask.sum()),
                           engine_probe_diff=self.engine_probe_diff,
                           token_versions=version_counts(self.token_versions, self.response_mask, self.policy_version),
                           started=self.started)


@dataclass(kw_only=True)
class Scores:
    """Reward-model output for one rollout batch: scores (B,) after bias and EOS trick; has_eos (B,)."""

    batch_id: int
    shard: int
    scores: Tensor
    raw_scores: Tensor
    has_eos: Tensor
    seconds: float = 0.0
    mfu: float | None = None  # None: not measured (the reward service over HTTP runs its model elsewhere)

    def info(self) -> CallInfo:
        return CallInfo(batch_id=self.batch_id, shard=self.shard, seconds=self.seconds, mfu=self.mfu)


@dataclass
class RefLogprobs:
    batch_id: int
    shard: int
    logprobs: Tensor  # (B, R), 0 on padding
    seconds: float = 0.0
    mfu: float = 0.0

    def info(self) -> CallInfo:
        return CallInfo(batch_id=self.batch_id, shard=self.shard, seconds=self.seconds, mfu=self.mfu)


@dataclass(frozen=True, kw_only=True)
class CallInfo:
    """What the driver reads of one role's call on one shard: which shard, its seconds and MFU (None: not measured
    here). The tensors stay in the object store for the roles that read them: the reference and the reward scorer
    read the rollout, the learner all three (`ShardRefs`)."""

    batch_id: int
    shard: int
    seconds: float
    mfu: float | None


@dataclass(frozen=True, kw_only=True)
class RolloutInfo(CallInfo):
    """A rollout call's `CallInfo`, with the worker, the policy version, the prompts (indices into the PPO prompt
    set, one per sequence) and the real tokens of its sequences."""

    worker: int
    policy_version: int
    prompt_indices: tuple[int, ...]
    sequences: int
    prompt_tokens: int
    response_tokens: int
    engine_probe_diff: float | None = None  # `RolloutBatch.engine_probe_diff`
    token_versions: dict[int, int] = field(default_factory=dict)  # policy version -> response tokens it sampled
    started: float | None = None  # `RolloutBatch.started`


def version_counts(token_versions: Tensor | None, mask: Tensor, version: int) -> dict[int, int]:
    """{policy version: response tokens it sampled}."""
    if token_versions is None:
        return {version: int(mask.sum())}
    versions, counts = token_versions[mask.bool()].unique(return_counts=True)
    return dict(zip(versions.tolist(), counts.tolist()))


def spans_versions(token_versions: Tensor | None, mask: Tensor) -> Tensor:
    """(B,) bool: the sequence's tokens were sampled by more than one policy version."""
    if token_versions is None:
        return torch.zeros(mask.shape[0], dtype=torch.bool)
    real = mask.bool()
    big, small = token_versions.masked_fill(~real, -(2**62)), token_versions.masked_fill(~real, 2**62)
    return real.any(-1) & (big.max(-1).values != small.min(-1).values)


def batch_timings(rollouts: list[RolloutInfo], references: list[CallInfo], scores: list[CallInfo]) -> dict[str, float]:
    """Seconds (the slowest shard's) and mean MFU of each role on one batch (`<role>_s`, `<role>_mfu`); a role
    without MFU has no key."""
    timings = {}
    for role, calls in zip(EXPERIENCE_ROLES, (rollouts, references, scores)):
        timings[f"{role}_s"] = max(c.seconds for c in calls)
        if all(c.mfu is not None for c in calls):  # a reward scored over HTTP is not logged as MFU 0
            timings[f"{role}_mfu"] = sum(c.mfu for c in calls) / len(calls)
    if all(r.started is not None for r in rollouts):  # in-flight shards overlap: the batch's span, first to last
        timings["rollout_s"] = max(r.started + r.seconds for r in rollouts) - min(r.started for r in rollouts)
    probes = [r.engine_probe_diff for r in rollouts if r.engine_probe_diff is not None]
    if probes:
        timings["engine_probe_diff"] = max(probes)
    return timings


@dataclass(frozen=True, kw_only=True)
class BatchInfo:
    """A collected batch as the driver records it (version, prompts, sizes, timings), without its tensors."""

    batch_id: int
    policy_version: int
    prompt_indices: list[int]  # one per sequence, in the order the learner joins the shards
    sequences: int
    prompt_tokens: int
    response_tokens: int
    timings: dict[str, float]
    token_versions: dict[int, int] = field(default_factory=dict)  # policy version -> response tokens it sampled

    @classmethod
    def of_calls(cls, rollouts: list[RolloutInfo], references: list[CallInfo], scores: list[CallInfo]) -> BatchInfo:
        counts: dict[int, int] = {}
        for r in rollouts:
            for v, n in r.token_versions.items():
                counts[v] = counts.get(v, 0) + n
        return cls(batch_id=rollouts[0].batch_id, policy_version=min(r.policy_version for r in rollouts),
                   prompt_indices=[i for r in rollouts for i in r.prompt_indices],
                   sequences=sum(r.sequences for r in rollouts), prompt_tokens=sum(r.prompt_tokens for r in rollouts),
                   response_tokens=sum(r.response_tokens for r in rollouts), timings=batch_timings(rollouts, references, scores),
                   token_versions=dict(sorted(counts.items())))

    @classmethod
    def of_experience(cls, exp: Experience) -> BatchInfo:
        """A batch restored from a checkpoint, joined before it was saved."""
        return cls(batch_id=exp.batch_id, policy_version=exp.policy_version,
                   prompt_indices=list(exp.prompt_indices), sequences=exp.size,
                   prompt_tokens=int(exp.prompt_mask.sum()), response_tokens=int(exp.response_mask.sum()),
                   timings=dict(exp.timings),
                   token_versions=version_counts(exp.token_versions, exp.response_mask, exp.policy_version))


@dataclass(frozen=True)
class ShardRefs:
    """A collected batch's results, each shard's rollout, reference log-probs and scores, left where the roles put
    them (Ray ObjectRefs, in shard order): the learner reads them once and joins them (`Experience.join`), so
    they travel from the object store to the learner only, not through the driver."""

    rollouts: list[Any]
    references: list[Any]
    rewards: list[Any]
    pad_id: int
    step: int | None = None  # streamed shards (rollout.inflight_batches stream): the step that joins them


@dataclass(kw_only=True)
class Experience:
    """A rollout joined with its reference log-probs and scores: what the learner consumes."""

    batch_id: int
    policy_version: int  # version that generated every sequence in it; in-flight rollout: the oldest token's
    prompt_indices: list[int]
    prompts: Tensor
    prompt_mask: Tensor
    responses: Tensor
    response_mask: Tensor
    logprobs: Tensor
    ref_logprobs: Tensor
    scores: Tensor
    has_eos: Tensor
    timings: dict[str, float] = field(default_factory=dict)
    token_versions: Tensor | None = None  # (B, R) `RolloutBatch.token_versions`; None: all `policy_version`'s

    @property
    def size(self) -> int:
        return self.responses.shape[0]

    def token_ages(self, learner_version: int) -> Tensor:
        """(B, R) versions between each token's sampler and the learner that trains on it (0 on padding)."""
        versions = (self.token_versions if self.token_versions is not None
                    else torch.full_like(self.responses, self.policy_version))
        return (learner_version - versions) * self.response_mask

    @classmethod
    def join(cls, rollouts: list[RolloutBatch], references: list[RefLogprobs], scores: list[Scores], pad_id: int,
             step: int | None = None) -> Experience:
        """Concatenate the shards of one batch (left-padding prompts to a common width). `step`: shards streamed
        in-flight from several batches, which the step's experience then holds (its `batch_id`)."""
        versions = {r.policy_version for r in rollouts}
        inflight = [r.token_versions is not None for r in rollouts]
        if any(inflight) and not all(inflight):
            raise ValueError("shards of one batch disagree: some carry per-token versions, some do not")
        if all(inflight):  # in-flight rollout: shards may start under different versions; the oldest is the batch's
            versions = {min(versions)}
        if step is not None and not all(inflight):
            raise ValueError("only in-flight shards (with per-token versions) are joined across batches")
        if len(versions) != 1 or (step is None and len({r.batch_id for r in rollouts}) != 1):
            raise ValueError(f"shards of one batch disagree: versions {versions}, batches {[r.batch_id for r in rollouts]}")
        for r, lp, s in zip(rollouts, references, scores):
            if (r.batch_id, r.shard) != (lp.batch_id, lp.shard) or (r.batch_id, r.shard) != (s.batch_id, s.shard):
                raise ValueError("reference/reward results do not match their rollout shard")
        P = max(r.prompts.shape[1] for r in rollouts)
        prompts = torch.cat([F.pad(r.prompts, (P - r.prompts.shape[1], 0), value=pad_id) for r in rollouts])
        prompt_mask = torch.cat([F.pad(r.prompt_mask, (P - r.prompt_mask.shape[1], 0), value=0) for r in rollouts])
        return cls(
            batch_id=rollouts[0].batch_id if step is None else step,
            policy_version=versions.pop(),
            prompt_indices=[i for r in rollouts for i in r.prompt_indices],
            prompts=prompts,
            prompt_mask=prompt_mask,
            responses=torch.cat([r.responses for r in rollouts]),
            response_mask=torch.cat([r.response_mask for r in rollouts]),
            logprobs=torch.cat([r.logprobs for r in rollouts]),
            ref_logprobs=torch.cat([lp.logprobs for lp in references]),
            scores=torch.cat([s.scores for s in scores]),
            has_eos=torch.cat([s.has_eos for s in scores]),
            timings=batch_timings([r.info() for r in rollouts], [lp.info() for lp in references], [s.info() for s in scores]),
            token_versions=torch.cat([r.token_versions for r in rollouts]) if all(inflight) else None,
        )
