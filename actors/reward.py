"""The reward-model scorer: batched scores for rollouts (token ids) or for texts (the HTTP service)."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from actors.reference import default_device
from pipeline.experience import RolloutBatch, Scores
from pipeline.modeling import disable_dropout, load_scalar_model, load_tokenizer
from pipeline.sequences import has_eos, pad_right, sequence_scores


class RewardScorer:
    """Scores = reward model at the last non-pad token + the normalising bias from training.

    The EOS trick (detail 6): a response that used its whole budget without emitting EOS gets
    `missing_eos_score` instead (None keeps the model's score).
    """

    def __init__(self, checkpoint: str, missing_eos_score: float | None = -1.0, batch_size: int = 64,
                 dtype: str = "float32", device: str | None = None):
        self.checkpoint = str(Path(checkpoint).resolve())
        self.device = device or default_device()
        self.tokenizer = load_tokenizer(checkpoint)
        self.model = load_scalar_model(checkpoint, self.tokenizer, dtype).to(self.device).eval()
        disable_dropout(self.model)
        self.bias = float(getattr(self.model.config, "reward_bias", 0.0) or 0.0)
        self.missing_eos_score, self.batch_size = missing_eos_score, batch_size
        self.max_length = int(getattr(self.model.config, "max_position_embeddings", 2048))

    @torch.no_grad()
    def _raw(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = []
        for i in range(0, ids.shape[0], self.batch_size):
            out.append(sequence_scores(self.model, ids[i : i + self.batch_size].to(self.device),
                                       mask[i : i + self.batch_size].to(self.device)).float().cpu())
        return torch.cat(out) + self.bias

    def score_rollout(self, batch: RolloutBatch) -> Scores:
        t0 = time.perf_counter()
        ids = torch.cat([batch.prompts, batch.responses], 1)
        mask = torch.cat([batch.prompt_mask, batch.response_mask], 1)
        raw = self._raw(ids, mask)
        eos = has_eos(batch.responses, batch.response_mask, self.tokenizer.eos_token_id)
        scores = raw if self.missing_eos_score is None else torch.where(eos, raw, torch.full_like(raw, self.missing_eos_score))
        return Scores(batch.batch_id, batch.shard, scores, raw, eos, time.perf_counter() - t0)

    def score_token_ids(self, sequences: list[list[int]]) -> list[float]:
        """Scores of whole tokenized sequences (query + response + EOS), no EOS trick."""
        ids, mask = pad_right(sequences, self.tokenizer.pad_token_id)
        return self._raw(ids, mask).tolist()
