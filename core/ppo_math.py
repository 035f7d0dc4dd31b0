"""RL math as pure functions on (B, R) response tensors: B sequences, R response positions.

`mask` is 1 on response tokens (up to and including EOS) and 0 on padding. Means are over the unmasked
tokens of the batch; losses accept `n_tokens` so gradient accumulation over micro-batches divides by the
token count of the whole minibatch and equals one big batch exactly.

References: Schulman et al. 2017 (PPO, eq. 7), Schulman et al. 2016 (GAE, eq. 16), Ziegler et al. 2019 and
Stiennon et al. 2020 (per-token KL penalty, score at the last token), Schulman 2020 "Approximating KL
divergence" (k1, k3), Ahmadian et al. 2024 (RLOO), Shao et al. 2024 (GRPO).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor


def masked_sum(x: Tensor, mask: Tensor) -> Tensor:
    return (x * mask).sum()


def masked_mean(x: Tensor, mask: Tensor, n_tokens: float | Tensor | None = None) -> Tensor:
    return masked_sum(x, mask) / (mask.sum() if n_tokens is None else n_tokens)


def whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x - mean) / std over the unmasked entries; padding stays 0."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def kl_estimate(logp: Tensor, ref_logp: Tensor, estimator: Literal["k1", "k3"] = "k1") -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi.

    k1 = log pi - log pi_ref (unbiased, can be negative); k3 = (r - 1) - log r with r = pi_ref / pi
    (unbiased, always >= 0, lower variance).
    """
    log_ratio = logp - ref_logp
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}")


def token_rewards(scores: Tensor, kl: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
    """r_t = -beta * KL_t, plus the reward model's score at each response's last token (Stiennon et al. eq. 2).

    scores (B,), kl (B, R), mask (B, R) -> rewards (B, R), 0 on padding.
    """
    rewards = -kl_coef * kl * mask
    last = (mask.sum(-1).long() - 1).clamp(min=0)  # (B,)
    return rewards.scatter_add(1, last.unsqueeze(1), scores.unsqueeze(1).to(rewards.dtype))


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16).

    delta_t = r_t + gamma V(s_{t+1}) - V(s_t);  A_t = sum_l (gamma lam)^l delta_{t+l}; V after the last
    token is 0 (the episode ends). Returns (advantages, returns = advantages + values), both (B, R).
    """
    rewards, values = rewards * mask, values * mask
    R = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    last_gae = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(R)):
        next_value = values[:, t + 1] if t + 1 < R else torch.zeros_like(last_gae)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last_gae = (delta + gamma * lam * last_gae) * mask[:, t]
        advantages[:, t] = last_gae
    return advantages, (advantages + values) * mask


@dataclass(frozen=True)
class PolicyLoss:
    loss: Tensor  # scalar, differentiable
    clip_fraction: Tensor  # share of tokens where the clipped term was used
    approx_kl: Tensor  # 0.5 E[(log pi - log pi_old)^2], how far the update moved the policy
    dual_clip_fraction: Tensor  # share of tokens where the dual clip bound the loss (0 without dual clip)


def clipped_policy_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, clip_range: float,
                        n_tokens: float | Tensor | None = None, weights: Tensor | None = None,
                        dual_clip: float | None = None, seq_norm: float | None = None) -> PolicyLoss:
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7), negated for minimisation:
    L = E_t[ w_t max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps)) ],  rho_t = pi(a_t|s_t) / pi_old(a_t|s_t).

    `old_logp` is the policy the ratio is clipped against: the behaviour policy (plain PPO) or the proximal policy
    (decoupled PPO, Hilton et al. 2022 eq. 3), whose `weights` w_t = pi_prox / pi_behav (detached, bounded:
    `behaviour_weights`) correct for sampling from the behaviour policy; None: w_t = 1.
    `dual_clip` c > 1 (Ye et al. 2020 eq. 5): where A_t < 0 the per-token loss is at most -c A_t.
    `seq_norm`: each sequence's token sum divided by this constant, then the mean over sequences (`n_tokens` then
    counts sequences: Dr. GRPO, Liu et al. 2025); None: the token mean.
    """
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    per_token = torch.maximum(unclipped, clipped)
    dual = torch.zeros_like(per_token, dtype=torch.bool)
    if dual_clip is not None:
        bound = -dual_clip * advantages
        dual = (advantages < 0) & (per_token > bound)
        per_token = torch.where(dual, bound, per_token)
    if weights is not None:
        per_token = weights * per_token
    if seq_norm is None:
        loss = masked_mean(per_token, mask, n_tokens)
    else:
        loss = masked_sum(per_token, mask) / seq_norm / (mask.shape[0] if n_tokens is None else n_tokens)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped > unclipped).float(), mask)
        approx_kl = masked_mean(0.5 * log_ratio**2, mask)
        dual_clip_fraction = masked_mean(dual.float(), mask)
    return PolicyLoss(loss, clip_fraction, approx_kl, dual_clip_fraction)


