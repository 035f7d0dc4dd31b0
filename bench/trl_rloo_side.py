"""TRL's side of bench/bench_trl.py: `RLOOTrainer` on rayrlhf's SFT and reward-model checkpoints, timed.

Runs in TRL's own virtual environment (TRL pins a newer transformers than rayrlhf), so it imports nothing from
rayrlhf: the checkpoints are plain Hugging Face folders and the prompts come as text in a JSON file, already cut
to the token budget by the caller. Prints one JSON line: completions/s over the steps after the first (the first
includes start-up), and the per-step seconds.

    <trl-venv>/bin/python bench/trl_rloo_side.py --sft S --rm R --prompts P.json --out O.json [...]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser()
    for name in ("--sft", "--rm", "--prompts", "--out"):
        p.add_argument(name, required=True)
    p.add_argument("--prompts-per-step", type=int, default=32)
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--beta", type=float, default=0.05)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl import RLOOConfig, RLOOTrainer

    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(args.sft, padding_side="left")
    policy = AutoModelForCausalLM.from_pretrained(args.sft)
    reward = AutoModelForSequenceClassification.from_pretrained(args.rm, num_labels=1)
    reward.config.pad_token_id = tok.pad_token_id
    prompts = json.load(open(args.prompts))
    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *_, **__):
            stamps.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out:
        cfg = RLOOConfig(
            output_dir=out, per_device_train_batch_size=args.prompts_per_step * args.k, num_generations=args.k,
            max_completion_length=args.max_new_tokens, temperature=args.temperature, top_p=1.0, top_k=0,
            beta=args.beta, learning_rate=args.lr, num_iterations=1, max_steps=args.steps, logging_steps=1,
            report_to=[], save_strategy="no", use_cpu=True, bf16=False, fp16=False, seed=0,
            dataloader_num_workers=0, disable_dropout=True,
        )
        trainer = RLOOTrainer(model=policy, reward_funcs=reward, args=cfg,
                              train_dataset=Dataset.from_list([{"prompt": q} for q in prompts]),
                              processing_class=tok, reward_processing_classes=tok, callbacks=[Clock()])
        start = time.perf_counter()
        trainer.train()
    steps = [b - a for a, b in zip([start, *stamps], stamps)]
    timed = stamps[-1] - stamps[0]
    result = {"trl": trl.__version__, "steps": len(stamps), "step_s": steps,
              "completions_per_s": (len(stamps) - 1) * args.prompts_per_step * args.k / timed,
              "threads": args.threads}
    json.dump(result, open(args.out, "w"))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
