"""The reference policy: the frozen SFT model, serving per-token log-probs of sampled responses."""

from __future__ import annotations

import time

import torch

from core.experience import RefLogprobs, RolloutBatch
from core.modeling import default_device, load_frozen
from core.sequences import response_logprobs


class ReferenceLogprobs:
    """log pi_ref(a_t | s_t) under logits / temperature, computed exactly as the learner computes log pi."""

    def __init__(self, checkpoint: str, temperature: float, batch_size: int = 64, dtype: str = "float32",
                 device: str | None = None):
        self.device = device or default_device()
        self.model, self.tokenizer = load_frozen(checkpoint, "causal_lm", dtype, self.device)
        self.temperature, self.batch_size = temperature, batch_size

    @torch.no_grad()
    def logprobs(self, batch: RolloutBatch) -> RefLogprobs:
        t0 = time.perf_counter()
        out = []
        for i in range(0, batch.responses.shape[0], self.batch_size):
            sl = slice(i, i + self.batch_size)
            lp, _ = response_logprobs(self.model, batch.prompts[sl].to(self.device), batch.prompt_mask[sl].to(self.device),
                                      batch.responses[sl].to(self.device), batch.response_mask[sl].to(self.device),
                                      self.temperature)
            out.append(lp.cpu())
        return RefLogprobs(batch_id=batch.batch_id, shard=batch.shard, logprobs=torch.cat(out),
                           ref_s=time.perf_counter() - t0)
