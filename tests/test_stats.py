"""core.stats against hand computations and closed forms; the evaluation's result keys and the report's
intervals and verdicts on synthetic policy samples (no model, no Ray)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from rayrlhf.core import stats


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


# --- win rates and mean differences ---------------------------------------------------------------------

def test_wins_count_ties_half():
    # 2 > 1: win; 1 = 1 (and 1 vs 1 + 1e-12, within the tolerance): tie; 0 < 1: loss
    np.testing.assert_array_equal(stats.wins([2.0, 1.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0 + 1e-12]), [1, 0.5, 0, 0.5])
    e = stats.win_rate([2.0, 1.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], seed=0)
    assert e.value == 0.5 and e.n == 4  # (1 + 0.5 + 0 + 0.5) / 4


def test_bootstrap_interval_matches_the_normal_approximation():
    rng = np.random.default_rng(0)
    x = (rng.random(400) < 0.6).astype(float)
    e = stats.mean_interval(x, seed=1)
    half = 1.959964 * x.std(ddof=1) / math.sqrt(len(x))  # ~0.048: the interval of a mean for large n
    assert e.value == x.mean()
    assert e.ci_low == pytest.approx(x.mean() - half, abs=0.01)
    assert e.ci_high == pytest.approx(x.mean() + half, abs=0.01)
    assert stats.mean_interval(x, seed=1) == e  # seeded: deterministic


def test_mean_difference_is_paired_over_prompts():
    # a and b vary a lot between prompts but a = b + 0.1 + small noise on each: the paired interval is about
    # the noise's, sd 0.05 / sqrt(500) * 1.96 ~ 0.0044, not the prompts' spread (sd 1 -> ~0.12 unpaired)
    rng = np.random.default_rng(2)
    b = rng.normal(0, 1, 500)
    a = b + 0.1 + rng.normal(0, 0.05, 500)
    e = stats.mean_difference(a, b, seed=0)
    half = 1.959964 * (a - b).std(ddof=1) / math.sqrt(500)
    assert e.value == pytest.approx(0.1, abs=0.01)
    assert e.ci_high - e.ci_low == pytest.approx(2 * half, rel=0.15)
    assert e.ci_high - e.ci_low < 0.02


def test_too_few_prompts_give_no_interval():
    one = stats.win_rate([1.0], [0.0], seed=0)
    assert one.value == 1.0 and one.n == 1 and math.isnan(one.ci_low) and not one.includes(1.0)
    none = stats.win_rate([], [], seed=0)
    assert none.n == 0 and math.isnan(none.value)
    ties = stats.win_rate([1.0] * 5, [1.0] * 5, seed=0)  # degenerate: every prompt a tie
    assert (ties.value, ties.ci_low, ties.ci_high) == (0.5, 0.5, 0.5) and ties.includes(0.5)


# --- accuracy against chance ------------------------------------------------------------------------------

def test_accuracy_binomial_test_by_hand():
    # 8 of 10: P(X >= 8 | p = 0.5) = (C(10,8) + C(10,9) + C(10,10)) / 2^10 = (45 + 10 + 1) / 1024
    t = stats.accuracy_vs_chance(8, 10)
    assert t.accuracy == 0.8 and t.p_value == pytest.approx(56 / 1024, abs=1e-12)
    assert not t.better_than_chance  # 0.0547 >= 0.05
    # 5 of 10: P(X >= 5) = (252 + 210 + 120 + 45 + 10 + 1) / 1024
    assert stats.accuracy_vs_chance(5, 10).p_value == pytest.approx(638 / 1024, abs=1e-12)
    # 60 of 100: sum of C(100, k) for k >= 60 over 2^100 (~0.028)
    t = stats.accuracy_vs_chance(60, 100)
    assert t.p_value == pytest.approx(sum(math.comb(100, k) for k in range(60, 101)) / 2**100, rel=1e-9)
    assert t.better_than_chance


def test_clopper_pearson_interval_closed_forms():
    # k = 0: [0, 1 - (alpha/2)^(1/n)]; k = n: [(alpha/2)^(1/n), 1] (alpha = 0.05, n = 10: 0.025^0.1 = 0.69150)
    zero, all_right = stats.accuracy_vs_chance(0, 10), stats.accuracy_vs_chance(10, 10)
    assert (zero.ci_low, zero.ci_high) == (0.0, pytest.approx(1 - 0.025**0.1, abs=1e-9))
    assert (all_right.ci_low, all_right.ci_high) == (pytest.approx(0.025**0.1, abs=1e-9), 1.0)
    assert all_right.p_value == pytest.approx(1 / 1024) and zero.p_value == 1.0
    # two-sided interval even though the test is one-sided: 5 of 10 is symmetric around 0.5
    half = stats.accuracy_vs_chance(5, 10)
    assert half.ci_low == pytest.approx(1 - half.ci_high, abs=1e-12) and half.ci_low < 0.5 < half.ci_high


# --- length control -------------------------------------------------------------------------------------

def test_logistic_fit_without_length_differences_is_the_logit_of_the_mean():
    # all x = 0: b0 = logit(3/4) = log 3, up to the weak ridge (4 (p - 0.75) + 0.01 b0 = 0 -> p ~ 0.7473)
    b0, b1 = stats.logistic_fit(np.array([1.0, 1.0, 1.0, 0.0]), np.zeros(4))
    assert sigmoid(b0) == pytest.approx(0.75, abs=3e-3) and b1 == 0.0
    # ties (0.5) as fractional outcomes: half of every prompt won -> 0.5
    b0, _ = stats.logistic_fit(np.full(6, 0.5), np.zeros(6))
    assert sigmoid(b0) == pytest.approx(0.5, abs=1e-9)
    # batched: one fit per row, as the vectorized bootstrap calls it
    b0, _ = stats.logistic_fit(np.array([[1.0, 1.0, 1.0, 0.0], [0.5] * 4]), np.zeros((2, 4)))
    assert sigmoid(b0) == pytest.approx([0.75, 0.5], abs=3e-3)


def test_equal_length_win_rate_recovers_a_known_effect():
    # P(win) = sigmoid(1 + 0.1 d): at equal length sigmoid(1) = 0.7311
    rng = np.random.default_rng(3)
    d = rng.integers(-20, 21, 2000).astype(float)
    w = (rng.random(2000) < sigmoid(1.0 + 0.1 * d)).astype(float)
    lc = stats.equal_length_win_rate(w, d, seed=0)
    assert lc.equal_length.value == pytest.approx(sigmoid(1.0), abs=0.03)
    assert lc.equal_length.includes(sigmoid(1.0)) and not lc.equal_length.includes(0.5)
    assert lc.slope_per_token == pytest.approx(0.1, abs=0.02)
    assert stats.equal_length_win_rate(w, d, seed=0) == lc  # deterministic


def test_a_pure_length_effect_is_a_tie_at_equal_length():
    # PPO always longer (0 to 20 tokens) and wins only through length: P(win) = sigmoid(0.15 d)
    rng = np.random.default_rng(4)
    d = rng.integers(0, 21, 1000).astype(float)
    w = (rng.random(1000) < sigmoid(0.15 * d)).astype(float)
    plain = stats.mean_interval(w, seed=0)
    assert plain.value > 0.75 and not plain.includes(0.5)  # the plain win rate says "PPO is better"
    lc = stats.equal_length_win_rate(w, d, seed=0)
    assert lc.equal_length.value == pytest.approx(0.5, abs=0.06) and lc.equal_length.includes(0.5)


def test_equal_length_win_rate_stays_finite_when_every_prompt_is_won():
    lc = stats.equal_length_win_rate(np.ones(8), np.arange(8.0), seed=0)
    assert 0.5 < lc.equal_length.value < 1 and math.isfinite(lc.equal_length.ci_low)


def test_win_rate_by_length_bins():
    d = [-12, -5, 0, 1, 4, 20]
    w = [0.0, 0.0, 0.5, 1.0, 1.0, 1.0]
    bins = stats.win_rate_by_length(w, d, seed=0)
    assert [(r, e.value, e.n) for r, e in bins] == [((-math.inf, -11), 0.0, 1), ((-10, -3), 0.0, 1),
                                                    ((-2, 2), 0.75, 2), ((3, 10), 1.0, 1), ((11, math.inf), 1.0, 1)]
    assert stats.win_rate_by_length([1.0], [0], seed=0)[0][0] == (-2, 2)  # empty bins left out


# --- the evaluation's results and the report --------------------------------------------------------------

def _samples():
    """Four prompts worked by hand. SFT's first response has no EOS (its score the missing-EOS -1)."""
    from rayrlhf.roles.evaluate import PolicySamples

    sft = PolicySamples(texts=["a b", "c", "d e", "f"], lengths=[16, 5, 6, 7], scores=[-1.0, 0.2, 0.1, 0.3],
                        raw_scores=[0.5, 0.2, 0.1, 0.3], has_eos=[False, True, True, True], kl=[0.0] * 4)
    ppo = PolicySamples(texts=["a", "c", "d", "f"], lengths=[8, 5, 9, 7], scores=[0.4, 0.1, 0.3, 0.3],
                        raw_scores=[0.4, 0.1, 0.3, 0.3], has_eos=[True] * 4, kl=[1.0, 2.0, 3.0, 2.0])
    return ppo, sft


