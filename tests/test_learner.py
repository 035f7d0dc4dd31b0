"""PPOLearner on experience built by hand from a rollout of the tiny SFT policy (plain classes, no Ray)."""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import pytest
import torch

from actors.learner import PPOLearner, StalenessError

pytestmark = pytest.mark.slow  # every test here uses the tiny checkpoints (trained once per session)

# prompts_per_step 4 x samples 2 = 8 sequences = one minibatch; one PPO epoch: a single optimizer step.
ONE_STEP = ["ppo.prompts_per_step=4", "ppo.samples_per_prompt=2", "ppo.minibatch_size=8", "ppo.ppo_epochs=1"]


@pytest.fixture(scope="module")
def experience(make_tiny_cfg, tiny_checkpoints):
    """8 sampled responses (4 prompts x 2) with behaviour/reference log-probs and reward scores."""
    from actors.reference import ReferenceLogprobs
    from actors.reward import RewardScorer
    from actors.rollout import RolloutGenerator
    from pipeline.data import load_tldr
    from pipeline.experience import Experience, RolloutRequest
    from pipeline.sft import encode_queries

    cfg = make_tiny_cfg(*ONE_STEP, "ppo.micro_batch_size=8")
    sft, rm = str(tiny_checkpoints.sft), str(tiny_checkpoints.rm)
    gen = RolloutGenerator(sft, cfg.rollout)
    tok = gen.backend.tokenizer
    queries = encode_queries(tok, [e.query for e in load_tldr(cfg.data).sft_train[:4]], cfg.data.max_prompt_tokens)
    indices = [i for i in range(4) for _ in range(2)]
    rollout = gen.generate(RolloutRequest(0, 0, indices, [queries[i] for i in indices], seed=11))
    ref = ReferenceLogprobs(sft, cfg.rollout.temperature).logprobs(rollout)
    scores = RewardScorer(rm, cfg.reward.missing_eos_score).score_rollout(rollout)
    exp = Experience.join([rollout], [ref], [scores], tok.pad_token_id)
    assert exp.size == 8 and exp.policy_version == 0
    # The barely trained policy rarely emits EOS within 12 tokens; cut responses to uneven lengths by hand (as an
    # EOS would), so token means and sequence means differ. Log-probs of the kept tokens stay valid (causal).
    lengths = torch.tensor([12, 3, 7, 12, 1, 5, 9, 2])
    keep = (torch.arange(exp.responses.shape[1]) < lengths[:, None]).long()  # (B, R)
    exp = replace(exp, responses=exp.responses.masked_fill(keep == 0, tok.pad_token_id),
                  response_mask=exp.response_mask * keep, logprobs=exp.logprobs * keep,
                  ref_logprobs=exp.ref_logprobs * keep)
    assert exp.response_mask.sum(-1).tolist() == lengths.tolist()
    return exp


def _learner(make_tiny_cfg, ckpt, *overrides: str) -> PPOLearner:
    return PPOLearner(make_tiny_cfg(*ONE_STEP, *overrides), str(ckpt.sft), str(ckpt.rm), device="cpu")


def _params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_micro_batch_1_x8_equals_micro_batch_8_x1(make_tiny_cfg, tiny_checkpoints, experience):
    """Invariance: accumulating 8 micro-batches of 1 gives the same update as one micro-batch of 8."""
    small = _learner(make_tiny_cfg, tiny_checkpoints, "ppo.micro_batch_size=1")
    big = _learner(make_tiny_cfg, tiny_checkpoints, "ppo.micro_batch_size=8")
    assert small.pc.grad_accum_steps == 8 and big.pc.grad_accum_steps == 1
    before = _params(small.policy)
    assert _max_diff(before, _params(big.policy)) == 0.0
    m_small = small.train_step(copy.deepcopy(experience))
    m_big = big.train_step(copy.deepcopy(experience))
    assert small.version == big.version == 1
    # the update is real (Adam's first step moves weights by up to about lr = 1e-4) ...
    assert _max_diff(_params(big.policy), before) > 0.5 * big.pc.lr
    # ... and does not depend on how the minibatch was split
    assert _max_diff(_params(small.policy), _params(big.policy)) < 1e-6
    assert _max_diff(_params(small.critic), _params(big.critic)) < 1e-6
    for k in ("ppo/policy_loss", "ppo/value_loss", "ppo/entropy", "ppo/approx_kl", "ppo/policy_grad_norm",
              "ppo/critic_grad_norm", "ppo/kl", "ppo/advantage_mean", "ppo/value_mean"):
        assert m_small[k] == pytest.approx(m_big[k], rel=1e-4, abs=1e-6), k


