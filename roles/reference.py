"""The reference policy: the frozen SFT model, serving per-token log-probs of sampled responses."""

from __future__ import annotations

import torch

from rayrlhf.core.experience import RefLogprobs, RolloutBatch
from rayrlhf.core.forward import check_packing, response_logprobs
from rayrlhf.core.modeling import default_device, load_frozen
from rayrlhf.core.plan import ForwardPlan
from rayrlhf.core.work import ModelCost, WorkMeter


class ReferenceLogprobs:
    """log pi_ref(a_t | s_t) under logits / temperature, computed exactly as the learner computes log pi."""

    def __init__(self, checkpoint: str, temperature: float, batch_size: int = 64, dtype: str = "float32",
                 device: str | None = None, max_tokens: int | None = None, share_prompts: bool = False):
        self.device = device or default_device()
        self.model, self.tokenizer = load_frozen(checkpoint, "causal_lm", dtype, self.device)
        self.temperature, self.dtype = temperature, dtype
        if max_tokens is not None:
            check_packing(self.model, "reference.max_tokens_per_micro_batch")
        self.plan = ForwardPlan.build(batch_size, max_tokens, share_prompts, [self.model], device=self.device)
        self.cost = ModelCost.of(self.model)

    @torch.no_grad()
    def logprobs(self, batch: RolloutBatch) -> RefLogprobs:
        """The plan's micro batches (similar lengths; packed under a token budget; a prompt's samples together and
        its prompt run once where prompts are shared), in batch order."""
        meter = WorkMeter(self.device, self.dtype)
        out = torch.zeros(batch.responses.shape, dtype=torch.float32)
        for mb in self.plan.cut(batch.prompts, batch.prompt_mask, batch.responses, batch.response_mask):
            lp, _ = response_logprobs(self.model, mb.prompts, mb.prompt_mask, mb.responses, mb.response_mask,
                                      self.temperature, packed=self.plan.packed, share_prompts=mb.one_pass)
            meter.ran(self.cost, mb)
            out[mb.rows, : lp.shape[1]] = lp.float().cpu()
        work = meter.stop()
        return RefLogprobs(batch_id=batch.batch_id, shard=batch.shard, logprobs=out, seconds=work.seconds, mfu=work.mfu)