def test_evaluation_reports_raw_both_eos_and_length_controlled_win_rates_with_intervals():
    from rayrlhf.roles.evaluate import compare_policies, summarise
    from rayrlhf.core.data import SummaryExample

    ppo, sft = _samples()
    m, bins = compare_policies(ppo, sft, seed=0)
    # EOS trick: wins [1, 0, 1, 0.5]; raw: [0, 0, 1, 0.5]; both ended with EOS (prompts 2-4): [0, 1, 0.5]
    assert m["eval/ppo_reward_win_vs_sft"] == 0.625 and m["eval/ppo_reward_win_vs_sft_n"] == 4
    assert m["eval/ppo_reward_win_vs_sft_raw"] == 0.375
    assert m["eval/ppo_reward_win_vs_sft_both_eos"] == 0.5 and m["eval/ppo_reward_win_vs_sft_both_eos_n"] == 3
    for key in ("ppo_reward_win_vs_sft", "ppo_reward_win_vs_sft_raw", "ppo_reward_win_vs_sft_both_eos",
                "ppo_reward_win_vs_sft_equal_length", "ppo_minus_sft_reward", "ppo_minus_sft_eos_rate"):
        assert m[f"eval/{key}_ci_low"] <= m[f"eval/{key}"] <= m[f"eval/{key}_ci_high"], key
    assert "eval/ppo_reward_win_vs_sft_length_slope" in m
    assert "eval/ppo_judge_win_vs_sft" not in m and "eval/ppo_gold_win_vs_sft" not in m  # neither present
    assert m["eval/ppo_minus_sft_eos_rate"] == 0.25  # 1 - 3/4
    assert m["eval/ppo_minus_sft_length"] == -1.25  # (-8 + 0 + 3 + 0) / 4
    assert m["eval/ppo_minus_sft_kl"] == 2.0
    assert [(b["low"], b["high"], b["n"]) for b in bins["ppo_reward_win_vs_sft"]] == [(-10, -3, 1), (-2, 2, 2),
                                                                                      (3, 10, 1)]
    json.dumps(bins, allow_nan=False)  # plain JSON: open ends and missing intervals are None
    assert compare_policies(ppo, sft, seed=0) == (m, bins)  # seeded

    s = summarise("sft", sft, [SummaryExample(str(i), "q", t) for i, t in enumerate(sft.texts)], seed=0)
    assert s["eval/sft_eos_rate"] == 0.75 and s["eval/sft_eos_rate_n"] == 4
    assert s["eval/sft_eos_rate_ci_low"] <= 0.75 <= s["eval/sft_eos_rate_ci_high"]
    assert s["eval/sft_reward"] == pytest.approx(-0.1) and s["eval/sft_reward_raw"] == pytest.approx(0.275)

    # every evaluator present: the judge and the gold judge get the same views (gold: no raw scores)
    for p, scores in ((ppo, [0.5, 0.1, 0.2, 0.3]), (sft, [0.1, 0.2, 0.3, 0.3])):
        p.judge_scores, p.judge_raw_scores, p.gold_scores = scores, scores, scores
    m, bins = compare_policies(ppo, sft, seed=0)
    for e in ("judge", "gold"):
        assert m[f"eval/ppo_{e}_win_vs_sft"] == 0.375 and f"eval/ppo_{e}_win_vs_sft_equal_length" in m
        assert f"eval/ppo_{e}_win_vs_sft_both_eos_ci_low" in m and f"ppo_{e}_win_vs_sft" in bins
    assert "eval/ppo_judge_win_vs_sft_raw" in m and "eval/ppo_gold_win_vs_sft_raw" not in m
    assert "eval/ppo_minus_sft_judge_score" in m and "eval/ppo_minus_sft_gold_score" in m


