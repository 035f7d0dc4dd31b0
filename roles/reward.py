"""The reward-model scorer: batched scores for rollouts (token ids) or for texts (the HTTP service)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from rayrlhf.core.experience import RolloutBatch, Scores
from rayrlhf.core.forward import check_packing, response_scores, sequence_scores
from rayrlhf.core.modeling import default_device, load_frozen
from rayrlhf.core.padding import has_eos, pad_right
from rayrlhf.core.plan import ForwardPlan
from rayrlhf.core.ppo_math import eos_trick
from rayrlhf.core.work import ModelCost, WorkMeter


@dataclass(frozen=True)
class TokenScores:
    """Scores of B (prompt, response) pairs: after the EOS trick, before it, and whether each response has EOS."""

    scores: Tensor  # (B,)
    raw_scores: Tensor  # (B,) reward model + bias
    has_eos: Tensor  # (B,) bool


class RewardScorer:
    """Scores = reward model at the last non-pad token + the normalising bias from training.

    The EOS trick (detail 6): a response that used its whole budget without emitting EOS gets
    `missing_eos_score` instead (None keeps the model's score).
    """

    def __init__(self, checkpoint: str, missing_eos_score: float | None = -1.0, batch_size: int = 64,
                 dtype: str = "float32", device: str | None = None, max_tokens: int | None = None,
                 share_prompts: bool = False):
        self.checkpoint = str(Path(checkpoint).resolve())
        self.device = device or default_device()
        self.model, self.tokenizer = load_frozen(checkpoint, "scalar", dtype, self.device)
        self.bias = float(getattr(self.model.config, "reward_bias", 0.0) or 0.0)
        self.missing_eos_score, self.dtype = missing_eos_score, dtype
        if max_tokens is not None:
            check_packing(self.model, "reward.max_tokens_per_micro_batch")
        self.plan = ForwardPlan.build(batch_size, max_tokens, share_prompts, [self.model], device=self.device)
        self.cost = ModelCost.of(self.model, causal_lm=False)
        self.max_length = int(getattr(self.model.config, "max_position_embeddings", 2048))

    @torch.no_grad()
    def _raw(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Scores in row order, computed in micro batches of similar lengths (packed under a token budget)."""
        out = torch.zeros(ids.shape[0])
        for group in self.plan.groups(mask.sum(-1).tolist()):
            rows = torch.tensor(group)
            keep = mask[rows].any(0)  # columns that are padding in every row of the group cost nothing
            out[rows] = sequence_scores(self.model, ids[rows][:, keep].to(self.device), mask[rows][:, keep].to(self.device),
                                        self.plan.packed).float().cpu()
        return out + self.bias

    def score_tokens(self, prompts: Tensor, prompt_mask: Tensor, responses: Tensor, response_mask: Tensor) -> TokenScores:
        """Scores of left-padded prompts (B, P) followed by their responses (B, R), with the EOS trick."""
        return self._score_rollout_rows(prompts, prompt_mask, responses, response_mask)

    @torch.no_grad()
    def _score_rollout_rows(self, prompts: Tensor, prompt_mask: Tensor, responses: Tensor, response_mask: Tensor,
                            meter: WorkMeter | None = None) -> TokenScores:
        """Scores in the plan's micro batches (each distinct prompt once where prompts are shared); `meter` counts
        their work as it ran."""
        raw = torch.zeros(prompts.shape[0])
        for mb in self.plan.cut(prompts, prompt_mask, responses, response_mask):
            raw[mb.rows] = response_scores(self.model, mb.prompts, mb.prompt_mask, mb.responses, mb.response_mask,
                                           packed=self.plan.packed, share_prompts=mb.one_pass).float().cpu()
            if meter is not None:
                meter.ran(self.cost, mb)
        raw = raw + self.bias
        eos = has_eos(responses, response_mask, self.tokenizer.eos_token_id)
        return TokenScores(eos_trick(raw, eos, self.missing_eos_score), raw, eos)

    def score_rollout(self, batch: RolloutBatch) -> Scores:
        meter = WorkMeter(self.device, self.dtype)
        s = self._score_rollout_rows(batch.prompts, batch.prompt_mask, batch.responses, batch.response_mask, meter)
        work = meter.stop()
        return Scores(batch_id=batch.batch_id, shard=batch.shard, scores=s.scores, raw_scores=s.raw_scores,
                      has_eos=s.has_eos, seconds=work.seconds, mfu=work.mfu)

    def score_token_ids(self, sequences: list[list[int]]) -> list[float]:
        """Scores of whole tokenized sequences (query + response + EOS), no EOS trick."""
        ids, mask = pad_right(sequences, self.tokenizer.pad_token_id)
        return self._raw(ids, mask).tolist()
