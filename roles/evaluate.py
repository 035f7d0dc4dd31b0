"""Held-out evaluation of the SFT and PPO policies of a run, each figure with its uncertainty.

For each policy: responses sampled at the rollout temperature with the rollout's backend (seeded, so both
policies see the same prompts and RNG stream), the learned reward (with the EOS trick, as in training, and
without it), the share of responses that ended with EOS, the KL to the reference policy (sum over response
tokens of log pi - log pi_ref on the policy's own samples), ROUGE against the references and the mean
response length. With a judge (a reward model trained on comparisons disjoint from the training reward
model's), its score and its win rate of PPO over SFT, scored like the reward: a policy that exploits the
training reward model without writing better summaries shows there. On the synthetic task the gold judge
gives the win rate of PPO over SFT and of each policy over the human references. Ties count half in every
win rate.

The EOS trick gives a response without EOS a fixed low score, so a win rate on those scores partly measures
"ended with EOS", and reward models prefer longer summaries. Each PPO-vs-SFT win rate is therefore also
given on raw scores, on the prompts where both responses ended with EOS, and at equal length
(`core.stats.equal_length_win_rate`).

Keys of results.json "metrics" (also logged), for a policy p in {sft, ppo}:
    eval/num_prompts
    eval/{p}_reward, eval/{p}_reward_raw              training reward model, mean score with / without EOS trick
    eval/{p}_judge_score, eval/{p}_judge_score_raw    the judge reward model, likewise (with a judge)
    eval/{p}_gold_score                               the gold judge (synthetic task; it reads text only)
    eval/{p}_kl, eval/{p}_length, eval/{p}_rouge1/2/L
    eval/{p}_eos_rate *                               share of responses that ended with EOS
    eval/{p}_gold_win_vs_reference *                  gold judge, p's summary vs the human reference
    eval/reference_gold_score
for an evaluator e in {reward, judge, gold} (judge with a judge, gold on the synthetic task):
    eval/ppo_{e}_win_vs_sft *                 PPO vs SFT win rate on e's scores (EOS trick for reward and judge)
    eval/ppo_{e}_win_vs_sft_raw *             the same on raw scores, no EOS trick (reward, judge)
    eval/ppo_{e}_win_vs_sft_both_eos *        on the prompts where both responses ended with EOS (where the EOS
                                              trick changes no score: the same for raw scores)
    eval/ppo_{e}_win_vs_sft_equal_length *    win probability at equal length: logistic regression of the win on
                                              the per-prompt length difference (PPO minus SFT, tokens)
    eval/ppo_{e}_win_vs_sft_equal_length_both_eos *  the same fit on the prompts where both ended with EOS
    eval/ppo_{e}_win_vs_sft_length_slope      its slope: log-odds of a PPO win per token PPO is longer
and paired mean differences PPO minus SFT:
    eval/ppo_minus_sft_{x} *   x in reward, reward_raw, judge_score, judge_score_raw, gold_score, kl, length, eos_rate
    eval/rm_valid_pairs, eval/judge_valid_pairs   held-out comparisons the rm / judge stages measured their
                                                  accuracy on (the same data, derived here): the report's n
Each key K marked * comes with K_ci_low, K_ci_high (95 % paired bootstrap over prompts, percentile, seeded
by run.seed; absent where fewer than two prompts) and K_n (the prompts it was computed on; K itself is
absent where K_n is 0).
results.json "length_bins": {"ppo_{e}_win_vs_sft": [{"low", "high", "win", "ci_low", "ci_high", "n"}, ...]}:
the win rate within inclusive ranges of the length difference (PPO minus SFT, tokens; None: an open end).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from rayrlhf.roles.reward import RewardScorer
from rayrlhf.core import stats
from rayrlhf.core.config import Config
from rayrlhf.core.data import SummaryExample, load_tldr
from rayrlhf.core.metrics import MetricsLogger
from rayrlhf.core.modeling import load_frozen
from rayrlhf.core.forward import response_logprobs
from rayrlhf.core.padding import pad_left
from rayrlhf.core.sampling import sample
from rayrlhf.core.synthetic import judge
from rayrlhf.core.text import encode_queries, rouge, with_encodable_queries
from rayrlhf.core.training import seed_everything

log = logging.getLogger(__name__)


@dataclass
class PolicySamples:
    """One policy's responses to the evaluation prompts: every list has one entry per prompt, in prompt order
    (the judge's and the gold judge's lists are empty where there is none)."""

    texts: list[str] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)  # response tokens, EOS included
    scores: list[float] = field(default_factory=list)  # training reward model, EOS trick applied
    raw_scores: list[float] = field(default_factory=list)  # training reward model, no EOS trick
    has_eos: list[bool] = field(default_factory=list)  # the response ended with EOS
    kl: list[float] = field(default_factory=list)
    judge_scores: list[float] = field(default_factory=list)  # judge reward model, EOS trick applied
    judge_raw_scores: list[float] = field(default_factory=list)
    gold_scores: list[float] = field(default_factory=list)  # the synthetic task's gold judge (reads text only)


class HFSampler:
    """Samples a checkpoint with `core.sampling.sample`; log-probs recomputed by the same model."""

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def load(self, checkpoint: str) -> None:
        self.model, self.tok = load_frozen(checkpoint, "causal_lm", self.cfg.model.frozen_dtype, device="cpu")

    def generate(self, prompts: torch.Tensor, pmask: torch.Tensor, seed: int) -> tuple[torch.Tensor, ...]:
        rollout_cfg, tok = self.cfg.rollout, self.tok
        torch.manual_seed(seed)
        responses, rmask = sample(self.model, prompts, pmask, max_new_tokens=rollout_cfg.max_new_tokens,
                                  eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, temperature=rollout_cfg.temperature,
                                  top_p=rollout_cfg.top_p)
        logp, _ = response_logprobs(self.model, prompts, pmask, responses, rmask, rollout_cfg.temperature)
        return responses, rmask, logp


class VLLMSampler:
    """Samples with one vLLM engine (started on the SFT checkpoint; later policies' weights swapped in), as the
    rollout does: on the real model it generates several times faster than `sample`, and its behaviour
    log-probs are the policy's (the learner checks them against its own every update)."""

    def __init__(self, cfg: Config, first_checkpoint: str):
        from rayrlhf.roles.vllm_backend import VLLMBackend

        self.backend, self.loaded = VLLMBackend(first_checkpoint, cfg.rollout, cfg.model.frozen_dtype), first_checkpoint
        self.dtype = cfg.model.frozen_dtype

    def load(self, checkpoint: str) -> None:
        from rayrlhf.roles.vllm_backend import read_checkpoint_weights

        if checkpoint != self.loaded:
            self.backend.load_weights(read_checkpoint_weights(checkpoint, self.dtype).items())
            self.loaded = checkpoint
        self.tok = self.backend.tokenizer

    def generate(self, prompts: torch.Tensor, pmask: torch.Tensor, seed: int) -> tuple[torch.Tensor, ...]:
        rows = [p[m.bool()].tolist() for p, m in zip(prompts, pmask)]
        return self.backend.generate(rows, seed)


@torch.no_grad()
def sample_policy(cfg: Config, checkpoint: str, sampler: HFSampler | VLLMSampler, reference, scorer: RewardScorer,
                  queries: list[list[int]], seed: int, judge_rm: RewardScorer | None = None) -> PolicySamples:
    sampler.load(checkpoint)
    tok = sampler.tok
    out = PolicySamples()
    bs = cfg.eval.batch_size
    for i in range(0, len(queries), bs):
        prompts, pmask = pad_left(queries[i : i + bs], tok.pad_token_id)
        responses, rmask, logp = sampler.generate(prompts, pmask, seed + i)
        ref_logp, _ = response_logprobs(reference, prompts, pmask, responses, rmask, cfg.rollout.temperature)
        reward = scorer.score_tokens(prompts, pmask, responses, rmask)
        out.scores += reward.scores.tolist()
        out.raw_scores += reward.raw_scores.tolist()
        out.has_eos += reward.has_eos.tolist()
        if judge_rm is not None:
            judged = judge_rm.score_tokens(prompts, pmask, responses, rmask)
            out.judge_scores += judged.scores.tolist()
            out.judge_raw_scores += judged.raw_scores.tolist()
        out.kl += ((logp - ref_logp) * rmask).sum(-1).tolist()
        out.lengths += rmask.sum(-1).tolist()
        out.texts += tok.batch_decode(responses.masked_fill(rmask == 0, tok.pad_token_id), skip_special_tokens=True)
    return out


@dataclass(frozen=True)
class Evaluator:
    """One evaluator's per-prompt scores of a policy: `scores` as its win rate uses them (with the EOS trick for
    the reward models), `raw` without the EOS trick (None for the gold judge, which reads text only)."""

    name: str  # eval/ppo_{name}_win_vs_sft
    score_key: str  # eval/{policy}_{score_key}
    scores: list[float]
    raw: list[float] | None


def evaluators(s: PolicySamples) -> list[Evaluator]:
    """The training reward model, then the judge and the gold judge where present."""
    out = [Evaluator("reward", "reward", s.scores, s.raw_scores)]
    if s.judge_scores:
        out.append(Evaluator("judge", "judge_score", s.judge_scores, s.judge_raw_scores))
    if s.gold_scores:
        out.append(Evaluator("gold", "gold_score", s.gold_scores, None))
    return out


def put_estimate(results: dict[str, float], key: str, e: stats.Estimate) -> None:
    """`key`, `key_ci_low`, `key_ci_high` and `key_n` into results; what is undefined (nan) is left out."""
    results[f"{key}_n"] = float(e.n)
    for k, v in ((key, e.value), (f"{key}_ci_low", e.ci_low), (f"{key}_ci_high", e.ci_high)):
        if math.isfinite(v):
            results[k] = v


def _finite(x: float) -> float | None:
    """x for JSON, None where it is infinite or nan (an open end of a range, an interval of one prompt)."""
    return x if math.isfinite(x) else None


def summarise(name: str, s: PolicySamples, examples: list[SummaryExample], seed: int) -> dict[str, float]:
    """One policy's means: each evaluator's score (with and without the EOS trick), KL, length, ROUGE, and its
    EOS rate with an interval."""
    out = {f"eval/{name}_kl": float(np.mean(s.kl)), f"eval/{name}_length": float(np.mean(s.lengths))}
    for e in evaluators(s):
        out[f"eval/{name}_{e.score_key}"] = float(np.mean(e.scores))
        if e.raw is not None:
            out[f"eval/{name}_{e.score_key}_raw"] = float(np.mean(e.raw))
    put_estimate(out, f"eval/{name}_eos_rate", stats.mean_interval(np.asarray(s.has_eos, dtype=float), seed))
    out.update({f"eval/{name}_{k}": v for k, v in rouge(s.texts, [e.reference for e in examples]).items()})
    return out


def compare_policies(ppo: PolicySamples, sft: PolicySamples, seed: int
                     ) -> tuple[dict[str, float], dict[str, list[dict]]]:
    """PPO vs SFT on the same prompts: every evaluator's win rate (its scores, raw scores, both-EOS prompts,
    at equal length) and the paired mean differences, each with its interval; and the win rates by length
    difference (results.json "length_bins"). Keys: the module docstring."""
    results: dict[str, float] = {}
    bins: dict[str, list[dict]] = {}
    both_eos = np.asarray(ppo.has_eos, dtype=bool) & np.asarray(sft.has_eos, dtype=bool)
    length_diff = np.asarray(ppo.lengths, dtype=float) - np.asarray(sft.lengths, dtype=float)
    diffs = {"kl": (ppo.kl, sft.kl), "length": (ppo.lengths, sft.lengths), "eos_rate": (ppo.has_eos, sft.has_eos)}
    for p, s in zip(evaluators(ppo), evaluators(sft)):
        key = f"ppo_{p.name}_win_vs_sft"
        w = stats.wins(p.scores, s.scores)
        put_estimate(results, f"eval/{key}", stats.mean_interval(w, seed))
        diffs[p.score_key] = (p.scores, s.scores)
        if p.raw is not None:
            put_estimate(results, f"eval/{key}_raw", stats.win_rate(p.raw, s.raw, seed))
            diffs[f"{p.score_key}_raw"] = (p.raw, s.raw)
        # both ended with EOS: the EOS trick changed neither score, so this is also the raw win rate there
        put_estimate(results, f"eval/{key}_both_eos", stats.mean_interval(w[both_eos], seed))
        controlled = stats.equal_length_win_rate(w, length_diff, seed)
        put_estimate(results, f"eval/{key}_equal_length", controlled.equal_length)
        # without EOS a response has the whole budget's length and the missing-EOS score: fitted where both ended,
        # the length effect is not confounded with ending
        put_estimate(results, f"eval/{key}_equal_length_both_eos",
                     stats.equal_length_win_rate(w[both_eos], length_diff[both_eos], seed).equal_length)
        if math.isfinite(controlled.slope_per_token):
            results[f"eval/{key}_length_slope"] = controlled.slope_per_token
        bins[key] = [{"low": _finite(low), "high": _finite(high), "win": e.value, "ci_low": _finite(e.ci_low),
                      "ci_high": _finite(e.ci_high), "n": e.n}
                     for (low, high), e in stats.win_rate_by_length(w, length_diff, seed)]
    for what, (a, b) in diffs.items():
        put_estimate(results, f"eval/ppo_minus_sft_{what}", stats.mean_difference(a, b, seed))
    return results, bins


def _shown_samples(examples: list, policies: dict, gold: bool) -> list[dict]:
    """The first prompts' responses of each policy with their scores, as the report shows them."""
    samples = []
    for i, e in enumerate(examples):
        row = {"query": e.query, "reference": e.reference.strip()}
        for name, s in policies.items():
            row[name] = s.texts[i].strip()
            row[f"{name}_reward"] = s.scores[i]
            row[f"{name}_eos"] = bool(s.has_eos[i])
            if s.judge_scores:
                row[f"{name}_judge"] = s.judge_scores[i]
            if gold:
                row[f"{name}_gold"] = s.gold_scores[i]
        samples.append(row)
    return samples


def evaluate_policies(cfg: Config, sft_checkpoint: str, rm_checkpoint: str, ppo_checkpoint: str | None,
                      out_dir: Path, judge_checkpoint: str | None = None) -> dict[str, float]:
    seed_everything(cfg.run.seed)
    reference, tok = load_frozen(sft_checkpoint, "causal_lm", cfg.model.frozen_dtype, device="cpu")
    data = with_encodable_queries(tok, load_tldr(cfg.data), cfg.data)  # as the rm and judge stages read it
    examples = data.sft_test[: cfg.eval.num_prompts]
    queries = encode_queries(tok, [e.query for e in examples], cfg.data.max_prompt_tokens)
    scorer = RewardScorer(rm_checkpoint, cfg.reward.missing_eos_score, cfg.reward.batch_size, cfg.model.frozen_dtype)
    # the judge reward model (not core.synthetic.judge, the gold judge of the builtin task)
    judge_rm = None if judge_checkpoint is None else RewardScorer(judge_checkpoint, cfg.reward.missing_eos_score,
                                                                  cfg.reward.batch_size, cfg.model.frozen_dtype)
    seed = cfg.run.seed + 777
    sampler = VLLMSampler(cfg, sft_checkpoint) if cfg.rollout.backend == "vllm" else HFSampler(cfg)
    policies = {"sft": sample_policy(cfg, sft_checkpoint, sampler, reference, scorer, queries, seed, judge_rm)}
    if ppo_checkpoint:
        policies["ppo"] = sample_policy(cfg, ppo_checkpoint, sampler, reference, scorer, queries, seed, judge_rm)
    gold = examples[0].post is not None
    if gold:  # the builtin synthetic task's gold judge
        for s in policies.values():
            s.gold_scores = [judge(e.post, t).score for e, t in zip(examples, s.texts)]
    stats_seed = cfg.run.seed  # every bootstrap interval resamples from this seed: deterministic
    # the held-out pairs the rm / judge stages' accuracies were measured on: n of the report's binomial tests
    results: dict[str, float] = {"eval/num_prompts": float(len(examples)),
                                 "eval/rm_valid_pairs": float(len(data.pairs("rm")[1])),
                                 "eval/judge_valid_pairs": float(len(data.pairs("judge")[1]))}
    for name, s in policies.items():
        results.update(summarise(name, s, examples, stats_seed))
    length_bins: dict[str, list[dict]] = {}
    if "ppo" in policies:
        compared, length_bins = compare_policies(policies["ppo"], policies["sft"], stats_seed)
        results.update(compared)
    if gold:
        ref_gold = [judge(e.post, e.reference).score for e in examples]
        results["eval/reference_gold_score"] = float(np.mean(ref_gold))
        for name, s in policies.items():
            put_estimate(results, f"eval/{name}_gold_win_vs_reference", stats.win_rate(s.gold_scores, ref_gold,
                                                                                      stats_seed))
    samples = _shown_samples(examples[: max(cfg.eval.num_samples_shown, 0)], policies, gold)
    out_dir.mkdir(parents=True, exist_ok=True)
    ev = {"metrics": results, "length_bins": length_bins, "samples": samples}
    (out_dir / "results.json").write_text(json.dumps(ev, indent=2))
    logger = MetricsLogger(out_dir, cfg=cfg)  # TensorBoard and W&B, as configured
    logger.log(0, results)
    logger.close()
    return results