def _fake_run(tmp_path, rm_accuracy: float, judge_accuracy: float, n_prompts: int = 40):
    """A run directory with stage summaries and an evaluation computed from synthetic samples: PPO's judge
    scores no better than SFT's, its training-reward scores clearly better."""
    from rayrlhf.roles.evaluate import PolicySamples, compare_policies
    from rayrlhf.pipeline.run_dir import RunDir

    rng = np.random.default_rng(5)
    policies = {}
    judged_sft = rng.normal(0.0, 0.5, n_prompts)
    for name, shift in (("sft", 0.0), ("ppo", 1.0)):
        reward = rng.normal(shift, 0.5, n_prompts).tolist()
        # the judge: PPO wins exactly every other prompt
        judged = (judged_sft + shift * 0.1 * (-1) ** np.arange(n_prompts)).tolist()
        policies[name] = PolicySamples(texts=["x"] * n_prompts, lengths=rng.integers(5, 20, n_prompts).tolist(),
                                       scores=reward, raw_scores=reward, has_eos=(rng.random(n_prompts) < 0.9).tolist(),
                                       kl=[0.0] * n_prompts, judge_scores=judged, judge_raw_scores=judged)
    m, bins = compare_policies(policies["ppo"], policies["sft"], seed=0)
    m.update({f"eval/{name}_reward": float(np.mean(s.scores)) for name, s in policies.items()})
    m.update({"eval/num_prompts": float(n_prompts), "eval/rm_valid_pairs": 50.0, "eval/judge_valid_pairs": 100.0,
              "eval/sft_length": 12.0, "eval/ppo_length": 12.5, "eval/sft_eos_rate": 0.9, "eval/sft_eos_rate_n": 40.0,
              "eval/sft_eos_rate_ci_low": 0.8, "eval/sft_eos_rate_ci_high": 0.975, "eval/ppo_eos_rate": 0.85,
              "eval/ppo_eos_rate_n": 40.0, "eval/ppo_eos_rate_ci_low": 0.725, "eval/ppo_eos_rate_ci_high": 0.95})
    run = RunDir(tmp_path)
    run.record("rm", {"rm/valid_accuracy": rm_accuracy})
    run.record("judge", {"judge/valid_accuracy": judge_accuracy})
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "results.json").write_text(json.dumps({"metrics": m, "length_bins": bins, "samples": []}))
    return run, m


