"""Reward-model training with each comparison's shared start run once, measured: pairs/s of forward + backward of
the pairwise loss (LoRA r=16 on every projection, scalar head) on a random-initialised model of SmolLM2-135M's
config, fp32, on this machine's CPU threads, over comparisons shaped like the recipe's (a post cut to <= 160
tokens, two summaries of up to 53 each), in micro batches of `--micro` pairs of similar lengths:

1. `whole`: both sides padded and run whole in one forward (rayrlhf before `rm.share_prefix`);
2. `shared prefix`: the post once, both summaries on its cached keys and values (`pairs.pair_scores`).

Both compute the same scores and gradients (tests/test_sequences.py); only the time differs.

    python bench/bench_rm_prefix.py [--pairs 32 --micro 8 --repeats 2] [--json PATH]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from result_file import add_json_option, describe_machine, write_result  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=32)
    ap.add_argument("--micro", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    add_json_option(ap)
    args = ap.parse_args()
    machine = describe_machine()
    from transformers import LlamaForSequenceClassification

    from rayrlhf.roles.rm import pairwise_loss
    from bench_sharded_memory import smollm2_config
    from rayrlhf.core.config import LoraConfig
    from rayrlhf.core.modeling import apply_lora
    from rayrlhf.core.forward import sequence_scores
    from rayrlhf.core.padding import pad_right
    from rayrlhf.core.pairs import pair_scores
    from rayrlhf.core.plan import length_grouped

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = smollm2_config()
    config.num_labels, config.pad_token_id = 1, 0
    model = apply_lora(LlamaForSequenceClassification(config), LoraConfig(r=16, alpha=32, target_modules="all-linear"),
                       "SEQ_CLS").train()
    rng = random.Random(0)
    words = lambda n: [rng.randrange(1, 49152) for _ in range(n)]  # noqa: E731
    posts = [words(rng.randint(60, 160)) for _ in range(args.pairs)]
    chosen = [p + words(rng.randint(15, 53)) for p in posts]
    rejected = [p + words(rng.randint(15, 53)) for p in posts]
    groups = length_grouped([max(len(c), len(r)) for c, r in zip(chosen, rejected)], args.micro)
    real = sum(len(c) + len(r) for c, r in zip(chosen, rejected))

    def step(shared: bool) -> float:
        t0 = time.perf_counter()
        for g in groups:
            c, r = [chosen[i] for i in g], [rejected[i] for i in g]
            if shared:
                rc, rr = pair_scores(model, c, r, 0)
            else:
                ids, mask = pad_right(c + r, 0)
                scores = sequence_scores(model, ids, mask)
                rc, rr = scores[: len(g)], scores[len(g):]
            (pairwise_loss(rc, rr) * len(g) / args.pairs).backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    step(True)  # warm-up
    print(f"{args.pairs} comparisons, {real} tokens on their two sides (posts {min(map(len, posts))}-"
          f"{max(map(len, posts))} tokens), micro batches of {args.micro} pairs, LoRA r=16, fp32, {args.threads} "
          f"threads; best of {args.repeats}")
    base = None
    rows = []
    for name, shared in (("whole", False), ("shared prefix", True)):
        s = min(step(shared) for _ in range(args.repeats))
        base = base or s
        print(f"  {name:>13}: {args.pairs / s:5.2f} pairs/s, {base / s:.2f}x whole")
        rows.append({"pairs run": name, "pairs/s": args.pairs / s, "vs whole": base / s})
    if args.json:
        write_result(args.json, "bench_rm_prefix", machine, rows, {"pairs/s": "{:.2f}", "vs whole": "{:.2f}×"})


if __name__ == "__main__":
    main()