def test_first_epoch_ratio_is_one(make_tiny_cfg, tiny_checkpoints, experience):
    """Unchanged weights, one minibatch = the whole batch: the learner's log-probs equal the behaviour ones."""
    learner = _learner(make_tiny_cfg, tiny_checkpoints, "ppo.micro_batch_size=4")
    m = learner.train_step(copy.deepcopy(experience))
    assert m["ppo/clip_fraction"] == 0.0
    assert m["ppo/approx_kl"] < 1e-10
    assert m["ppo/staleness"] == 0.0
    assert m["ppo/kl"] == pytest.approx(0.0, abs=1e-5)  # the reference is the same SFT checkpoint
    assert m["ppo/advantage_mean"] == pytest.approx(0.0, abs=1e-5)  # whitened
    assert all(math.isfinite(v) for v in m.values())
    assert {k.split("/")[0] for k in m} <= {"ppo", "reward", "rollout", "timing"}


@pytest.mark.parametrize("policy_version", [-2, 1])
def test_stale_or_future_batch_is_rejected(make_tiny_cfg, tiny_checkpoints, experience, policy_version):
    learner = _learner(make_tiny_cfg, tiny_checkpoints, "ppo.max_staleness=1")
    before = _params(learner.policy)
    with pytest.raises(StalenessError, match=f"version {policy_version}; ppo.max_staleness is 1"):
        learner.train_step(replace(experience, policy_version=policy_version))
    assert learner.version == 0
    assert _max_diff(_params(learner.policy), before) == 0.0


def test_staleness_zero_rejects_a_one_step_old_batch(make_tiny_cfg, tiny_checkpoints, experience):
    learner = _learner(make_tiny_cfg, tiny_checkpoints, "ppo.max_staleness=0")
    learner.train_step(copy.deepcopy(experience))  # version 0 -> 1
    with pytest.raises(StalenessError, match="learner at version 1 got batch 0 generated by version 0"):
        learner.train_step(copy.deepcopy(experience))


def test_nan_score_raises_before_any_update(make_tiny_cfg, tiny_checkpoints, experience):
    learner = _learner(make_tiny_cfg, tiny_checkpoints)
    before = _params(learner.policy)
    scores = experience.scores.clone()
    scores[3] = float("nan")
    with pytest.raises(FloatingPointError, match="reward scores"):
        learner.train_step(replace(experience, scores=scores))
    assert learner.version == 0
    assert _max_diff(_params(learner.policy), before) == 0.0


def test_rloo_learner_has_no_critic(make_tiny_cfg, tiny_checkpoints, experience):
    learner = _learner(make_tiny_cfg, tiny_checkpoints, "ppo.advantage_estimator=rloo", "ppo.micro_batch_size=8")
    assert learner.critic is None
    m = learner.train_step(copy.deepcopy(experience))
    assert "ppo/value_loss" not in m and m["ppo/clip_fraction"] == 0.0
    assert learner.version == 1


def test_packet_carries_the_version_and_checksum(make_tiny_cfg, tiny_checkpoints, experience):
    from pipeline.weight_sync import checksum

    learner = _learner(make_tiny_cfg, tiny_checkpoints, "ppo.micro_batch_size=8")
    p0 = learner.make_packet()
    learner.train_step(copy.deepcopy(experience))
    p1 = learner.make_packet()
    assert (p0.version, p1.version) == (0, 1)
    assert p0.checksum != p1.checksum
    assert p1.checksum == checksum(learner.policy_weights().items())


def test_two_epochs_and_diagnostics_do_not_depend_on_the_micro_batch_size(make_tiny_cfg, tiny_checkpoints, experience):
    """Second epoch (ratios != 1, some clipping): weights and token-mean diagnostics still split-invariant."""
    runs = {}
    for micro in (1, 8):
        learner = _learner(make_tiny_cfg, tiny_checkpoints, f"ppo.micro_batch_size={micro}", "ppo.ppo_epochs=2",
                           "ppo.lr=3e-3", "ppo.clip_range=0.05")
        runs[micro] = (learner.train_step(copy.deepcopy(experience)), _params(learner.policy))
    (m1, w1), (m8, w8) = runs[1], runs[8]
    assert _max_diff(w1, w8) < 1e-5
    assert m8["ppo/approx_kl"] > 1e-6  # the second epoch moved away from the behaviour policy
    for k in ("ppo/policy_loss", "ppo/value_loss", "ppo/entropy", "ppo/approx_kl", "ppo/clip_fraction",
              "ppo/value_clip_fraction"):
        assert m1[k] == pytest.approx(m8[k], rel=1e-4, abs=1e-7), k
