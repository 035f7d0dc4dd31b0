"""The PPO learner: policy (from SFT) and a separate critic (from the reward model), updated on experience.

One `train_step` = advantages from the batch (GAE with the per-token KL penalty, or RLOO/GRPO), then
`ppo_epochs` passes over shuffled minibatches, each accumulated over micro-batches. Losses are token sums
divided by the minibatch's token count, so the micro-batch size does not change the update.

In a learner group (torch.distributed initialised with N > 1 ranks) policy and critic are sharded with FSDP2
(`core.sharding`): every rank runs this same code on the whole batch, takes its token-balanced share of each
minibatch and the gradients are summed over ranks, so N ranks make the one-process update.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import get_constant_schedule, get_cosine_schedule_with_warmup

from rayrlhf.core import ppo_math as pm
from rayrlhf.core.checkpoints import load_trainable_state, trainable_state
from rayrlhf.core.config import Config, ModelConfig, PPOConfig
from rayrlhf.core.experience import Experience
from rayrlhf.core.modeling import (
    DTYPES, default_device, disable_dropout, load_causal_lm, load_scalar_model, load_tokenizer, save_checkpoint,
    trainable,
    unwrap,
)
from rayrlhf.core.sequences import (
    check_packing, micro_batch_groups, prefix_runs_once_exactly, prompt_ids, repeats_a_prompt, response_logprobs,
    response_values, response_work, token_budget_groups, trim_padding,
)
from rayrlhf.core.sharding import (
    Rank, all_gather_rows, all_reduce_max, all_reduce_sum, clip_grad_norm, full_weights, one_rank_group, rank_share,
    shard_model,
)
from rayrlhf.core.throughput import (
    forward_flops, mfu, model_head_params, model_params, peak_flops, training_flops,
)
from rayrlhf.core.weight_sync import WeightsPacket, stream_packet


class StalenessError(RuntimeError):
    """A batch older than `ppo.max_staleness` versions reached the learner."""


@dataclass
class Advantages:
    """What one batch's update reads, each (B, R) and 0 on padding: the per-token KL to the reference, the
    (whitened) advantages, and for GAE the old values, the returns and the per-token rewards."""

    kl: torch.Tensor
    advantages: torch.Tensor
    values: torch.Tensor | None = None
    returns: torch.Tensor | None = None
    rewards: torch.Tensor | None = None


class PPOLearner:
    """The policy and the critic of one PPO run, their optimizers, and the policy version they hold.

    Built from the PPO config and what else it reads: the model config (dtype, LoRA), the sampling
    temperature (log-probs are of logits / T, as the rollout sampled them), the response budget and the run's seed.
    """

    def __init__(self, pc: PPOConfig, model: ModelConfig, sft_checkpoint: str, rm_checkpoint: str, *,
                 temperature: float, seed: int, max_new_tokens: int, device: str | None = None,
                 startup_timeout_s: float = 900.0):
        self.pc, self.model_cfg, self.temperature = pc, model, temperature
        self.max_new_tokens = max_new_tokens  # the constant of ppo.loss_aggregation seq_sum_norm
        self.checkpoints = {"policy": sft_checkpoint, "critic": rm_checkpoint}  # what a sharded export starts from
        self.device = device or default_device()
        if model.mixed_precision != "no" and not torch.distributed.is_initialized():
            one_rank_group(startup_timeout_s)  # MixedPrecisionPolicy is FSDP2's: a group of one
        self.rank = Rank.current()
        # FSDP2-wrapped: a group of N > 1 ranks, or one rank in mixed precision. Every path below that a group
        # takes (sharded checkpoints, gathered weights, summed figures) is also right for a group of one.
        self.fsdp = self.rank.sharded or model.mixed_precision != "no"
        torch.manual_seed(seed)
        self.tokenizer = load_tokenizer(sft_checkpoint)
        # dropout off after LoRA is applied: its adapters' dropout too (detail 4)
        self.policy = trainable(load_causal_lm(sft_checkpoint, self.tokenizer, model.dtype), model, "CAUSAL_LM")
        self.policy = self.policy.to(self.device)
        disable_dropout(self.policy)
        self.critic, self.value_bias = None, 0.0
        if pc.advantage_estimator == "gae":
            critic = load_scalar_model(rm_checkpoint, self.tokenizer, model.dtype)  # detail 8
            # The reward model's normalising bias is part of its score (`RewardScorer`): the critic starts as the
            # same function, V = head(h) + bias, as Huang et al.'s critic (their ScalarModel's forward applies
            # it). Without it V starts `bias` off the returns, which shifts GAE's advantages by
            # -bias (gamma lam)^(T-1-t), largest at EOS: a push on when to stop that whitening keeps.
            self.value_bias = float(getattr(critic.config, "reward_bias", 0.0) or 0.0)
            self.critic = trainable(critic, model, "SEQ_CLS").to(self.device)
            disable_dropout(self.critic)
        self.packed = pc.max_tokens_per_micro_batch is not None  # micro batches packed, not padded
        if self.packed:
            for m in (self.policy, self.critic):
                if m is not None:  # the critic: GAE only
                    check_packing(m, "ppo.max_tokens_per_micro_batch")
        if self.fsdp:  # before the optimizers: they hold the shards
            self.policy = shard_model(self.policy, model.mixed_precision)
            self.critic = shard_model(self.critic, model.mixed_precision) if self.critic is not None else None
        # A prompt's samples run its prompt once: padded micro batches (the KV cache it needs is off under gradient
        # checkpointing), in one process (a group's ranks must make the same passes, and under FSDP2 a fully
        # trained model called twice before one backward fails, seen with the reward model), on models whose
        # cache keeps the whole prompt.
        self.share_prompts = (pc.share_prompts and not self.packed and not model.gradient_checkpointing
                              and not self.fsdp and prefix_runs_once_exactly(self.policy)
                              and (self.critic is None or prefix_runs_once_exactly(self.critic)))
        # positions and attention FLOPs each model ran in this update (`_count`)
        self._work: defaultdict[str, list[float]] = defaultdict(lambda: [0, 0.0])
        # the update's behaviour-vs-proximal sums (`_tally_offpolicy`)
        self._offpolicy: defaultdict[str, float] = defaultdict(float)
        self.version = 0
        updates = pc.steps * pc.ppo_epochs * (pc.rollout_batch_size // pc.minibatch_size)
        self.opt, self.sched = self._optimizer(self.policy, pc.lr, updates)
        self.critic_opt, self.critic_sched = (self._optimizer(self.critic, pc.critic_lr, updates)
                                              if self.critic is not None else (None, None))
        self.generator = torch.Generator().manual_seed(seed)

    @classmethod
    def from_config(cls, cfg: Config, sft_checkpoint: str, rm_checkpoint: str, device: str | None = None) -> PPOLearner:
        return cls(cfg.ppo, cfg.model, sft_checkpoint, rm_checkpoint, temperature=cfg.rollout.temperature,
                   seed=cfg.run.seed, max_new_tokens=cfg.rollout.max_new_tokens, device=device,
                   startup_timeout_s=cfg.ray.startup_timeout_s)

    def _optimizer(self, model, lr: float, updates: int):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, eps=self.pc.adam_eps,
                                weight_decay=self.pc.weight_decay)
        sched = (get_cosine_schedule_with_warmup(opt, 0, updates) if self.pc.lr_schedule == "cosine"
                 else get_constant_schedule(opt))
        return opt, sched

    # --- advantages -------------------------------------------------------------------------------

    def _share(self, prompts: torch.Tensor, prompt_mask: torch.Tensor) -> bool:
        """Run each prompt of a micro batch once where one repeats (`self.share_prompts` says where it may)."""
        return self.share_prompts and repeats_a_prompt(prompts, prompt_mask)

    def _count(self, key: str, model, prompts: torch.Tensor, pmask: torch.Tensor, rmask: torch.Tensor,
               one_pass: bool) -> None:
        """Add one forward over these rows, as it ran, to the update's work (MFU counts what runs)."""
        positions, attention = response_work(model.config, pmask, rmask, prompts if one_pass else None)
        self._work[key][0] += positions
        self._work[key][1] += attention

    def _values(self, exp: Experience, sl: slice | torch.Tensor, count: str | None = None) -> torch.Tensor:
        """Critic's V(s_t) before each response token -> (b, R); differentiable when grad is enabled. `count`: the
        work key this forward adds to (`_count`)."""
        prompts, pmask = trim_padding(exp.prompts[sl], exp.prompt_mask[sl])
        one_pass = self._share(prompts, pmask)
        if count is not None:
            self._count(count, self.critic, prompts, pmask, exp.response_mask[sl], one_pass)
        tensors = (prompts, pmask, exp.responses[sl], exp.response_mask[sl])
        return self._critic(*(t.to(self.device) for t in tensors), one_pass)

    def _critic(self, prompts: torch.Tensor, pmask: torch.Tensor, responses: torch.Tensor, rmask: torch.Tensor,
                one_pass: bool) -> torch.Tensor:
        """V(s_t) before each response token -> (b, R): the critic's head plus the reward model's bias."""
        values = response_values(self.critic, prompts, pmask, responses, rmask, packed=self.packed,
                                 share_prompts=one_pass)
        return values + self.value_bias

    def _single_update(self, exp: Experience) -> bool:
        """One epoch, one minibatch, one padded micro batch: the step's only critic forward is on the old weights
        (under a token budget the minibatch may be cut in several packed micro batches, each with its backward)."""
        pc = self.pc
        return (self.critic is not None and not self.fsdp and not self.packed and pc.ppo_epochs == 1
                and min(pc.minibatch_size, pc.micro_batch_size) >= exp.size)

    def _one_optimizer_step(self, exp: Experience) -> bool:
        """One epoch of one minibatch: the policy that starts the update is the one every micro batch runs, so
        its log-probs are the proximal policy's (`_minibatch`) and need no forward of their own."""
        return self.pc.ppo_epochs == 1 and self.pc.minibatch_size >= exp.size

    @torch.no_grad()
    def _proximal_logprobs(self, exp: Experience) -> torch.Tensor:
        """log pi_prox: the policy's log-probs of the batch's tokens before this update -> (B, R), no grad."""
        def forward(rows: torch.Tensor) -> torch.Tensor:
            prompts, pmask, responses, rmask = trim_padding(exp.prompts[rows], exp.prompt_mask[rows],
                                                            exp.responses[rows], exp.response_mask[rows])
            one_pass = self._share(prompts, pmask)
            self._count("policy_forward", self.policy, prompts, pmask, rmask, one_pass)
            self._work["head_forward"][0] += int(rmask.sum())
            logp, _ = response_logprobs(self.policy, *(t.to(self.device) for t in (prompts, pmask, responses, rmask)),
                                        self.temperature, packed=self.packed, share_prompts=one_pass)
            return logp

        return self._batch_forward(exp, self.policy, forward)

    def advantages(self, exp: Experience, values_graph: torch.Tensor | None = None) -> Advantages:
        """KL, advantages (and values, returns for GAE). `values_graph`: the critic's V on the whole batch,
        computed with grad for the value loss, which GAE then reads instead of a second forward."""
        pc, mask = self.pc, exp.response_mask.float()
        kl = pm.kl_estimate(exp.logprobs, exp.ref_logprobs, pc.kl_estimator) * mask
        values = returns = rewards = None
        if pc.advantage_estimator == "gae":
            if values_graph is None:
                values_graph = self._old_values(exp)
            values = values_graph.detach().cpu() * mask
            rewards = pm.token_rewards(exp.scores, kl, mask, pc.kl_coef)
            adv, returns = pm.gae(rewards, values, mask, pc.gamma, pc.lam)
        else:
            adv = pm.sequence_advantages(exp.scores, kl, mask, pc.kl_coef, pc.samples_per_prompt, pc.advantage_estimator)
        return Advantages(kl=kl, advantages=pm.whiten(adv, mask) if pc.whiten_advantages else adv, values=values,
                          returns=returns, rewards=rewards)

    @torch.no_grad()
    def _old_values(self, exp: Experience) -> torch.Tensor:
        """V(s_t) of the whole batch before the update -> (B, R)."""
        return self._batch_forward(exp, self.critic, lambda rows: self._values(exp, rows, count="critic_forward"))

    def _batch_forward(self, exp: Experience, model, forward: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """`forward(rows) -> (b, R')` over the whole batch, in micro batches cut as the update cuts them -> (B, R);
        in a group each rank computes an equal contiguous share and the shares are gathered."""
        model.eval()
        rows = torch.arange(exp.size)
        if self.fsdp:
            n = exp.size // self.rank.world
            rows = rows[self.rank.rank * n : (self.rank.rank + 1) * n]
        # cut as the update cuts: micro batches of micro_batch_size rows, or packed under the token budget
        budget, n_groups = self.pc.max_tokens_per_micro_batch, None
        lengths = (exp.prompt_mask[rows].sum(-1) + exp.response_mask[rows].sum(-1)).tolist()
        if budget is not None and self.fsdp:  # every rank runs as many forwards as the busiest
            n_groups = int(all_reduce_max(float(len(token_budget_groups(lengths, budget)))))
        # a prompt's samples in one micro batch, so that the critic runs the prompt once (`_values`)
        prompts_of = prompt_ids(exp.prompts[rows], exp.prompt_mask[rows]) if self.share_prompts else None
        mine = torch.zeros(len(rows), exp.responses.shape[1])
        for group in micro_batch_groups(lengths, self.pc.micro_batch_size, budget, n_groups, prompts_of):
            out = forward(rows[group]).float().cpu()
            mine[group, : out.shape[1]] = out
        return torch.cat(all_gather_rows(mine, self.rank.world)) if self.fsdp else mine

    # --- update -----------------------------------------------------------------------------------

    def train_step(self, exp: Experience) -> dict[str, float]:
        """One policy version: advantages, then PPO epochs over minibatches. Returns `ppo/...` metrics."""
        pc = self.pc
        staleness = self.version - exp.policy_version
        if not 0 <= staleness <= pc.max_staleness:
            raise StalenessError(f"learner at version {self.version} got batch {exp.batch_id} generated by "
                                 f"version {exp.policy_version}; ppo.max_staleness is {pc.max_staleness}")
        for name, t in (("behaviour log-probs", exp.logprobs), ("reference log-probs", exp.ref_logprobs),
                        ("reward scores", exp.scores)):
            if not torch.isfinite(t).all():
                raise FloatingPointError(f"non-finite {name} in batch {exp.batch_id}")
        peak = peak_flops(self.device, self.model_cfg.train_compute_dtype)
        t0, cpu0 = time.perf_counter(), time.process_time()
        self._work.clear()
        mask = exp.response_mask.float()
        # With a single update the value loss's forward is the one GAE needs: run the critic once, not twice.
        values_graph = None
        if self._single_update(exp):
            self.critic.train()
            values_graph = self._values(exp, slice(None))
        adv = self.advantages(exp, values_graph)
        # The proximal policy: the learner's log-probs before this update (`ppo.proximal_policy`). With one optimizer
        # step they are the step's own log-probs, detached (`_minibatch`); otherwise one forward over the batch.
        prox = None
        if pc.proximal_policy and not self._one_optimizer_step(exp):
            prox = self._proximal_logprobs(exp)
            self.policy.train()
        self._offpolicy.clear()
        sums: dict[str, float] = {}
        n_updates = 0
        self.policy.train()
        if self.critic is not None:
            self.critic.train()
        for epoch in range(pc.ppo_epochs):
            perm = torch.randperm(exp.size, generator=self.generator)
            for start in range(0, exp.size, pc.minibatch_size):
                idx = perm[start : start + pc.minibatch_size]
                # Before the first update of an on-policy batch the learner holds the weights that sampled it:
                # its log-probs must equal the rollout backend's (HF or vLLM), up to float error.
                check = staleness == 0 and epoch == 0 and start == 0
                stats = self._minibatch(exp, adv, mask, idx, values_graph, check, prox, first_epoch=epoch == 0)
                for k, v in stats.items():
                    sums[k] = sums.get(k, 0.0) + v
                n_updates += 1
        self.version += 1
        seq_kl = adv.kl.sum(-1)
        behaviour = sums.pop("ppo/behaviour_logprob_max_diff", None)  # one minibatch's maximum, not a mean
        metrics = {k: v / n_updates for k, v in sums.items()}
        if behaviour is not None:
            metrics["ppo/behaviour_logprob_max_diff"] = behaviour
        metrics.update({
            "ppo/kl": seq_kl.mean().item(),
            "ppo/staleness": float(staleness),
            "ppo/lr": self.sched.get_last_lr()[0],
            "ppo/advantage_mean": pm.masked_mean(adv.advantages, mask).item(),
            "reward/score_mean": exp.scores.mean().item(),
            "reward/score_std": exp.scores.std().item(),
            "reward/non_score_mean": (-pc.kl_coef * seq_kl).mean().item(),
            "rollout/response_length": exp.response_mask.sum(-1).float().mean().item(),
            "rollout/eos_fraction": exp.has_eos.float().mean().item(),
            "timing/learner_s": time.perf_counter() - t0,
            # below learner_s when the learner waits for a core it shares with other roles
            "timing/learner_cpu_s": time.process_time() - cpu0,
        })
        metrics.update(self._offpolicy_metrics())
        metrics.update(self._throughput(exp, metrics["timing/learner_s"], peak))
        if adv.values is not None:
            metrics["ppo/value_mean"] = pm.masked_mean(adv.values, mask).item()
            metrics["ppo/return_mean"] = pm.masked_mean(adv.returns, mask).item()
        for k, v in metrics.items():
            if not math.isfinite(v):
                raise FloatingPointError(f"{k} is {v} after update to version {self.version}")
        return metrics

    def _throughput(self, exp: Experience, seconds: float, peak: float) -> dict[str, float]:
        """Tokens/s and MFU of this update (`core.throughput`) from the work this rank ran (`_count`): the policy
        (and the critic) trained on every micro batch of every epoch, each distinct prompt once where it ran once;
        GAE's old values one more critic forward unless the update reused it; the proximal log-probs one more
        policy forward where the update takes several optimizer steps."""
        pc, tokens, work = self.pc, int(exp.prompt_mask.sum() + exp.response_mask.sum()), self._work
        checkpointing = self.model_cfg.gradient_checkpointing  # `work` read with get: what did not run adds no key
        positions, attention = work.get("policy", (0, 0.0))
        flops = (training_flops(*model_params(self.policy), positions, checkpointing, attention)
                 # the head runs on the positions that predict response tokens only, and is never recomputed
                 + training_flops(*model_head_params(self.policy), work.get("head", (0,))[0]))
        positions, attention = work.get("policy_forward", (0, 0.0))  # the proximal log-probs, where they ran
        flops += (forward_flops(model_params(self.policy)[0], positions) + attention
                  + forward_flops(model_head_params(self.policy)[0], work.get("head_forward", (0,))[0]))
        if self.critic is not None:
            critic = model_params(self.critic)
            positions, attention = work.get("critic", (0, 0.0))
            flops += training_flops(*critic, positions, checkpointing, attention)
            positions, attention = work.get("critic_forward", (0, 0.0))
            flops += forward_flops(critic[0], positions) + attention
        return {"perf/learner_tokens_per_s": tokens * pc.ppo_epochs / seconds if seconds > 0 else 0.0,
                "perf/learner_mfu": mfu(flops, seconds, peak)}

    def _offpolicy_metrics(self) -> dict[str, float]:
        """The update's behaviour-vs-proximal mismatch and importance weights, over every response token of the
        batch (each counted once, in the first epoch; a group's ranks summed): `ppo/mismatch_*`, `ppo/is_*`."""
        if not self._offpolicy:
            return {}
        sums = {k: float(self._offpolicy[k]) for k in ("tokens", "abs_diff", "k1", "k3", "units", "w", "w2", "bounded")}
        top = float(self._offpolicy["abs_diff_max"])
        if self.fsdp:  # every rank has every key: the same collectives on each
            sums, top = all_reduce_sum(sums), all_reduce_max(top)
        n, units = max(sums["tokens"], 1.0), max(sums["units"], 1.0)
        out = {"ppo/mismatch_abs_diff_mean": sums["abs_diff"] / n, "ppo/mismatch_abs_diff_max": top,
               "ppo/mismatch_kl_k1": sums["k1"] / n, "ppo/mismatch_kl_k3": sums["k3"] / n}
        if self.pc.behaviour_is != "none":
            out.update({"ppo/is_weight_mean": sums["w"] / units,
                        "ppo/is_ess": sums["w"] ** 2 / max(units * sums["w2"], 1e-12),
                        "ppo/is_bounded_fraction": sums["bounded"] / units})
        return out

    def _tally_offpolicy(self, prox: torch.Tensor, behav: torch.Tensor, mmask: torch.Tensor,
                         weights: pm.BehaviourWeights | None) -> None:
        """Add one micro batch to the update's sums, as tensors on the device: read once per update (a `.item()` per
        micro batch would be a host sync each)."""
        d = pm.mismatch(prox, behav, mmask)
        n = mmask.sum()
        t = self._offpolicy
        for key, value in (("tokens", n), ("abs_diff", d.abs_diff_mean * n), ("k1", d.kl_k1 * n),
                           ("k3", d.kl_k3 * n)):
            t[key] = t[key] + value
        t["abs_diff_max"] = torch.maximum(torch.as_tensor(t["abs_diff_max"], device=n.device), d.abs_diff_max)
        if weights is not None:
            for key, value in (("units", weights.units.sum()),
                               ("w", pm.masked_sum(weights.unit_weights, weights.units)),
                               ("w2", pm.masked_sum(weights.unit_weights**2, weights.units)),
                               ("bounded", pm.masked_sum(weights.bounded.float(), weights.units))):
                t[key] = t[key] + value

    def _minibatch(self, exp: Experience, adv: Advantages, mask: torch.Tensor,
                   idx: torch.Tensor, values_graph: torch.Tensor | None = None,
                   check_behaviour: bool = False, prox: torch.Tensor | None = None,
                   first_epoch: bool = True) -> dict[str, float]:
        pc, dev = self.pc, self.device
        n_tokens = mask[idx].sum().clamp(min=1.0).to(dev)  # of the whole minibatch, on every rank
        # what the policy loss divides by: the token count, or with Dr. GRPO's aggregation the minibatch's sequences
        # (each sequence's sum already over the constant max_new_tokens); entropy and value loss stay token means
        seq_norm, n_policy = None, n_tokens
        if pc.loss_aggregation == "seq_sum_norm":
            seq_norm, n_policy = float(self.max_new_tokens), torch.tensor(float(len(idx)), device=dev)
        lengths = (exp.prompt_mask[idx].sum(-1) + exp.response_mask[idx].sum(-1)).tolist()
        if self.fsdp:
            mine = rank_share(lengths, self.rank.rank, self.rank.world)
            idx, lengths = idx[mine], [lengths[i] for i in mine]
        stats = {"ppo/policy_loss": 0.0, "ppo/clip_fraction": 0.0, "ppo/approx_kl": 0.0, "ppo/entropy": 0.0}
        if self.critic is not None:
            stats.update({"ppo/value_loss": 0.0, "ppo/value_clip_fraction": 0.0})
        budget, n_groups = pc.max_tokens_per_micro_batch, None
        if budget is not None and self.fsdp:  # FSDP's collectives: every rank runs as many passes as the busiest
            n_groups = int(all_reduce_max(float(len(token_budget_groups(lengths, budget)))))
        prompts_of = prompt_ids(exp.prompts[idx], exp.prompt_mask[idx]) if self.share_prompts else None
        for group in micro_batch_groups(lengths, pc.micro_batch_size, budget, n_groups, prompts_of):
            mi = idx[group]
            # The learner makes ppo_epochs passes of two models over the batch: padding it skips is time saved.
            prompts, pmask, responses, rmask = (t.to(dev) for t in trim_padding(
                exp.prompts[mi], exp.prompt_mask[mi], exp.responses[mi], exp.response_mask[mi]))
            R = responses.shape[1]
            mmask = rmask.float()
            # token share of the minibatch: the diagnostics below are token means, like the losses
            share = (mmask.sum() / n_tokens).item()
            one_pass = self._share(prompts, pmask)
            self._count("policy", self.policy, prompts, pmask, rmask, one_pass)
            self._work["head"][0] += int(rmask.sum())
            if self.critic is not None:  # on the same rows: here, or in the whole batch's `values_graph`
                self._count("critic", self.critic, prompts, pmask, rmask, one_pass)
            logp, entropy = response_logprobs(self.policy, prompts, pmask, responses, rmask, self.temperature,
                                              with_entropy=True, packed=self.packed, share_prompts=one_pass)
            behav = exp.logprobs[mi, :R].to(dev)
            if check_behaviour:
                diff = ((logp.detach() - behav) * mmask).abs().max().item()
                stats["ppo/behaviour_logprob_max_diff"] = max(stats.get("ppo/behaviour_logprob_max_diff", 0.0), diff)
            # the policy the ratio is clipped against: the proximal one (decoupled PPO) or the behaviour one
            old_logp, weights = behav, None
            if pc.proximal_policy:
                old_logp = prox[mi, :R].to(dev) if prox is not None else logp.detach()
                if pc.behaviour_is != "none":
                    weights = pm.behaviour_weights(old_logp, behav, mmask, pc.behaviour_is, pc.behaviour_is_mode,
                                                   pc.behaviour_is_cap, pc.behaviour_is_floor)
                if first_epoch:
                    self._tally_offpolicy(old_logp, behav, mmask, weights)
            pl = pm.clipped_policy_loss(
                logp, old_logp, adv.advantages[mi, :R].to(dev), mmask, pc.clip_range, n_policy,
                weights=None if weights is None else weights.weights, dual_clip=pc.dual_clip, seq_norm=seq_norm)
            ent = pm.entropy_bonus(entropy, mmask, n_tokens)
            loss = pl.loss - pc.ent_coef * ent
            stats["ppo/policy_loss"] += pl.loss.item()
            stats["ppo/entropy"] += ent.item()
            stats["ppo/clip_fraction"] += pl.clip_fraction.item() * share
            stats["ppo/approx_kl"] += pl.approx_kl.item() * share
            if pc.dual_clip is not None:
                stats["ppo/dual_clip_fraction"] = stats.get("ppo/dual_clip_fraction", 0.0) + \
                    pl.dual_clip_fraction.item() * share
            if self.critic is not None:
                if values_graph is not None:  # the whole batch, in batch order
                    values = values_graph[mi.to(values_graph.device), :R]
                else:
                    values = self._critic(prompts, pmask, responses, rmask, one_pass)
                vl = pm.clipped_value_loss(values, adv.values[mi, :R].to(dev), adv.returns[mi, :R].to(dev), mmask,
                                           pc.value_clip_range, n_tokens)
                loss = loss + pc.vf_coef * vl.loss
                stats["ppo/value_loss"] += vl.loss.item()
                stats["ppo/value_clip_fraction"] += vl.clip_fraction.item() * share
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite PPO loss in batch {exp.batch_id}")
            loss.backward()
        if self.fsdp:  # token sums and token-weighted shares: the group's figures are the ranks' sums
            behaviour = stats.pop("ppo/behaviour_logprob_max_diff", None)
            stats = all_reduce_sum(stats)
            if behaviour is not None:
                stats["ppo/behaviour_logprob_max_diff"] = all_reduce_max(behaviour)
        # Both norms are checked before either optimizer steps: a NaN/inf gradient leaves every weight untouched.
        stats["ppo/policy_grad_norm"] = _clip_finite(self.policy, pc.max_grad_norm, f"policy, batch {exp.batch_id}")
        if self.critic is not None:
            stats["ppo/critic_grad_norm"] = _clip_finite(self.critic, pc.max_grad_norm, f"critic, batch {exp.batch_id}")
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        if self.critic is not None:
            self.critic_opt.step()
            self.critic_sched.step()
            self.critic_opt.zero_grad(set_to_none=True)
        return stats

    # --- weights and checkpoints --------------------------------------------------------------------

    def policy_weights(self) -> dict[str, torch.Tensor]:
        """The plain (LoRA-merged) policy parameters, named as the rollout models name them, in the rollout's
        dtype (`model.inference_dtype`: the fp32 master weights cast, e.g. to bf16 for vLLM). In a group this is
        a collective that gathers the shards one parameter at a time; rank 0 keeps them (on the CPU)."""
        if not self.fsdp:
            return {name: self._for_rollout(t) for name, t in unwrap(self.policy).named_parameters()}
        keep = self.rank.rank == 0
        return {name: self._for_rollout(t.cpu()) for name, t in full_weights(self.policy) if keep}

    def _for_rollout(self, t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(DTYPES[self.model_cfg.frozen_dtype])

    def make_packet(self, store: Callable[[torch.Tensor], Any] | None = None) -> WeightsPacket | None:
        """The policy's weights as a versioned, checksummed packet of flat buckets. Sharded, every rank gathers
        the full tensors one at a time (a collective) and rank 0 fills one bucket at a time, handing each to
        `store` (the actor passes `ray.put`) before the next: no rank holds more than its shard plus one bucket
        and one tensor. The other ranks return None."""
        bucket_bytes = int(self.pc.bucket_mb * 2**20)
        if not self.fsdp:
            return stream_packet(self.policy_weights().items(), self.version, bucket_bytes, store)
        gathered = ((name, self._for_rollout(t.cpu())) for name, t in full_weights(self.policy))
        if self.rank.rank != 0:
            for _ in gathered:  # take part in every gather, keep nothing
                pass
            return None
        return stream_packet(gathered, self.version, bucket_bytes, store)

    def save(self, out_dir: str | Path) -> None:
        """Policy and critic in Hugging Face format, plus `learner_state.pt`: everything `load` needs to go on
        exactly as if never stopped (optimizer and scheduler states, RNG states, version; LoRA adapters)."""
        out_dir = Path(out_dir)
        if self.fsdp:
            return self._save_sharded(out_dir)
        save_checkpoint(self.policy, self.tokenizer, out_dir / "checkpoint")
        if self.critic is not None:
            save_checkpoint(self.critic, self.tokenizer, out_dir / "critic")
        state = {
            "version": self.version,
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "critic_optimizer": self.critic_opt.state_dict() if self.critic_opt else None,
            "critic_scheduler": self.critic_sched.state_dict() if self.critic_sched else None,
            "torch_rng": torch.get_rng_state(),
            "generator": self.generator.get_state(),
            # The HF checkpoints hold LoRA merged in; resuming needs the adapters themselves.
            "trainable": ({"policy": trainable_state(self.policy), "critic": trainable_state(self.critic)}
                          if self.model_cfg.lora is not None else None),
        }
        tmp = out_dir / "learner_state.pt.tmp"
        torch.save(state, tmp)
        tmp.replace(out_dir / "learner_state.pt")

    def load(self, ckpt_dir: str | Path) -> int:
        """Restore what `save` wrote into this learner (built from the same SFT and RM checkpoints and config).
        Returns the restored policy version."""
        ckpt_dir = Path(ckpt_dir)
        if self.fsdp:
            return self._load_sharded(ckpt_dir)
        state = torch.load(ckpt_dir / "learner_state.pt", map_location="cpu", weights_only=False)
        if state["trainable"] is not None:
            load_trainable_state(self.policy, state["trainable"]["policy"], "policy")
            if self.critic is not None:
                load_trainable_state(self.critic, state["trainable"]["critic"], "critic")
        else:
            dtype = self.model_cfg.dtype
            self.policy.load_state_dict(load_causal_lm(str(ckpt_dir / "checkpoint"), self.tokenizer, dtype).state_dict())
            if self.critic is not None:
                self.critic.load_state_dict(load_scalar_model(str(ckpt_dir / "critic"), self.tokenizer, dtype).state_dict())
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        if self.critic_opt is not None:
            self.critic_opt.load_state_dict(state["critic_optimizer"])
            self.critic_sched.load_state_dict(state["critic_scheduler"])
        torch.set_rng_state(state["torch_rng"])
        self.generator.set_state(state["generator"])
        self.version = state["version"]
        return self.version

    # --- a sharded learner's checkpoints ------------------------------------------------------------

    def _trained(self) -> list[tuple[str, torch.nn.Module, torch.optim.Optimizer]]:
        out = [("policy", self.policy, self.opt)]
        return out + [("critic", self.critic, self.critic_opt)] if self.critic is not None else out

    def _sharded_state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        state = {}
        for name, model, opt in self._trained():
            state[name], state[f"{name}_optimizer"] = get_state_dict(model, opt)
        return state

    def _save_sharded(self, out_dir: Path) -> None:
        """Each rank writes its shards of the models and optimizer states (torch.distributed.checkpoint, in
        `sharded/`); the Hugging Face folders get the full, LoRA-merged weights, gathered one parameter at a
        time and written by rank 0, so `from_pretrained` and vLLM load them as from one process."""
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp

        dcp.save(self._sharded_state(), checkpoint_id=str(out_dir / "sharded"))
        for name, model, _ in self._trained():
            self._export(name, model, out_dir / ("checkpoint" if name == "policy" else "critic"))
        if self.rank.rank == 0:
            state = {"version": self.version, "scheduler": self.sched.state_dict(),
                     "critic_scheduler": self.critic_sched.state_dict() if self.critic_sched else None,
                     "torch_rng": torch.get_rng_state(), "generator": self.generator.get_state(),
                     "world": self.rank.world}
            tmp = out_dir / "learner_state.pt.tmp"
            torch.save(state, tmp)
            tmp.replace(out_dir / "learner_state.pt")
        dist.barrier()

    def _export(self, name: str, model: torch.nn.Module, path: Path) -> None:
        weights = {n: t.cpu() for n, t in full_weights(model)}  # a collective: every rank iterates
        if self.rank.rank != 0:
            return
        load = load_causal_lm if name == "policy" else load_scalar_model
        plain = load(self.checkpoints[name], self.tokenizer, self.model_cfg.dtype)  # config, bias, tied weights
        missing, unexpected = plain.load_state_dict(weights, strict=False)
        tied = set(getattr(plain, "_tied_weights_keys", None) or ())
        if unexpected or set(missing) - tied:
            raise ValueError(f"{name} export: gathered weights do not match the model (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]})")
        save_checkpoint(plain, self.tokenizer, path)

    def _load_sharded(self, ckpt_dir: Path) -> int:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        small = torch.load(ckpt_dir / "learner_state.pt", map_location="cpu", weights_only=False)
        if small.get("world") != self.rank.world:
            raise ValueError(f"{ckpt_dir} was written by {small.get('world', 1)} learner ranks; this group has "
                             f"{self.rank.world} (set ppo.learner_workers to match)")
        state = self._sharded_state()
        dcp.load(state, checkpoint_id=str(ckpt_dir / "sharded"))
        for name, model, opt in self._trained():
            set_state_dict(model, opt, model_state_dict=state[name], optim_state_dict=state[f"{name}_optimizer"])
        self.sched.load_state_dict(small["scheduler"])
        if self.critic_sched is not None:
            self.critic_sched.load_state_dict(small["critic_scheduler"])
        torch.set_rng_state(small["torch_rng"])
        self.generator.set_state(small["generator"])
        self.version = small["version"]
        return self.version


def _clip_finite(model, max_norm: float, what: str) -> float:
    norm = clip_grad_norm(model, max_norm)
    if not torch.isfinite(norm):
        raise FloatingPointError(f"non-finite gradient norm ({float(norm)}) in the {what}; no weight was updated")
    return float(norm)


