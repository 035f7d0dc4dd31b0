"""The reference policy: the frozen SFT model, serving per-token log-probs of sampled responses."""

from __future__ import annotations

import time

import torch

from rayrlhf.core.experience import RefLogprobs, RolloutBatch
from rayrlhf.core.modeling import default_device, load_frozen
from rayrlhf.core.sequences import check_packing, prefix_runs_once_exactly, response_logprobs, rollout_micro_batches
from rayrlhf.core.throughput import forward_flops, head_params, mfu, model_params, peak_flops


class ReferenceLogprobs:
    """log pi_ref(a_t | s_t) under logits / temperature, computed exactly as the learner computes log pi."""

    def __init__(self, checkpoint: str, temperature: float, batch_size: int = 64, dtype: str = "float32",
                 device: str | None = None, max_tokens: int | None = None, share_prompts: bool = False):
        self.device = device or default_device()
        self.model, self.tokenizer = load_frozen(checkpoint, "causal_lm", dtype, self.device)
        self.temperature, self.batch_size, self.max_tokens = temperature, batch_size, max_tokens
        if max_tokens is not None:
            check_packing(self.model, "reference.max_tokens_per_micro_batch")
        # padded micro batches only, on a model whose cache keeps the whole prompt
        self.share_prompts = share_prompts and max_tokens is None and prefix_runs_once_exactly(self.model)
        self.dtype, self.n_params = dtype, model_params(self.model)[0]
        self.n_head = head_params(self.model.named_parameters())

    @torch.no_grad()
    def logprobs(self, batch: RolloutBatch) -> RefLogprobs:
        """Micro batches of similar lengths (`micro_batch_groups`; packed under a token budget; a prompt's samples
        together and its prompt run once with `share_prompts`), in batch order."""
        peak = peak_flops(self.device, self.dtype)  # measured once, outside the timed work
        t0 = time.perf_counter()
        out = torch.zeros(batch.responses.shape, dtype=torch.float32)
        computed, attention = 0, 0.0  # as the micro batches ran
        for mb in rollout_micro_batches(batch.prompts, batch.prompt_mask, batch.responses, batch.response_mask,
                                        self.batch_size, self.max_tokens, self.share_prompts, self.device):
            lp, _ = response_logprobs(self.model, mb.prompts, mb.prompt_mask, mb.responses, mb.response_mask,
                                      self.temperature, packed=self.max_tokens is not None, share_prompts=mb.one_pass)
            c, a = mb.work(self.model.config)
            computed, attention = computed + c, attention + a
            out[mb.rows, : lp.shape[1]] = lp.float().cpu()
        seconds = time.perf_counter() - t0
        flops = (forward_flops(self.n_params, computed) + forward_flops(self.n_head, int(batch.response_mask.sum()))
                 + attention)
        return RefLogprobs(batch_id=batch.batch_id, shard=batch.shard, logprobs=out, ref_s=seconds,
                           mfu=mfu(flops, seconds, peak))
