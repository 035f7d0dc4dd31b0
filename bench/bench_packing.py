"""How a learner's minibatch is cut into micro batches, measured: tokens/s of forward + backward (SFT loss on the
response tokens, LoRA r=16 on every projection) on a random-initialised model of SmolLM2-135M's config, fp32, on
this machine's CPU threads. One minibatch of sequences whose lengths are drawn like the recipe's (prompts cut at a
newline to <= 160 tokens, responses of up to 53), cut four ways:

1. `unsorted`: micro batches of `--micro` sequences in arrival order, padded to their longest (rayrlhf before);
2. `length-grouped`: the same count, longest first (`plan.length_grouped`: rayrlhf's default);
3. `packed B`: token budgets of B real tokens, one row per micro batch, positions restarting per sequence and
   attention kept within it (`plan.token_budget_groups` + `pack`).

Every cut computes the same update (tests/test_learner.py, test_sequences.py); only the time differs. Real
tokens / s counts the sequences' own tokens, never padding, so the figures compare directly.

    python bench/bench_packing.py [--sequences 32 --micro 8 --budgets 512 1024 --repeats 2] [--json PATH]
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
    ap.add_argument("--sequences", type=int, default=32)
    ap.add_argument("--micro", type=int, default=8)
    ap.add_argument("--budgets", type=int, nargs="+", default=[512, 1024])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    add_json_option(ap)
    args = ap.parse_args()
    machine = describe_machine()
    from transformers import LlamaForCausalLM

    from bench_sharded_memory import smollm2_config
    from rayrlhf.core.config import LoraConfig
    from rayrlhf.core.modeling import apply_lora
    from rayrlhf.core.forward import response_logits
    from rayrlhf.core.padding import pad_left, pad_right
    from rayrlhf.core.plan import length_grouped, token_budget_groups

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = apply_lora(LlamaForCausalLM(smollm2_config()), LoraConfig(r=16, alpha=32, target_modules="all-linear"),
                       "CAUSAL_LM").train()
    rng = random.Random(0)
    prompts = [[rng.randrange(1, 49152) for _ in range(rng.randint(60, 160))] for _ in range(args.sequences)]
    responses = [[rng.randrange(1, 49152) for _ in range(rng.randint(15, 53))] for _ in range(args.sequences)]
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    real = sum(lengths)

    def step(groups: list[list[int]], packed: bool) -> float:
        t0 = time.perf_counter()
        for g in groups:
            p, pm = pad_left([prompts[i] for i in g], 0)
            r, rm = pad_right([responses[i] for i in g], 0)
            logits = response_logits(model, torch.cat([p, r], 1), torch.cat([pm, rm], 1), r.shape[1], packed)
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), r.masked_fill(rm == 0, -100)
                                                     .reshape(-1), ignore_index=-100, reduction="sum")
            (loss / real).backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    order = list(range(args.sequences))
    cuts = {"unsorted": ([order[m : m + args.micro] for m in range(0, len(order), args.micro)], False),
            "length-grouped": (length_grouped(lengths, args.micro), False)}
    for b in args.budgets:
        cuts[f"packed {b}"] = (token_budget_groups(lengths, b), True)
    step(cuts["unsorted"][0][:1], False)  # warm-up
    print(f"{args.sequences} sequences, {real} real tokens (lengths {min(lengths)}-{max(lengths)}), LoRA r=16, "
          f"fp32, {args.threads} threads; best of {args.repeats}")
    base = None
    rows = []
    for name, (groups, packed) in cuts.items():
        padded = sum(len(g) * max(lengths[i] for i in g) for g in groups) if not packed else real
        s = min(step(groups, packed) for _ in range(args.repeats))
        base = base or s
        print(f"  {name:>15}: {len(groups):2d} micro batches, {padded:5d} tokens computed, {real / s:6.1f} real "
              f"tokens/s, {base / s:.2f}x unsorted")
        rows.append({"cut": name, "micro batches": len(groups), "tokens computed": padded,
                     "real tokens/s": real / s, "vs unsorted": base / s})
    if args.json:
        write_result(args.json, "bench_packing", machine, rows, {"real tokens/s": "{:.1f}", "vs unsorted": "{:.2f}×"})


if __name__ == "__main__":
    main()
