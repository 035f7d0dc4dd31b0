"""Held-out evaluation of the SFT and PPO policies of a run.

For each policy: responses sampled at the rollout temperature with the rollout's backend (seeded, so both
policies see the same prompts and RNG stream), the learned reward (with the EOS trick, as in training), the KL to the reference
policy (sum over response tokens of log pi - log pi_ref on the policy's own samples), ROUGE against the
references and the mean response length. With a judge (a reward model trained on comparisons disjoint from
the training reward model's), its score and its win rate of PPO over SFT, scored like the reward (EOS trick
included): a policy that exploits the training reward model without writing better summaries shows there.
On the synthetic task the gold judge gives the win rate of PPO over SFT and of each policy over the human
references. Ties count half in every win rate.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from actors.reward import RewardScorer
from core.config import Config
from core.data import SummaryExample, load_tldr
from core.metrics import MetricsLogger
from core.modeling import load_frozen
from core.sequences import pad_left, response_logprobs, sample
from core.synthetic import judge
from core.text import encode_queries, rouge, with_encodable_queries
from core.training import seed_everything

log = logging.getLogger(__name__)


@dataclass
class PolicySamples:
    texts: list[str]
    lengths: list[int]
    scores: list[float]
    kl: list[float]
    judge_scores: list[float]


class HFSampler:
    """Samples a checkpoint with `core.sequences.sample`; log-probs recomputed by the same model."""

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def load(self, checkpoint: str) -> None:
        self.model, self.tok = load_frozen(checkpoint, "causal_lm", self.cfg.model.dtype, device="cpu")

    def generate(self, prompts: torch.Tensor, pmask: torch.Tensor, seed: int) -> tuple[torch.Tensor, ...]:
        rc, tok = self.cfg.rollout, self.tok
        torch.manual_seed(seed)
        responses, rmask = sample(self.model, prompts, pmask, max_new_tokens=rc.max_new_tokens,
                                  eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, temperature=rc.temperature,
                                  top_p=rc.top_p)
        logp, _ = response_logprobs(self.model, prompts, pmask, responses, rmask, rc.temperature)
        return responses, rmask, logp


class VLLMSampler:
    """Samples with one vLLM engine (started on the SFT checkpoint; later policies' weights swapped in), as the
    rollout does: on the real model it generates several times faster than `sample`, and its behaviour
    log-probs are the policy's (the learner checks them against its own every update)."""

    def __init__(self, cfg: Config, first_checkpoint: str):
        from actors.vllm_backend import VLLMBackend

        self.backend, self.loaded = VLLMBackend(first_checkpoint, cfg.rollout, cfg.model.dtype), first_checkpoint
        self.dtype = cfg.model.dtype

    def load(self, checkpoint: str) -> None:
        from actors.vllm_backend import read_checkpoint_weights

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
    out = PolicySamples([], [], [], [], [])
    bs = cfg.eval.batch_size
    for i in range(0, len(queries), bs):
        prompts, pmask = pad_left(queries[i : i + bs], tok.pad_token_id)
        responses, rmask, logp = sampler.generate(prompts, pmask, seed + i)
        ref_logp, _ = response_logprobs(reference, prompts, pmask, responses, rmask, cfg.rollout.temperature)
        out.scores += scorer.score_tokens(prompts, pmask, responses, rmask).scores.tolist()
        if judge_rm is not None:
            out.judge_scores += judge_rm.score_tokens(prompts, pmask, responses, rmask).scores.tolist()
        out.kl += ((logp - ref_logp) * rmask).sum(-1).tolist()
        out.lengths += rmask.sum(-1).tolist()
        out.texts += tok.batch_decode(responses.masked_fill(rmask == 0, tok.pad_token_id), skip_special_tokens=True)
    return out


def win_rate(a: list[float], b: list[float]) -> float:
    """Share of prompts where a beats b; ties count half."""
    return float(np.mean([1.0 if x > y + 1e-9 else 0.5 if abs(x - y) <= 1e-9 else 0.0 for x, y in zip(a, b)]))


def summarise(name: str, s: PolicySamples, examples: list[SummaryExample]) -> dict[str, float]:
    out = {f"eval/{name}_reward": float(np.mean(s.scores)), f"eval/{name}_kl": float(np.mean(s.kl)),
           f"eval/{name}_length": float(np.mean(s.lengths))}
    if s.judge_scores:
        out[f"eval/{name}_judge_score"] = float(np.mean(s.judge_scores))
    out.update({f"eval/{name}_{k}": v for k, v in rouge(s.texts, [e.reference for e in examples]).items()})
    return out


def evaluate_policies(cfg: Config, sft_checkpoint: str, rm_checkpoint: str, ppo_checkpoint: str | None,
                      out_dir: Path, judge_checkpoint: str | None = None) -> dict[str, float]:
    seed_everything(cfg.run.seed)
    reference, tok = load_frozen(sft_checkpoint, "causal_lm", cfg.model.dtype, device="cpu")
    examples = with_encodable_queries(tok, load_tldr(cfg.data), cfg.data).sft_test[: cfg.eval.num_prompts]
    queries = encode_queries(tok, [e.query for e in examples], cfg.data.max_prompt_tokens)
    scorer = RewardScorer(rm_checkpoint, cfg.reward.missing_eos_score, cfg.reward.batch_size, cfg.model.dtype)
    # the judge reward model (not core.synthetic.judge, the gold judge of the builtin task)
    judge_rm = None if judge_checkpoint is None else RewardScorer(judge_checkpoint, cfg.reward.missing_eos_score,
                                                                  cfg.reward.batch_size, cfg.model.dtype)
    seed = cfg.run.seed + 777
    sampler = VLLMSampler(cfg, sft_checkpoint) if cfg.rollout.backend == "vllm" else HFSampler(cfg)
    policies = {"sft": sample_policy(cfg, sft_checkpoint, sampler, reference, scorer, queries, seed, judge_rm)}
    if ppo_checkpoint:
        policies["ppo"] = sample_policy(cfg, ppo_checkpoint, sampler, reference, scorer, queries, seed, judge_rm)
    results: dict[str, float] = {"eval/num_prompts": float(len(examples))}
    for name, s in policies.items():
        results.update(summarise(name, s, examples))
    if "ppo" in policies:
        results["eval/ppo_reward_win_vs_sft"] = win_rate(policies["ppo"].scores, policies["sft"].scores)
        if judge_rm is not None:
            results["eval/ppo_judge_win_vs_sft"] = win_rate(policies["ppo"].judge_scores, policies["sft"].judge_scores)
    gold = examples[0].post is not None
    if gold:
        ref_gold = [judge(e.post, e.reference).score for e in examples]
        golds = {name: [judge(e.post, t).score for e, t in zip(examples, s.texts)] for name, s in policies.items()}
        results["eval/reference_gold_score"] = float(np.mean(ref_gold))
        for name, g in golds.items():
            results[f"eval/{name}_gold_score"] = float(np.mean(g))
            results[f"eval/{name}_gold_win_vs_reference"] = win_rate(g, ref_gold)
        if "ppo" in golds:
            results["eval/ppo_gold_win_vs_sft"] = win_rate(golds["ppo"], golds["sft"])
    samples = []
    for i, e in enumerate(examples[: max(cfg.eval.num_samples_shown, 0)]):
        row = {"query": e.query, "reference": e.reference.strip()}
        for name, s in policies.items():
            row[name] = s.texts[i].strip()
            row[f"{name}_reward"] = s.scores[i]
            if s.judge_scores:
                row[f"{name}_judge"] = s.judge_scores[i]
            if gold:
                row[f"{name}_gold"] = judge(e.post, s.texts[i]).score
        samples.append(row)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps({"metrics": results, "samples": samples}, indent=2))
    logger = MetricsLogger(out_dir, cfg=cfg)  # TensorBoard and W&B, as configured
    logger.log(0, results)
    logger.close()
    return results
