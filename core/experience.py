"""Typed messages between the PPO roles. Shapes: B sequences, P prompt tokens (left-padded), R response tokens.

Messages of more than four fields are built by keyword only (`kw_only`): a call site names what it sets.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True, kw_only=True)
class RolloutRequest:
    """One shard of a PPO batch for one rollout worker."""

    batch_id: int  # the PPO step that will consume it
    shard: int
    prompt_indices: list[int]  # indices into the PPO prompt set, each repeated `samples_per_prompt` times
    prompts: list[list[int]]  # token ids, already truncated
    seed: int
    version: int | None = None  # the policy version it must be generated with; None: whatever the worker holds


class VersionMismatch(RuntimeError):
    """A rollout worker was asked for a version it does not hold (it restarted and lost its weights)."""


@dataclass(kw_only=True)
class RolloutBatch:
    """Responses sampled by one worker with exactly one policy version.

    prompts (B, P) / prompt_mask (B, P): left-padded queries; the n samples of a prompt are adjacent.
    responses (B, R) / response_mask (B, R): cut after the first EOS, padded to R = max_new_tokens.
    logprobs (B, R): behaviour log-probs log softmax(logits / T) of the sampled tokens, 0 on padding.
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
    generate_s: float = 0.0
    mfu: float = 0.0  # model FLOPs utilisation of the generation (core.throughput)


@dataclass(kw_only=True)
class Scores:
    """Reward-model output for one rollout batch: scores (B,) after bias and EOS trick; has_eos (B,)."""

    batch_id: int
    shard: int
    scores: Tensor
    raw_scores: Tensor
    has_eos: Tensor
    score_s: float = 0.0
    mfu: float | None = None  # None: not measured (the reward service over HTTP runs its model elsewhere)


@dataclass
class RefLogprobs:
    batch_id: int
    shard: int
    logprobs: Tensor  # (B, R), 0 on padding
    ref_s: float = 0.0
    mfu: float = 0.0


@dataclass(kw_only=True)
class Experience:
    """A rollout joined with its reference log-probs and scores: what the learner consumes."""

    batch_id: int
    policy_version: int  # version that generated every sequence in it
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

    @property
    def size(self) -> int:
        return self.responses.shape[0]

    @classmethod
    def join(cls, rollouts: list[RolloutBatch], refs: list[RefLogprobs], scores: list[Scores], pad_id: int) -> Experience:
        """Concatenate the shards of one batch (left-padding prompts to a common width)."""
        versions = {r.policy_version for r in rollouts}
        if len(versions) != 1 or len({r.batch_id for r in rollouts}) != 1:
            raise ValueError(f"shards of one batch disagree: versions {versions}, batches {[r.batch_id for r in rollouts]}")
        for r, lp, s in zip(rollouts, refs, scores):
            if (r.batch_id, r.shard) != (lp.batch_id, lp.shard) or (r.batch_id, r.shard) != (s.batch_id, s.shard):
                raise ValueError("reference/reward results do not match their rollout shard")
        P = max(r.prompts.shape[1] for r in rollouts)
        prompts = torch.cat([F.pad(r.prompts, (P - r.prompts.shape[1], 0), value=pad_id) for r in rollouts])
        prompt_mask = torch.cat([F.pad(r.prompt_mask, (P - r.prompt_mask.shape[1], 0), value=0) for r in rollouts])
        return cls(
            batch_id=rollouts[0].batch_id,
            policy_version=versions.pop(),
            prompt_indices=[i for r in rollouts for i in r.prompt_indices],
            prompts=prompts,
            prompt_mask=prompt_mask,
            responses=torch.cat([r.responses for r in rollouts]),
            response_mask=torch.cat([r.response_mask for r in rollouts]),
            logprobs=torch.cat([r.logprobs for r in rollouts]),
            ref_logprobs=torch.cat([lp.logprobs for lp in refs]),
            scores=torch.cat([s.scores for s in scores]),
            has_eos=torch.cat([s.has_eos for s in scores]),
            timings={
                "generate_s": max(r.generate_s for r in rollouts),
                "ref_s": max(lp.ref_s for lp in refs),
                "score_s": max(s.score_s for s in scores),
                "generate_mfu": sum(r.mfu for r in rollouts) / len(rollouts),
                "ref_mfu": sum(lp.mfu for lp in refs) / len(refs),
                # a reward scored over HTTP has no MFU here: the key is left out, not logged as 0
                **({"score_mfu": sum(s.mfu for s in scores) / len(scores)}
                   if all(s.mfu is not None for s in scores) else {}),
            },
        )
