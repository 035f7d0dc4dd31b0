"""Every function of core.ppo_math against numbers worked out by hand (in the comments)."""

from __future__ import annotations

import math

import pytest
import torch

from rayrlhf.core import ppo_math as pm


def t(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


def close(actual: torch.Tensor, expected, atol: float = 1e-6) -> None:
    torch.testing.assert_close(actual, t(expected), atol=atol, rtol=0)


# --- masked reductions ------------------------------------------------------------------------------

def test_masked_sum_and_mean():
    x, mask = t([[1.0, 2.0, 100.0], [3.0, 100.0, 100.0]]), t([[1, 1, 0], [1, 0, 0]])
    assert pm.masked_sum(x, mask).item() == 6.0  # 1 + 2 + 3
    assert pm.masked_mean(x, mask).item() == 2.0  # 6 / 3 tokens
    assert pm.masked_mean(x, mask, n_tokens=6).item() == 1.0  # divided by a whole minibatch's count


def test_whiten_over_the_mask():
    x = t([[1.0, 2.0, 3.0], [4.0, 100.0, 100.0]])
    mask = t([[1, 1, 1], [1, 0, 0]])
    # Entries 1, 2, 3, 4: mean 2.5; variance (2.25 + 0.25 + 0.25 + 2.25) / 4 = 1.25; std 1.1180340
    # -> (-1.5, -0.5, 0.5, 1.5) / 1.1180340 = (-1.3416408, -0.4472136, 0.4472136, 1.3416408); padding 0.
    w = pm.whiten(x, mask)
    close(w, [[-1.3416408, -0.4472136, 0.4472136], [1.3416408, 0.0, 0.0]])
    assert pm.masked_mean(w, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert pm.masked_mean(w**2, mask).item() == pytest.approx(1.0, abs=1e-5)
    # shift_mean=False keeps the mean: whitened + 2.5
    close(pm.whiten(x, mask, shift_mean=False), [[1.1583592, 2.0527864, 2.9472136], [3.8416408, 0.0, 0.0]])


# --- KL and rewards ---------------------------------------------------------------------------------

def test_kl_estimators():
    logp, ref = t([[-1.0, -2.0, -0.5]]), t([[-1.5, -2.0, 0.0]])
    # log r = log pi - log pi_ref = (0.5, 0, -0.5)
    close(pm.kl_estimate(logp, ref, "k1"), [[0.5, 0.0, -0.5]])
    # k3 = exp(-log r) - 1 + log r: e^-0.5 - 0.5 = 0.1065307; 0; e^0.5 - 1.5 = 0.1487213 (never negative)
    close(pm.kl_estimate(logp, ref, "k3"), [[0.1065307, 0.0, 0.1487213]])
    with pytest.raises(ValueError, match="k2"):
        pm.kl_estimate(logp, ref, "k2")


def test_token_rewards_score_at_last_token_kl_elsewhere():
    scores = t([2.0, -1.0])
    kl = t([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
    mask = t([[1, 1, 1], [1, 1, 0]])
    # beta = 0.5: -beta * KL = (-0.05, -0.1, -0.15) and (-0.2, -0.25, [padding]);
    # the score lands on each row's last response token: -0.15 + 2 = 1.85 and -0.25 - 1 = -1.25.
    r = pm.token_rewards(scores, kl, mask, kl_coef=0.5)
    close(r, [[-0.05, -0.1, 1.85], [-0.2, -1.25, 0.0]])


# --- GAE ----------------------------------------------------------------------------------------------

def test_gae_three_token_episode_and_masked_row():
    rewards = t([[0.0, 0.0, 1.0], [0.0, 2.0, 5.0]])
    values = t([[0.5, 0.6, 0.7], [0.5, 1.0, 9.0]])
    mask = t([[1, 1, 1], [1, 1, 0]])
    # gamma 0.9, lambda 0.5 (gamma * lambda = 0.45); V after the last token is 0.
    # Row 0: delta_2 = 1 - 0.7 = 0.3                  A_2 = 0.3
    #        delta_1 = 0 + 0.9 * 0.7 - 0.6 = 0.03     A_1 = 0.03 + 0.45 * 0.3 = 0.165
    #        delta_0 = 0 + 0.9 * 0.6 - 0.5 = 0.04     A_0 = 0.04 + 0.45 * 0.165 = 0.11425
    #        returns = A + V = (0.61425, 0.765, 1.0)
    # Row 1 (last position is padding: its reward 5 and value 9 are ignored):
    #        A_2 = 0
    #        delta_1 = 2 + 0.9 * 0 - 1.0 = 1.0        A_1 = 1.0
    #        delta_0 = 0 + 0.9 * 1.0 - 0.5 = 0.4      A_0 = 0.4 + 0.45 * 1.0 = 0.85
    #        returns = (1.35, 2.0, 0)
    adv, ret = pm.gae(rewards, values, mask, gamma=0.9, lam=0.5)
    close(adv, [[0.11425, 0.165, 0.3], [0.85, 1.0, 0.0]])
    close(ret, [[0.61425, 0.765, 1.0], [1.35, 2.0, 0.0]])


def test_gae_with_gamma_lambda_one_is_monte_carlo():
    # gamma = lambda = 1: A_t = (sum of rewards from t) - V(s_t) = (1 - 0.5, 1 - 0.6, 1 - 0.7)
    adv, ret = pm.gae(t([[0.0, 0.0, 1.0]]), t([[0.5, 0.6, 0.7]]), t([[1, 1, 1]]), gamma=1.0, lam=1.0)
    close(adv, [[0.5, 0.4, 0.3]])
    close(ret, [[1.0, 1.0, 1.0]])


def test_gae_lambda_zero_is_one_step_td():
    # lambda = 0: A_t = delta_t = r_t + gamma V_{t+1} - V_t, gamma 1: (0.6 - 0.5, 0.7 - 0.6, 1 - 0.7)
    adv, _ = pm.gae(t([[0.0, 0.0, 1.0]]), t([[0.5, 0.6, 0.7]]), t([[1, 1, 1]]), gamma=1.0, lam=0.0)
    close(adv, [[0.1, 0.1, 0.3]])


# --- PPO losses ---------------------------------------------------------------------------------------

# Five tokens, clip 0.2 (ratios clipped to [0.8, 1.2]); a sixth is padding with wild values.
RATIOS = [1.5, 0.5, 1.1, 0.5, 1.5, 9.0]
ADVS = [1.0, 1.0, -1.0, -2.0, -2.0, 50.0]
PMASK = [1, 1, 1, 1, 1, 0]
#   ratio  A    -A*ratio  -A*clip(ratio)  max    branch
#   1.5    +1   -1.5      -1.2            -1.2   clipped (no gradient)
#   0.5    +1   -0.5      -0.8            -0.5   unclipped
#   1.1    -1    1.1       1.1             1.1   inside the clip range
#   0.5    -2    1.0       1.6             1.6   clipped (no gradient)
#   1.5    -2    3.0       2.4             3.0   unclipped
# loss = (-1.2 - 0.5 + 1.1 + 1.6 + 3.0) / 5 = 0.8; clip fraction 2/5
# approx_kl = 0.5 * mean(log r^2) = 0.5 * (2 * 0.1644019 + 2 * 0.4804530 + 0.0090840) / 5 = 0.1298794


def _policy_inputs():
    old = t([[-1.0, -2.0, -0.3, -1.0, -0.7, -1.0]])
    logp = (old + torch.log(t([RATIOS]))).requires_grad_(True)
    return logp, old, t([ADVS]), t([PMASK])


def test_clipped_policy_loss_by_hand():
    logp, old, adv, mask = _policy_inputs()
    out = pm.clipped_policy_loss(logp, old, adv, mask, clip_range=0.2)
    assert out.loss.item() == pytest.approx(0.8, abs=1e-6)
    assert out.clip_fraction.item() == pytest.approx(0.4, abs=1e-6)
    assert out.approx_kl.item() == pytest.approx(0.1298794, abs=1e-6)
    out.loss.backward()
    # d loss / d log pi = -A * ratio / 5 on the unclipped branch, 0 where the clipped term is used:
    # (0, -0.5/5, 1.1/5, 0, 3.0/5, padding 0). A positive advantage pulls log pi up (negative gradient).
    close(logp.grad, [[0.0, -0.1, 0.22, 0.0, 0.6, 0.0]])


def test_clipped_policy_loss_divides_by_given_token_count():
    logp, old, adv, mask = _policy_inputs()
    out = pm.clipped_policy_loss(logp, old, adv, mask, clip_range=0.2, n_tokens=10)
    assert out.loss.item() == pytest.approx(4.0 / 10, abs=1e-6)


def test_clipped_policy_loss_ratio_one_has_no_clipping():
    old = t([[-1.0, -2.0, -3.0]])
    out = pm.clipped_policy_loss(old.clone(), old, t([[1.0, -2.0, 0.5]]), t([[1, 1, 1]]), clip_range=0.2)
    # ratio 1: loss = -mean(A) = -(1 - 2 + 0.5) / 3 = 0.1666667
    assert out.loss.item() == pytest.approx(0.5 / 3, abs=1e-6)
    assert out.clip_fraction.item() == 0.0 and out.approx_kl.item() == 0.0


def test_clipped_value_loss_by_hand():
    values = t([[1.0, 0.6, 0.0, 2.0, 7.0]]).requires_grad_(True)
    old = t([[0.5, 0.5, 0.5, 0.5, 0.0]])
    returns = t([[1.0, 1.0, 0.0, 0.0, 0.0]])
    mask = t([[1, 1, 1, 1, 0]])
    # clip 0.2: V_clipped = V_old + clip(V - V_old, -0.2, 0.2)
    #   V    V_old  G    (V-G)^2  V_clip  (V_clip-G)^2  max
    #   1.0  0.5    1.0  0        0.7     0.09          0.09  clipped
    #   0.6  0.5    1.0  0.16     0.6     0.16          0.16
    #   0.0  0.5    0.0  0        0.3     0.09          0.09  clipped
    #   2.0  0.5    0.0  4.0      0.7     0.49          4.0
    # loss = 0.5 * (0.09 + 0.16 + 0.09 + 4.0) / 4 = 0.5425; clip fraction 2/4
    out = pm.clipped_value_loss(values, old, returns, mask, clip_range=0.2)
    assert out.loss.item() == pytest.approx(0.5425, abs=1e-6)
    assert out.clip_fraction.item() == pytest.approx(0.5, abs=1e-6)
    out.loss.backward()
    # gradient 0.5 * 2 (V - G) / 4 on unclipped terms only: (0, -0.1, 0, 0.5, padding 0)
    close(values.grad, [[0.0, -0.1, 0.0, 0.5, 0.0]])


def test_entropy_bonus():
    ent, mask = t([[1.0, 2.0, 9.0]]), t([[1, 1, 0]])
    assert pm.entropy_bonus(ent, mask).item() == pytest.approx(1.5)
    assert pm.entropy_bonus(ent, mask, n_tokens=6).item() == pytest.approx(0.5)


def test_micro_batch_losses_sum_to_the_minibatch_loss():
    # Invariance: per-micro-batch losses divided by the whole minibatch's token count add up exactly.
    g = torch.Generator().manual_seed(0)
    logp, old = -torch.rand(4, 5, generator=g), -torch.rand(4, 5, generator=g)
    adv = torch.randn(4, 5, generator=g)
    mask = t([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 1, 1, 0]])
    whole = pm.clipped_policy_loss(logp, old, adv, mask, 0.2).loss
    n = mask.sum()
    parts = sum(pm.clipped_policy_loss(logp[i : i + 1], old[i : i + 1], adv[i : i + 1], mask[i : i + 1], 0.2, n).loss
                for i in range(4))
    assert parts.item() == pytest.approx(whole.item(), abs=1e-6)


# --- critic-free estimators -------------------------------------------------------------------------

def test_rloo_advantages():
    # n = 2: each sample's baseline is the other sample: (1 - 3, 3 - 1, 2 - 6, 6 - 2)
    close(pm.rloo_advantages(t([1.0, 3.0, 2.0, 6.0]), 2), [-2.0, 2.0, -4.0, 4.0])
    # n = 3: baselines (2 + 6) / 2 = 4, (1 + 6) / 2 = 3.5, (1 + 2) / 2 = 1.5
    close(pm.rloo_advantages(t([1.0, 2.0, 6.0]), 3), [-3.0, -1.5, 4.5])


def test_grpo_advantages():
    # group (1, 3): mean 2, sample std sqrt(2) -> -+1/sqrt(2); group (2, 6): mean 4, std 2 sqrt(2) -> same
    close(pm.grpo_advantages(t([1.0, 3.0, 2.0, 6.0]), 2), [-0.7071065, 0.7071065, -0.7071065, 0.7071065])
    # a group whose samples all score the same gets 0, not NaN
    close(pm.grpo_advantages(t([5.0, 5.0, 1.0, 2.0]), 2), [0.0, 0.0, -0.7071063, 0.7071063])


def test_sequence_advantages():
    scores = t([1.0, 3.0])
    kl = t([[0.1, 0.2, 9.0], [0.3, 0.4, 0.5]])
    mask = t([[1, 1, 0], [1, 1, 1]])
    # R = score - 0.5 * sum(masked KL) = (1 - 0.15, 3 - 0.6) = (0.85, 2.4); one prompt with n = 2:
    # RLOO: (0.85 - 2.4, 2.4 - 0.85) = (-1.55, 1.55), broadcast over each response's tokens
    rloo = pm.sequence_advantages(scores, kl, mask, kl_coef=0.5, n=2, estimator="rloo")
    close(rloo, [[-1.55, -1.55, 0.0], [1.55, 1.55, 1.55]], atol=1e-5)
    # GRPO: (R - mean) / std = -+0.775 / 1.0960155 = -+0.7071068 (eps 1e-6 in the denominator)
    grpo = pm.sequence_advantages(scores, kl, mask, kl_coef=0.5, n=2, estimator="grpo")
    close(grpo, [[-0.7071061, -0.7071061, 0.0], [0.7071061, 0.7071061, 0.7071061]], atol=1e-5)
    assert math.isclose(grpo[1, 0].item(), 1 / math.sqrt(2), abs_tol=1e-5)


# --- off-policy correction: decoupled PPO, importance weights, dual clip, Dr. GRPO aggregation -------------

def test_decoupled_loss_weighs_each_token_by_its_importance_weight():
    # rho = [1.5, 0.5] against the proximal policy, A = [1, -1], eps 0.2:
    #   token 1: max(-1.5, -1.2) = -1.2;  token 2: max(0.5, 0.8) = 0.8
    # weights [2, 0.5]: (2 * -1.2 + 0.5 * 0.8) / 2 tokens = -1.0 (without weights: (-1.2 + 0.8) / 2 = -0.2)
    logp, prox, adv, mask = t([[math.log(1.5), math.log(0.5)]]), t([[0.0, 0.0]]), t([[1.0, -1.0]]), t([[1, 1]])
    assert pm.clipped_policy_loss(logp, prox, adv, mask, 0.2).loss.item() == pytest.approx(-0.2, abs=1e-6)
    out = pm.clipped_policy_loss(logp, prox, adv, mask, 0.2, weights=t([[2.0, 0.5]]))
    assert out.loss.item() == pytest.approx(-1.0, abs=1e-6)
    assert out.clip_fraction.item() == 1.0  # both tokens took the clipped term


def test_unit_weights_give_todays_objective():
    g = torch.Generator().manual_seed(0)
    logp, old = torch.randn(4, 6, generator=g) * 0.3, torch.randn(4, 6, generator=g) * 0.3
    adv, mask = torch.randn(4, 6, generator=g), (torch.rand(4, 6, generator=g) > 0.3).float()
    plain = pm.clipped_policy_loss(logp, old, adv, mask, 0.2).loss
    w = pm.behaviour_weights(old, old, mask, "token", "truncate", 2.0)  # pi_prox == pi_behav: w = 1
    weighted = pm.clipped_policy_loss(logp, old, adv, mask, 0.2, weights=w.weights).loss
    assert abs(plain.item() - weighted.item()) < 1e-6
    assert w.ess.item() == pytest.approx(1.0) and w.bounded_fraction.item() == 0.0


def test_dual_clip_bounds_negative_advantages():
    # A = -1, rho = 4: max(-A rho, -A clip(rho)) = max(4, 1.2) = 4; dual clip c = 3 bounds it at -c A = 3.
    # A = +1, rho = 4: max(-4, -1.2) = -1.2, untouched (the dual clip acts on A < 0 only). Mean (3 - 1.2) / 2.
    logp, old, adv, mask = t([[math.log(4.0), math.log(4.0)]]), t([[0.0, 0.0]]), t([[-1.0, 1.0]]), t([[1, 1]])
    assert pm.clipped_policy_loss(logp, old, adv, mask, 0.2).loss.item() == pytest.approx((4 - 1.2) / 2, abs=1e-6)
    out = pm.clipped_policy_loss(logp, old, adv, mask, 0.2, dual_clip=3.0)
    assert out.loss.item() == pytest.approx((3 - 1.2) / 2, abs=1e-6)
    assert out.dual_clip_fraction.item() == 0.5


def test_seq_sum_norm_divides_each_sequence_by_a_constant():
    # per-token losses -A (ratio 1): row 1 [-1, -1, -1], row 2 [-2, pad, pad]; token mean (-3 - 2) / 4 = -1.25;
    # Dr. GRPO with constant 4: (-3 / 4 + -2 / 4) / 2 sequences = -0.625
    logp = torch.zeros(2, 3)
    adv, mask = t([[1.0, 1.0, 1.0], [2.0, 0.0, 0.0]]), t([[1, 1, 1], [1, 0, 0]])
    assert pm.clipped_policy_loss(logp, logp, adv, mask, 0.2).loss.item() == pytest.approx(-1.25)
    assert pm.clipped_policy_loss(logp, logp, adv, mask, 0.2, seq_norm=4.0).loss.item() == pytest.approx(-0.625)
    # a micro batch of one sequence out of a minibatch of 2: its share of the minibatch loss
    assert pm.clipped_policy_loss(logp[:1], logp[:1], adv[:1], mask[:1], 0.2, n_tokens=2,
                                  seq_norm=4.0).loss.item() == pytest.approx(-3 / 4 / 2)


def test_behaviour_weights_by_hand():
    # pi_prox / pi_behav = [3, 0.25] on two tokens (a third is padding)
    prox, behav, mask = t([[math.log(3.0), math.log(0.25), 5.0]]), t([[0.0, 0.0, 0.0]]), t([[1, 1, 0]])
    w = pm.behaviour_weights(prox, behav, mask, "token", "truncate", cap=2.0)
    close(w.weights, [[2.0, 0.25, 0.0]])  # min(w, 2)
    assert w.bounded_fraction.item() == 0.5
    assert w.ess.item() == pytest.approx(2.25**2 / (2 * (4 + 0.0625)))  # (sum w)^2 / (N sum w^2) = 0.6231
    m = pm.behaviour_weights(prox, behav, mask, "token", "mask", cap=2.0, floor=0.5)
    close(m.weights, [[0.0, 0.0, 0.0]])  # 3 > cap and 0.25 < floor: both masked
    assert m.bounded_fraction.item() == 1.0
    m = pm.behaviour_weights(prox, behav, mask, "token", "mask", cap=4.0, floor=0.5)
    close(m.weights, [[3.0, 0.0, 0.0]])  # kept tokens keep their weight
    s = pm.behaviour_weights(prox, behav, mask, "sequence", "truncate", cap=2.0)
    close(s.weights, [[0.75, 0.75, 0.0]])  # the product 3 x 0.25, on every token of the sequence
    assert s.ess.item() == pytest.approx(1.0) and s.bounded_fraction.item() == 0.0
    s = pm.behaviour_weights(t([[1.0, 1.0]]), t([[0.0, 0.0]]), t([[1, 1]]), "sequence", "mask", cap=2.0)
    close(s.weights, [[0.0, 0.0]])  # e^2 > 2: the whole sequence masked


def test_truncation_bounds_weights_under_an_injected_mismatch():
    g = torch.Generator().manual_seed(1)
    behav = torch.randn(16, 10, generator=g)
    prox = behav + torch.randn(16, 10, generator=g) * 3.0  # a large engine-vs-learner mismatch
    mask = torch.ones(16, 10)
    for level in ("token", "sequence"):
        w = pm.behaviour_weights(prox, behav, mask, level, "truncate", cap=2.0)
        assert w.weights.max().item() <= 2.0 and w.bounded_fraction.item() > 0.1
        assert torch.isfinite(w.weights).all() and 0 < w.ess.item() <= 1.0
    raw = torch.exp(prox - behav)
    assert raw.max().item() > 100  # what the loss would have been weighted by


def test_mismatch_by_hand():
    # behav - prox = [0.1, -0.3]: mean |d| 0.2, max 0.3, k1 mean(d) = -0.1,
    # k3 = mean(e^{-d} - 1 + d) = ((e^-0.1 - 0.9) + (e^0.3 - 1.3)) / 2
    m = pm.mismatch(t([[0.0, 0.0, 9.0]]), t([[0.1, -0.3, 0.0]]), t([[1, 1, 0]]))
    assert m.abs_diff_mean.item() == pytest.approx(0.2) and m.abs_diff_max.item() == pytest.approx(0.3)
    assert m.kl_k1.item() == pytest.approx(-0.1)
    assert m.kl_k3.item() == pytest.approx(((math.exp(-0.1) - 0.9) + (math.exp(0.3) - 1.3)) / 2, abs=1e-6)
