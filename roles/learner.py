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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import get_constant_schedule, get_cosine_schedule_with_warmup

from rayrlhf.core import ppo_math as pm
from rayrlhf.core.checkpoints import Trained, read_state, write_state
from rayrlhf.core.config import Config, ModelConfig, PPOConfig
from rayrlhf.core.experience import Experience, spans_versions
from rayrlhf.core.forward import check_packing, response_logprobs, response_values
from rayrlhf.core.modeling import (
    DTYPES, default_device, disable_dropout, load_causal_lm, load_scalar_model, load_tokenizer, trainable,
)
from rayrlhf.core.offpolicy import OffPolicyTally
from rayrlhf.core.plan import ForwardPlan, MicroBatch
from rayrlhf.core.sharding import (
    Rank, TrainGroup, all_gather_rows, all_reduce_max, all_reduce_sum, clip_grad_norm, one_rank_group, rank_share,
    rollout_packet, rollout_weights, shard_model,
)
from rayrlhf.core.training import save_model
from rayrlhf.core.work import ModelCost, Work, WorkMeter


class StalenessError(RuntimeError):
    """A batch older than `ppo.max_staleness` versions reached the learner."""


@dataclass
class Advantages:
    """What one batch's update reads, each (B, R) and 0 on padding: the per-token KL to the reference, the
    (whitened) advantages, and for GAE the old values, the returns and the per-token rewards; `trained`, the
    tokens with a loss (the response's, without those past the staleness bound)."""

    kl: torch.Tensor
    advantages: torch.Tensor
    trained: torch.Tensor
    values: torch.Tensor | None = None
    returns: torch.Tensor | None = None
    rewards: torch.Tensor | None = None