def test_report_states_intervals_ties_and_evaluators_no_better_than_chance(tmp_path):
    from rayrlhf.pipeline.report import write_report

    # rm: 26 of 50 right (p = 0.44): not better than chance; judge: 80 of 100 (p ~ 1e-9)
    run, m = _fake_run(tmp_path, rm_accuracy=0.52, judge_accuracy=0.8)
    report = write_report(run).read_text()
    assert m["eval/ppo_reward_win_vs_sft_ci_low"] > 0.5 and m["eval/ppo_judge_win_vs_sft_ci_low"] <= 0.5
    lines = report.splitlines()
    reward = next(i for i, line in enumerate(lines) if "Training-reward-model win rate, PPO vs SFT" in line)
    judge = next(i for i, line in enumerate(lines) if "Judge win rate, PPO vs SFT" in line)
    assert "n = 40" in lines[reward] and "mean length PPO 12.5 vs SFT 12.0" in lines[reward]
    assert lines[reward].endswith("PPO wins more often than SFT.")
    assert "not better than chance on held-out pairs" in lines[reward + 1]  # the rm's verdict is flagged
    assert "not distinguishable from a tie (the interval includes 0.5)" in lines[judge]
    ci = f"[{m['eval/ppo_judge_win_vs_sft_ci_low']:.3f}, {m['eval/ppo_judge_win_vs_sft_ci_high']:.3f}]"
    assert ci in lines[judge]
    for view in ("raw scores (no EOS trick)", "both responses ended with EOS", "at equal length"):
        assert any(view in line and "n = " in line for line in lines[judge:]), view
    assert "| judge | -2 to 2 |" in report  # the length-difference bins
    assert "Ended with EOS: SFT 0.900 [0.800, 0.975], n = 40; PPO 0.850 [0.725, 0.950], n = 40" in report
    rm_line = next(line for line in lines if line.startswith("- Training reward model:"))
    assert "0.520 [" in rm_line and "n = 50 pairs" in rm_line and "**not better than chance** (p >= 0.05)" in rm_line
    judge_line = next(line for line in lines if line.startswith("- Judge:"))
    assert "n = 100 pairs" in judge_line and judge_line.endswith("better than chance") and "not" not in judge_line
    # the PPO - SFT column: the paired mean difference with its interval, and what it says
    row = next(line for line in lines if line.startswith("| reward |"))
    assert f"| {m['eval/ppo_minus_sft_reward']:.3f} [" in row and row.endswith(", n = 40 | PPO higher |")


def test_report_prefers_the_pair_count_the_stage_logged(tmp_path):
    from rayrlhf.pipeline.report import accuracy_tests

    tests = accuracy_tests({"rm": {"rm/valid_accuracy": 0.6, "rm/valid_pairs": 200.0}}, {"eval/rm_valid_pairs": 7.0})
    assert [(a.stage, a.test.n, a.test.accuracy) for a in tests] == [("rm", 200, 0.6)]
    unknown = accuracy_tests({"judge": {"judge/valid_accuracy": 0.6}}, {})
    assert unknown[0].test is None


def test_accuracy_verdict_agrees_with_its_bound():
    """59 of 100: one-sided p = 0.044 (better than chance) while the two-sided interval reaches below 0.5; the
    one-sided lower bound, which the report prints with the verdict, is above 0.5."""
    t = stats.accuracy_vs_chance(59, 100)
    assert t.better_than_chance and t.ci_low < 0.5 < t.lower_bound
    for correct in range(40, 70):
        t = stats.accuracy_vs_chance(correct, 100)
        assert t.better_than_chance == (t.lower_bound > 0.5), correct