@dataclass(frozen=True)
class BehaviourWeights:
    """Importance weights pi_prox / pi_behav of a batch's tokens, and the units they were computed on."""

    weights: Tensor  # (B, R) detached, bounded, per token; 0 on padding and on masked tokens
    unit_weights: Tensor  # (B, R) per token, or (B, 1) per sequence: the bounded weight of each unit
    units: Tensor  # 1 where a unit (a response token, or a non-empty sequence) was weighed, like unit_weights
    bounded: Tensor  # bool, like unit_weights: truncated at the cap, or masked

    @property
    def ess(self) -> Tensor:
        """Effective sample size over the N units, (sum w)^2 / (N sum w^2), in (0, 1]; 1 when all w are equal."""
        return masked_sum(self.unit_weights, self.units) ** 2 / (
            self.units.sum() * masked_sum(self.unit_weights**2, self.units)).clamp(min=1e-12)

    @property
    def bounded_fraction(self) -> Tensor:
        return masked_mean(self.bounded.float(), self.units)


def behaviour_weights(prox_logp: Tensor, behav_logp: Tensor, mask: Tensor,
                      level: Literal["token", "sequence"], mode: Literal["truncate", "mask"], cap: float,
                      floor: float = 0.0) -> BehaviourWeights:
    """w = pi_prox / pi_behav per token, or per sequence (the product over its tokens, broadcast to them).

    truncate: min(w, cap) (truncated importance sampling, Yao et al. 2025; Espeholt et al. 2018);
    mask: w where floor <= w <= cap, else 0 (masked importance sampling; IcePop). (B, R) tensors.
    """
    with torch.no_grad():
        log_w = (prox_logp - behav_logp).float() * mask
        units = mask.float()
        if level == "sequence":
            log_w, units = log_w.sum(-1, keepdim=True), (mask.sum(-1, keepdim=True) > 0).float()  # (B, 1)
        w = torch.exp(log_w.clamp(max=math.log(cap) + 1.0))  # past the cap it is cut or masked anyway
        if mode == "truncate":
            bounded = w > cap
            w = w.clamp(max=cap)
        else:
            bounded = (w > cap) | (w < floor)
            w = w.masked_fill(bounded, 0.0)
        w = w * units
        return BehaviourWeights(w.expand_as(mask) * mask, w, units, bounded & (units > 0))


@dataclass(frozen=True)
class Mismatch:
    """How far the learner's log-probs at the start of an update are from the rollout's behaviour log-probs, on
    the behaviour policy's samples: staleness plus engine-vs-learner numerics."""

    abs_diff_mean: Tensor
    abs_diff_max: Tensor
    kl_k1: Tensor  # KL(pi_behav || pi_prox) estimated with k1 = log pi_behav - log pi_prox
    kl_k3: Tensor  # ... and with k3 = (r - 1) - log r, r = pi_prox / pi_behav


def mismatch(prox_logp: Tensor, behav_logp: Tensor, mask: Tensor) -> Mismatch:
    with torch.no_grad():
        diff = (behav_logp - prox_logp).float()
        return Mismatch(masked_mean(diff.abs(), mask), (diff.abs() * mask).max(), masked_mean(diff, mask),
                        masked_mean(kl_estimate(behav_logp.float(), prox_logp.float(), "k3"), mask))


@dataclass(frozen=True)
class ValueLoss:
    loss: Tensor
    clip_fraction: Tensor


def clipped_value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_range: float,
                       n_tokens: float | Tensor | None = None) -> ValueLoss:
    """0.5 E_t[ max((V - G)^2, (V_old + clip(V - V_old, -eps, eps) - G)^2) ] as in OpenAI's baselines/lm-human-preferences."""
    clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    unclipped_err = (values - returns) ** 2
    clipped_err = (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_err, clipped_err), mask, n_tokens)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped_err > unclipped_err).float(), mask)
    return ValueLoss(loss, clip_fraction)


def entropy_bonus(entropy: Tensor, mask: Tensor, n_tokens: float | Tensor | None = None) -> Tensor:
    return masked_mean(entropy, mask, n_tokens)


def rloo_advantages(rewards: Tensor, n: int) -> Tensor:
    """REINFORCE leave-one-out: A_i = R_i - mean_{j != i} R_j within each prompt's n samples.

    rewards (B,) with the n samples of a prompt adjacent -> (B,).
    """
    grouped = rewards.view(-1, n)  # (B/n, n)
    baseline = (grouped.sum(-1, keepdim=True) - grouped) / (n - 1)
    return (grouped - baseline).view(-1)


def grpo_advantages(rewards: Tensor, n: int, eps: float = 1e-6) -> Tensor:
    """Group-relative advantages: (R_i - mean_group) / (std_group + eps), samples of a prompt adjacent -> (B,)."""
    grouped = rewards.view(-1, n)
    return ((grouped - grouped.mean(-1, keepdim=True)) / (grouped.std(-1, keepdim=True) + eps)).view(-1)


def sequence_advantages(scores: Tensor, kl: Tensor, mask: Tensor, kl_coef: float, n: int,
                        estimator: Literal["rloo", "grpo"]) -> Tensor:
    """Critic-free estimators: sequence reward R = score - beta * sum_t KL_t, advantage broadcast to tokens (B, R)."""
    rewards = scores - kl_coef * (kl * mask).sum(-1)
    adv = rloo_advantages(rewards, n) if estimator == "rloo" else grpo_advantages(rewards, n)
    return adv.unsqueeze(1) * mask


def eos_trick(raw_scores: Tensor, has_eos: Tensor, missing_eos_score: float | None) -> Tensor:
    """(B,) scores: a response that used its whole budget without emitting EOS gets `missing_eos_score` instead
    of the reward model's score (detail 6, Huang et al. 2024); None keeps the model's score."""
    if missing_eos_score is None:
        return raw_scores
    return torch.where(has_eos, raw_scores, torch.full_like(raw_scores, missing_eos_score))