@dataclass
class Minibatch:
    """What every micro batch of one minibatch reads: its rows, its token count (the losses' divisor, of the whole
    minibatch on every rank), the policy loss's divisor, and the update's batch-wide tensors."""

    idx: torch.Tensor
    n_tokens: torch.Tensor
    n_policy: torch.Tensor
    seq_norm: float | None
    adv: Advantages
    values_graph: torch.Tensor | None
    prox: torch.Tensor | None
    check_behaviour: bool
    first_epoch: bool
    fresh: torch.Tensor | None  # (B, R) 1 where a token is within ppo.max_staleness (in-flight rollout), else None

    @classmethod
    def of(cls, pc: PPOConfig, idx: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, device, adv: Advantages,
           values_graph: torch.Tensor | None, prox: torch.Tensor | None, check_behaviour: bool,
           first_epoch: bool, fresh: torch.Tensor | None = None) -> Minibatch:
        mask = mask * fresh if fresh is not None else mask  # a token past the staleness bound has no loss
        n_tokens = mask[idx].sum().clamp(min=1.0).to(device)
        # what the policy loss divides by: the token count, or with Dr. GRPO's aggregation the minibatch's
        # sequences (each sequence's sum already over the constant max_new_tokens)
        seq_norm, n_policy = None, n_tokens
        if pc.loss_aggregation == "seq_sum_norm":  # the sequences with a token to train (all, without staleness)
            seq_norm, n_policy = float(max_new_tokens), (mask[idx].sum(-1) > 0).sum().clamp(min=1).float().to(device)
        return cls(idx, n_tokens, n_policy, seq_norm, adv, values_graph, prox, check_behaviour, first_epoch, fresh)

    def loss_mask(self, mi: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
        """A micro batch's response mask (rows `mi`), without the tokens past the staleness bound."""
        mask = response_mask.float()
        return mask if self.fresh is None else mask * self.fresh[mi, : mask.shape[1]].to(mask.device)


class PPOLearner:
    """The policy and the critic of one PPO run, their optimizers, and the policy version they hold.

    Built from the PPO config and what else it reads: the model config (dtype, LoRA), the sampling
    temperature (log-probs are of logits / T, as the rollout sampled them), the response budget, the run's seed, and
    whether a prompt's samples run it once (`rollout.share_prompts`).
    """

    def __init__(self, pc: PPOConfig, model: ModelConfig, sft_checkpoint: str, rm_checkpoint: str, *,
                 temperature: float, seed: int, max_new_tokens: int, share_prompts: bool = True,
                 device: str | None = None, startup_timeout_s: float = 900.0):
        self.pc, self.model_cfg, self.temperature = pc, model, temperature
        self.max_new_tokens = max_new_tokens  # the constant of ppo.loss_aggregation seq_sum_norm
        self.device = device or default_device()
        if model.mixed_precision != "no" and not torch.distributed.is_initialized():
            one_rank_group(startup_timeout_s)  # MixedPrecisionPolicy is FSDP2's: a group of one
        self.rank = Rank.current()
        # FSDP2-wrapped: a group of N > 1 ranks, or one rank in mixed precision. Every path below that a group
        # takes (sharded checkpoints, gathered weights, summed figures) is also right for a group of one.
        self.fsdp = self.rank.sharded or model.mixed_precision != "no"
        self.group = TrainGroup(self.rank, self.fsdp)
        torch.manual_seed(seed)
        self.tokenizer = load_tokenizer(sft_checkpoint)
        self.policy, self.critic, self.value_bias = _load_models(pc, model, self.tokenizer, sft_checkpoint,
                                                                 rm_checkpoint, self.device, self.fsdp)
        # A prompt's samples run its prompt once where `may_share_prefix` allows it for both models.
        self.plan = ForwardPlan.build(pc.micro_batch_size, pc.max_tokens_per_micro_batch, share_prompts,
                                      [self.policy, self.critic], device=self.device,
                                      gradient_checkpointing=model.gradient_checkpointing, sharded=self.fsdp,
                                      busiest=self.group.busiest if self.fsdp else None)
        self.costs = {"policy": ModelCost.of(self.policy)}
        if self.critic is not None:
            self.costs["critic"] = ModelCost.of(self.critic, causal_lm=False)
        self.offpolicy = OffPolicyTally()  # the update's behaviour-vs-proximal sums
        self.meter: WorkMeter | None = None  # the last update's work
        self.version = 0
        updates = pc.steps * pc.ppo_epochs * (pc.rollout_batch_size // pc.minibatch_size)
        self.opt, self.sched = _adamw(pc, self.policy, pc.lr, updates)
        self.critic_opt, self.critic_sched = (_adamw(pc, self.critic, pc.critic_lr, updates)
                                              if self.critic is not None else (None, None))
        self.generator = torch.Generator().manual_seed(seed)

    @classmethod
    def from_config(cls, cfg: Config, sft_checkpoint: str, rm_checkpoint: str, device: str | None = None) -> PPOLearner:
        return cls(cfg.ppo, cfg.model, sft_checkpoint, rm_checkpoint, temperature=cfg.rollout.temperature,
                   seed=cfg.run.seed, max_new_tokens=cfg.rollout.max_new_tokens,
                   share_prompts=cfg.rollout.share_prompts, device=device,
                   startup_timeout_s=cfg.ray.startup_timeout_s)

    # --- forwards -----------------------------------------------------------------------------------

    def _values(self, mb: MicroBatch) -> torch.Tensor:
        """V(s_t) before each response token -> (b, R): the critic's head plus the reward model's bias;
        differentiable when grad is enabled."""
        values = response_values(self.critic, mb.prompts, mb.prompt_mask, mb.responses, mb.response_mask,
                                 packed=self.plan.packed, share_prompts=mb.one_pass)
        return values + self.value_bias

    def _logprobs(self, mb: MicroBatch, with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        return response_logprobs(self.policy, mb.prompts, mb.prompt_mask, mb.responses, mb.response_mask,
                                 self.temperature, with_entropy=with_entropy, packed=self.plan.packed,
                                 share_prompts=mb.one_pass)

    def _whole(self, exp: Experience) -> MicroBatch:
        """The whole batch as one micro batch, in batch order (the single update's critic forward)."""
        return self.plan.micro_batch(exp.prompts, exp.prompt_mask, exp.responses, exp.response_mask,
                                     torch.arange(exp.size), list(range(exp.size)), trim_responses=False)

    def _single_update(self, exp: Experience) -> bool:
        """One epoch, one minibatch, one padded micro batch: the step's only critic forward is on the old weights
        (under a token budget the minibatch may be cut in several packed micro batches, each with its backward)."""
        pc = self.pc
        return (self.critic is not None and not self.fsdp and not self.plan.packed and pc.ppo_epochs == 1
                and min(pc.minibatch_size, pc.micro_batch_size) >= exp.size)

    def _one_optimizer_step(self, exp: Experience) -> bool:
        """One epoch of one minibatch: the step's own log-probs are the proximal policy's (`_micro_batch`)."""
        return self.pc.ppo_epochs == 1 and self.pc.minibatch_size >= exp.size

    @torch.no_grad()
    def _batch_forward(self, exp: Experience, name: str, forward: Callable[[MicroBatch], torch.Tensor],
                       trim_responses: bool = True) -> torch.Tensor:
        """`forward(micro batch) -> (b, R')` of model `name` on the weights before the update, over the whole batch
        in micro batches cut as the update cuts them -> (B, R); in a group each rank computes an equal contiguous
        share and the shares are gathered."""
        (self.policy if name == "policy" else self.critic).eval()
        rows = torch.arange(exp.size)
        if self.fsdp:
            n = exp.size // self.rank.world
            rows = rows[self.rank.rank * n : (self.rank.rank + 1) * n]
        mine = torch.zeros(len(rows), exp.responses.shape[1])
        for mb in self.plan.cut(exp.prompts, exp.prompt_mask, exp.responses, exp.response_mask, rows, trim_responses):
            out = forward(mb).float().cpu()
            if self.meter is not None:  # inside an update (`advantages` may be called on its own)
                self.meter.ran(self.costs[name], mb)
            mine[mb.positions, : out.shape[1]] = out
        return torch.cat(all_gather_rows(mine, self.rank.world)) if self.fsdp else mine

    def advantages(self, exp: Experience, values_graph: torch.Tensor | None = None,
                   fresh: torch.Tensor | None = None) -> Advantages:
        """`compute_advantages`, on the critic's V(s_t) of the whole batch before the update where GAE needs it.
        `values_graph`: those values computed with grad for the value loss (`_single_update`), read instead."""
        if self.critic is not None and values_graph is None:
            values_graph = self._batch_forward(exp, "critic", self._values, trim_responses=False)
        return compute_advantages(self.pc, exp, values_graph, fresh)

    # --- update -----------------------------------------------------------------------------------

    def train_step(self, exp: Experience) -> dict[str, float]:
        """One policy version: advantages, then PPO epochs over minibatches. Returns `ppo/...` metrics."""
        staleness, fresh = _staleness(exp, self.version, self.pc.max_staleness)
        self.meter = WorkMeter(self.device, self.model_cfg.train_compute_dtype)
        # With a single update the value loss's forward is the one GAE needs: run the critic once, not twice.
        values_graph = None
        if self._single_update(exp):
            self.critic.train()
            values_graph = self._values(self._whole(exp))
        adv = self.advantages(exp, values_graph, fresh)
        # The proximal policy: the learner's log-probs before this update (`ppo.proximal_policy`). With one optimizer
        # step they are the step's own log-probs, detached (`_micro_batch`); otherwise one forward over the batch.
        prox = None
        if self.pc.proximal_policy and not self._one_optimizer_step(exp):
            prox = self._batch_forward(exp, "policy", lambda mb: self._logprobs(mb)[0])
        self.offpolicy.clear()
        sums, n_updates = self._epochs(exp, adv, values_graph, prox, staleness, fresh)
        self.version += 1
        metrics = _update_metrics(self.pc, exp, adv, sums, n_updates, staleness, self.sched.get_last_lr()[0],
                                  self.meter.stop(int(exp.prompt_mask.sum() + exp.response_mask.sum()) * self.pc.ppo_epochs))
        metrics.update(self.offpolicy.metrics(self.pc.behaviour_is != "none",
                                              *((all_reduce_sum, all_reduce_max) if self.fsdp else ())))
        for k, v in metrics.items():
            if not math.isfinite(v):
                raise FloatingPointError(f"{k} is {v} after update to version {self.version}")
        return metrics

    def _epochs(self, exp: Experience, adv: Advantages, values_graph: torch.Tensor | None,
                prox: torch.Tensor | None, staleness: int, fresh: torch.Tensor | None) -> tuple[dict[str, float], int]:
        """`ppo_epochs` passes over shuffled minibatches, one optimizer step each -> summed stats, step count."""
        pc, mask = self.pc, exp.response_mask.float()
        sums: dict[str, float] = {}
        n_updates = 0
        self.policy.train()
        if self.critic is not None:
            self.critic.train()
        for epoch in range(pc.ppo_epochs):
            perm = torch.randperm(exp.size, generator=self.generator)
            for start, idx in _trained_minibatches(perm, pc.minibatch_size, mask, fresh, (self.sched, self.critic_sched)):
                # Before the first update of an on-policy batch the learner holds the weights that sampled it:
                # its log-probs must equal the rollout backend's (HF or vLLM), up to float error.
                check = staleness == 0 and epoch == 0 and start == 0
                mini = Minibatch.of(pc, idx, mask, self.max_new_tokens, self.device, adv, values_graph, prox, check,
                                    epoch == 0, fresh)
                for k, v in self._minibatch(exp, mini).items():
                    sums[k] = sums.get(k, 0.0) + v
                n_updates += 1
        return sums, n_updates

    def _minibatch(self, exp: Experience, mini: Minibatch) -> dict[str, float]:
        """One optimizer step: this rank's share of the minibatch in micro batches, each with its backward."""
        idx = mini.idx
        if self.fsdp:
            lengths = (exp.prompt_mask[idx].sum(-1) + exp.response_mask[idx].sum(-1)).tolist()
            idx = idx[rank_share(lengths, self.rank.rank, self.rank.world)]
        stats = {"ppo/policy_loss": 0.0, "ppo/clip_fraction": 0.0, "ppo/approx_kl": 0.0, "ppo/entropy": 0.0}
        if self.critic is not None:
            stats.update({"ppo/value_loss": 0.0, "ppo/value_clip_fraction": 0.0})
        for mb in self.plan.cut(exp.prompts, exp.prompt_mask, exp.responses, exp.response_mask, idx):
            self._micro_batch(exp, mini, mb, stats)
        if self.fsdp:  # token sums and token-weighted shares: the group's figures are the ranks' sums
            behaviour = stats.pop("ppo/behaviour_logprob_max_diff", None)
            stats = all_reduce_sum(stats)
            if behaviour is not None:
                stats["ppo/behaviour_logprob_max_diff"] = all_reduce_max(behaviour)
        # Both norms are checked before either optimizer steps: a NaN/inf gradient leaves every weight untouched.
        stats["ppo/policy_grad_norm"] = _clip_finite(self.policy, self.pc.max_grad_norm, f"policy, batch {exp.batch_id}")
        if self.critic is not None:
            stats["ppo/critic_grad_norm"] = _clip_finite(self.critic, self.pc.max_grad_norm,
                                                         f"critic, batch {exp.batch_id}")
        for opt, sched in ((self.opt, self.sched), (self.critic_opt, self.critic_sched)):
            if opt is not None:
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
        return stats

    def _micro_batch(self, exp: Experience, mini: Minibatch, mb: MicroBatch, stats: dict[str, float]) -> None:
        """Forward and backward of one micro batch: the clipped policy loss (against the proximal or the behaviour
        policy, importance-weighted where configured), the entropy bonus and the clipped value loss."""
        pc, dev, mi = self.pc, self.device, mb.rows
        R, mmask = mb.responses.shape[1], mini.loss_mask(mi, mb.response_mask)
        checkpointing = self.model_cfg.gradient_checkpointing
        self.meter.ran(self.costs["policy"], mb, train=True, checkpointing=checkpointing)
        if self.critic is not None:  # on the same rows: here, or in the whole batch's `values_graph`
            self.meter.ran(self.costs["critic"], mb, train=True, checkpointing=checkpointing)
        logp, entropy = self._logprobs(mb, with_entropy=True)
        behav = exp.logprobs[mi, :R].to(dev)
        if mini.check_behaviour:
            diff = ((logp.detach() - behav) * mmask).abs().max().item()
            stats["ppo/behaviour_logprob_max_diff"] = max(stats.get("ppo/behaviour_logprob_max_diff", 0.0), diff)
        old_logp, weights = _old_logprobs(pc, mini, mi, R, logp, behav, mmask, self.offpolicy)
        values = None
        if self.critic is not None:  # the whole batch's, in batch order, or this micro batch's own
            values = (mini.values_graph[mi.to(mini.values_graph.device), :R] if mini.values_graph is not None
                      else self._values(mb))
        loss = _loss(pc, mini, mi, mmask, logp, entropy, old_logp, weights, values, stats)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite PPO loss in batch {exp.batch_id}")
        loss.backward()

    # --- weights and checkpoints --------------------------------------------------------------------

    def policy_weights(self) -> dict[str, torch.Tensor]:
        """The policy's weights as the rollout models take them (`sharding.rollout_weights`); a collective in a group."""
        return rollout_weights(self.policy, self.group, DTYPES[self.model_cfg.frozen_dtype])

    def make_packet(self, store: Callable[[torch.Tensor], Any] | None = None, adapters: bool = False):
        """The policy's weights (`adapters`: its LoRA matrices) as a versioned packet (`sharding.rollout_packet`):
        rank 0's, None on the others. `store`: where each bucket goes once full (the actor passes `ray.put`)."""
        return rollout_packet(self.policy, self.group, DTYPES[self.model_cfg.frozen_dtype], self.version,
                              int(self.pc.bucket_mb * 2**20), store, adapters)

    def _trained(self, out_dir: Path) -> list[Trained]:
        parts = [Trained("policy", self.policy, self.opt, self.sched, out_dir / "checkpoint")]
        if self.critic is not None:
            parts.append(Trained("critic", self.critic, self.critic_opt, self.critic_sched, out_dir / "critic"))
        return parts

    def save(self, out_dir: str | Path) -> None:
        """Policy and critic in Hugging Face format (`checkpoint/`, `critic/`: LoRA merged, gathered from the
        shards in a group, as SFT and RM save theirs) plus the state `load` needs to go on exactly as if never
        stopped (`checkpoints.write_state`: optimizer and scheduler states, RNG states, version; LoRA adapters)."""
        parts = self._trained(Path(out_dir))
        for part in parts:
            save_model(part.model, self.tokenizer, part.hf_folder, self.group)
        small = {"version": self.version, "torch_rng": torch.get_rng_state(), "generator": self.generator.get_state()}
        write_state(Path(out_dir), parts, small, self.group)
        self.group.barrier()

    def load(self, ckpt_dir: str | Path) -> int:
        """Restore what `save` wrote into this learner (built from the same SFT and RM checkpoints and config).
        Returns the restored policy version."""
        def load_hf(part: Trained) -> dict:
            load = load_causal_lm if part.name == "policy" else load_scalar_model
            return load(str(part.hf_folder), self.tokenizer, self.model_cfg.dtype).state_dict()

        state = read_state(Path(ckpt_dir), self._trained(Path(ckpt_dir)), self.group,
                           "set ppo.learner_workers and model.mixed_precision as when it was written", load_hf)
        self.generator.set_state(state["generator"])
        self.version = state["version"]
        return self.version


def _clip_finite(model, max_norm: float, what: str) -> float:
    norm = clip_grad_norm(model, max_norm)
    if not torch.isfinite(norm):
        raise FloatingPointError(f"non-finite gradient norm ({float(norm)}) in the {what}; no weight was updated")
    return float(norm)


def _load_models(pc: PPOConfig, model: ModelConfig, tokenizer, sft_checkpoint: str, rm_checkpoint: str, device: str,
             fsdp: bool):
    """(policy, critic or None, the critic's value bias), trainable, dropout off, sharded in a group."""
    # dropout off after LoRA is applied: its adapters' dropout too (detail 4)
    policy = trainable(load_causal_lm(sft_checkpoint, tokenizer, model.dtype), model, "CAUSAL_LM")
    policy = policy.to(device)
    disable_dropout(policy)
    critic, value_bias = None, 0.0
    if pc.advantage_estimator == "gae":
        critic = load_scalar_model(rm_checkpoint, tokenizer, model.dtype)  # detail 8
        # The reward model's normalising bias is part of its score (`RewardScorer`): the critic starts as the
        # same function, V = head(h) + bias, as Huang et al.'s critic (their ScalarModel's forward applies
        # it). Without it V starts `bias` off the returns, which shifts GAE's advantages by
        # -bias (gamma lam)^(T-1-t), largest at EOS: a push on when to stop that whitening keeps.
        value_bias = float(getattr(critic.config, "reward_bias", 0.0) or 0.0)
        critic = trainable(critic, model, "SEQ_CLS").to(device)
        disable_dropout(critic)
    if pc.max_tokens_per_micro_batch is not None:  # micro batches packed, not padded
        for m in (policy, critic):
            if m is not None:
                check_packing(m, "ppo.max_tokens_per_micro_batch")
    if fsdp:  # before the optimizers: they hold the shards
        policy = shard_model(policy, model.mixed_precision)
        critic = shard_model(critic, model.mixed_precision) if critic is not None else None
    return policy, critic, value_bias


def _update_metrics(pc: PPOConfig, exp: Experience, adv: Advantages, sums: dict[str, float], n_updates: int,
                    staleness: int, lr: float, work: Work) -> dict[str, float]:
    """One update's `ppo/`, `reward/`, `rollout/`, `timing/` and `perf/` metrics: the minibatches' mean stats and
    the batch's figures."""
    mask = exp.response_mask.float()
    seq_kl = adv.kl.sum(-1)
    behaviour = sums.pop("ppo/behaviour_logprob_max_diff", None)  # one minibatch's maximum, not a mean
    metrics = {k: v / n_updates for k, v in sums.items()}
    if behaviour is not None:
        metrics["ppo/behaviour_logprob_max_diff"] = behaviour
    metrics.update({
        "ppo/kl": seq_kl.mean().item(),
        "ppo/staleness": float(staleness),
        "ppo/lr": lr,
        "ppo/advantage_mean": pm.masked_mean(adv.advantages, adv.trained).item(),
        "reward/score_mean": exp.scores.mean().item(),
        "reward/score_std": exp.scores.std().item(),
        "reward/non_score_mean": (-pc.kl_coef * seq_kl).mean().item(),
        "rollout/response_length": exp.response_mask.sum(-1).float().mean().item(),
        "rollout/eos_fraction": exp.has_eos.float().mean().item(),
        "timing/learner_s": work.seconds,
        # below learner_s when the learner waits for a core it shares with other roles
        "timing/learner_cpu_s": work.cpu_seconds,
        "perf/learner_tokens_per_s": work.tokens_per_s,
        "perf/learner_mfu": work.mfu,
    })
    metrics.update(_provenance_metrics(exp, exp.policy_version + staleness, pc.max_staleness))
    if adv.values is not None:
        metrics["ppo/value_mean"] = pm.masked_mean(adv.values, mask).item()
        metrics["ppo/return_mean"] = pm.masked_mean(adv.returns, mask).item()
    return metrics


def _loss(pc: PPOConfig, mini: Minibatch, mi: torch.Tensor, mmask: torch.Tensor, logp: torch.Tensor,
          entropy: torch.Tensor, old_logp: torch.Tensor, weights: pm.BehaviourWeights | None,
          values: torch.Tensor | None, stats: dict[str, float]) -> torch.Tensor:
    """One micro batch's share of the minibatch's loss: the clipped policy loss, minus the entropy bonus, plus the
    clipped value loss (GAE); its diagnostics are added to `stats`, weighted by the micro batch's token share."""
    R, dev = mmask.shape[1], logp.device
    share = (mmask.sum() / mini.n_tokens).item()  # token share of the minibatch: diagnostics are token means
    pl = pm.clipped_policy_loss(
        logp, old_logp, mini.adv.advantages[mi, :R].to(dev), mmask, pc.clip_range, mini.n_policy,
        weights=None if weights is None else weights.weights, dual_clip=pc.dual_clip, seq_norm=mini.seq_norm)
    ent = pm.entropy_bonus(entropy, mmask, mini.n_tokens)
    loss = pl.loss - pc.ent_coef * ent
    stats["ppo/policy_loss"] += pl.loss.item()
    stats["ppo/entropy"] += ent.item()
    stats["ppo/clip_fraction"] += pl.clip_fraction.item() * share
    stats["ppo/approx_kl"] += pl.approx_kl.item() * share
    if pc.dual_clip is not None:
        stats["ppo/dual_clip_fraction"] = stats.get("ppo/dual_clip_fraction", 0.0) + pl.dual_clip_fraction.item() * share
    if values is not None:
        vl = pm.clipped_value_loss(values, mini.adv.values[mi, :R].to(dev), mini.adv.returns[mi, :R].to(dev), mmask,
                                   pc.value_clip_range, mini.n_tokens)
        loss = loss + pc.vf_coef * vl.loss
        stats["ppo/value_loss"] += vl.loss.item()
        stats["ppo/value_clip_fraction"] += vl.clip_fraction.item() * share
    return loss


def _staleness(exp: Experience, version: int, max_staleness: int) -> tuple[int, torch.Tensor | None]:
    """The batch's staleness (its oldest token's), after refusing one too stale or with non-finite inputs; and,
    for a batch with per-token versions (in-flight rollout), which tokens are within `max_staleness`: the others
    are masked out of the loss (the batch is refused only when none is)."""
    staleness, fresh = version - exp.policy_version, None
    if exp.token_versions is not None and staleness > max_staleness:
        fresh = (exp.token_ages(version) <= max_staleness).float()
    too_old = staleness > max_staleness and (fresh is None or not (fresh * exp.response_mask).any())
    if staleness < 0 or too_old:
        raise StalenessError(f"learner at version {version} got batch {exp.batch_id} generated by "
                             f"version {exp.policy_version}; ppo.max_staleness is {max_staleness}")
    for name, t in (("behaviour log-probs", exp.logprobs), ("reference log-probs", exp.ref_logprobs),
                    ("reward scores", exp.scores)):
        if not torch.isfinite(t).all():
            raise FloatingPointError(f"non-finite {name} in batch {exp.batch_id}")
    return staleness, fresh


def _provenance_metrics(exp: Experience, version: int, max_staleness: int) -> dict[str, float]:
    """Per-token provenance: the share of response tokens of each age (versions between the one that sampled it
    and the learner's, `rollout/token_age_<a>`; older than the bound: masked, `ppo/stale_token_fraction`), and the
    share of sequences sampled by more than one version (`rollout/multi_version_fraction`)."""
    mask = exp.response_mask.bool()
    ages = exp.token_ages(version)[mask]
    n = max(1, ages.numel())
    out = {f"rollout/token_age_{a}": (ages == a).sum().item() / n for a in range(max_staleness + 1)}
    out["ppo/stale_token_fraction"] = (ages > max_staleness).sum().item() / n
    out["rollout/multi_version_fraction"] = spans_versions(exp.token_versions, exp.response_mask).float().mean().item()
    return out


def _trained_minibatches(perm: torch.Tensor, size: int, mask: torch.Tensor, fresh: torch.Tensor | None, schedulers):
    """(start, rows) of each minibatch of `perm` with a token to train: one whose every token is past the staleness
    bound (`fresh` 0) is skipped, since an optimizer step without gradient still moves weights (AdamW's momentum);
    its learning-rate `schedulers` step all the same, so the schedule keeps its length."""
    for start in range(0, len(perm), size):
        idx = perm[start : start + size]
        if fresh is None or (mask[idx] * fresh[idx]).any():
            yield start, idx
        else:
            for sched in schedulers:
                if sched is not None:
                    sched.step()


def compute_advantages(pc: PPOConfig, exp: Experience, values: torch.Tensor | None,
                       fresh: torch.Tensor | None = None) -> Advantages:
    """KL, advantages (and values, returns for GAE, whose `values` are the critic's V(s_t) (B, R)). Whitened over
    the tokens trained: without those past the staleness bound (`fresh`), which have no loss."""
    mask = exp.response_mask.float()
    kl = pm.kl_estimate(exp.logprobs, exp.ref_logprobs, pc.kl_estimator) * mask
    returns = rewards = None
    if pc.advantage_estimator == "gae":
        values = values.detach().cpu() * mask
        rewards = pm.token_rewards(exp.scores, kl, mask, pc.kl_coef)
        adv, returns = pm.gae(rewards, values, mask, pc.gamma, pc.lam)
    else:
        adv = pm.sequence_advantages(exp.scores, kl, mask, pc.kl_coef, pc.samples_per_prompt, pc.advantage_estimator)
    trained = mask * fresh if fresh is not None else mask
    return Advantages(kl=kl, advantages=pm.whiten(adv, trained) if pc.whiten_advantages else adv, trained=trained,
                      values=values if pc.advantage_estimator == "gae" else None, returns=returns, rewards=rewards)


def _old_logprobs(pc: PPOConfig, mini: Minibatch, mi: torch.Tensor, R: int, logp: torch.Tensor, behav: torch.Tensor,
                  mmask: torch.Tensor, offpolicy: OffPolicyTally) -> tuple[torch.Tensor, pm.BehaviourWeights | None]:
    """The policy the ratio is clipped against: the proximal one (decoupled PPO; this step's own log-probs,
    detached, when it is the update's only step) or the behaviour one; and the importance weights."""
    if not pc.proximal_policy:
        return behav, None
    old_logp = mini.prox[mi, :R].to(logp.device) if mini.prox is not None else logp.detach()
    weights = None
    if pc.behaviour_is != "none":
        weights = pm.behaviour_weights(old_logp, behav, mmask, pc.behaviour_is, pc.behaviour_is_mode,
                                       pc.behaviour_is_cap, pc.behaviour_is_floor)
    if mini.first_epoch:
        offpolicy.add(old_logp, behav, mmask, weights)
    return old_logp, weights


def _adamw(pc: PPOConfig, model, lr: float, updates: int):
    """AdamW over the trainable parameters, constant or cosine-decayed over the run's `updates` optimizer steps."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, eps=pc.adam_eps,
                            weight_decay=pc.weight_decay)
    sched = get_cosine_schedule_with_warmup(opt, 0, updates) if pc.lr_schedule == "cosine" else get_constant_schedule(opt)
    return opt, sched
