"""TRL's side of bench/bench_trl.py: `RLOOTrainer` on rayrlhf's SFT and reward-model checkpoints, timed.

Runs in TRL's own virtual environment (TRL pins a newer transformers than rayrlhf), so it imports nothing from
rayrlhf: the checkpoints are plain Hugging Face folders and the prompts come as text in a JSON file, already cut
to the token budget by the caller. Prints one JSON line: completions/s and trained (completion) tokens/s over the
steps after the first (the first includes start-up), and the per-step seconds. `--lora-r` trains peft adapters
(`peft_config`), as TRL's users train LoRA.

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
    p.add_argument("--lora-r", type=int, default=0, help="train LoRA adapters of this rank (peft), 0: all weights")
    p.add_argument("--lora-alpha", type=int, default=16)
    p.add_argument("--lora-targets", default="all-linear", help="comma-separated module names, or all-linear")
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
        peft_config = None
        if args.lora_r:
            from peft import LoraConfig

            targets = args.lora_targets if args.lora_targets == "all-linear" else args.lora_targets.split(",")
            peft_config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0,
                                     target_modules=targets, task_type="CAUSAL_LM")
        trainer = RLOOTrainer(model=policy, reward_funcs=reward, args=cfg, peft_config=peft_config,
                              train_dataset=Dataset.from_list([{"prompt": q} for q in prompts]),
                              processing_class=tok, reward_processing_classes=tok, callbacks=[Clock()])
        start = time.perf_counter()
        trainer.train()
    steps = [b - a for a, b in zip([start, *stamps], stamps)]
    timed = stamps[-1] - stamps[0]
    # the completion tokens each update trained on: its mean completion length x its completions
    lengths = [row["completions/mean_length"] for row in trainer.state.log_history if "completions/mean_length" in row]
    batch = args.prompts_per_step * args.k
    result = {"trl": trl.__version__, "steps": len(stamps), "step_s": steps,
              "completions_per_s": (len(stamps) - 1) * batch / timed,
              "trained_tokens_per_s": sum(lengths[1:]) * batch / timed if len(lengths) == len(stamps) else None,
              "lora_r": args.lora_r, "threads": args.threads}
    json.dump(result, open(args.out, "w"))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
