"""The real-model recipe's figures against its targets, from a finished run directory.

    python bench/peak_memory.py --json mem.json -- .venv/bin/rayrlhf train --config configs/smollm2-tldr.yaml
    python bench/recipe_targets.py RUN_DIR [--memory mem.json]

Prints each stage's wall time, then every target of the recipe (docs/recipe.md) with the
measured figure and whether it is met. The comparisons are GPT-4-judged, not human: the reward model's and the
judge's accuracies are agreement with GPT-4. Exit 0 either way: this reports, it does not gate.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def _stage_seconds(run: Path) -> dict[str, float]:
    """Wall seconds per stage, from the stages' own timing metrics (PPO: set-up plus loop)."""
    stages = json.loads((run / "stages.json").read_text())
    out = {}
    for stage, keys in (("sft", ("timing/sft_s",)), ("rm", ("timing/rm_s",)), ("judge", ("timing/judge_s",)),
                        ("ppo", ("timing/ppo_setup_s", "timing/ppo_loop_s"))):
        if all(k in stages.get(stage, {}) for k in keys):
            out[stage] = sum(stages[stage][k] for k in keys)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="a finished run directory of configs/smollm2-tldr.yaml")
    p.add_argument("--memory", type=Path, help="the JSON bench/peak_memory.py --json wrote for the run")
    args = p.parse_args()
    stages = json.loads((args.run / "stages.json").read_text())
    m = json.loads((args.run / "eval" / "results.json").read_text())["metrics"]
    nan = float("nan")
    get = lambda d, k: d.get(k, nan)  # noqa: E731

    print(f"run: {args.run}")
    for stage, seconds in _stage_seconds(args.run).items():
        print(f"  {stage:>5}: {seconds / 60:6.1f} min")
    rows = []
    if args.memory:
        mem = json.loads(args.memory.read_text())
        rows += [("wall time, rayrlhf train to report", mem["wall_s"] / 60, "<=", 90.0, "min"),
                 ("peak memory (PSS, all processes)", mem["peak_pss_gib"], "<=", 16.0, "GiB")]
    sft, rm, judge = stages.get("sft", {}), stages.get("rm", {}), stages.get("judge", {})
    rows += [
        ("SFT ROUGE-L, held-out validation posts (greedy)", get(sft, "sft/rougeL"), ">=", 0.20, ""),
        ("reward model accuracy, held-out pairs (GPT-4 labels)", get(rm, "rm/valid_accuracy"), ">=", 0.65, ""),
        ("judge accuracy, its held-out pairs (GPT-4 labels)", get(judge, "judge/valid_accuracy"), "", nan, ""),
        ("training-RM score SFT -> PPO: rises", get(m, "eval/ppo_reward") - get(m, "eval/sft_reward"), ">", 0.0, ""),
        ("KL to the SFT policy (nats per response)", get(m, "eval/ppo_kl"), "", nan, ""),
        ("judge win rate PPO vs SFT (ties half)", get(m, "eval/ppo_judge_win_vs_sft"), ">=", 0.60, ""),
        ("ROUGE-L PPO - SFT (sampled, test posts)", get(m, "eval/ppo_rougeL") - get(m, "eval/sft_rougeL"), ">=",
         -0.02, ""),
    ]
    print(f"\n{'target':<56} {'measured':>10}  {'goal':>8}  met")
    for name, value, op, goal, unit in rows:
        met = "" if math.isnan(goal) else {"<=": value <= goal, ">=": value >= goal, ">": value > goal}[op]
        goal_text = "" if math.isnan(goal) else f"{op} {goal:g}"
        print(f"{name:<56} {value:>10.4g}  {goal_text:>8}  {'' if met == '' else ('yes' if met else 'NO')} {unit}")
    print(f"\nlength beside the win rates: PPO {get(m, 'eval/ppo_length'):.1f} vs SFT {get(m, 'eval/sft_length'):.1f} "
          f"tokens; training-RM win rate PPO vs SFT {get(m, 'eval/ppo_reward_win_vs_sft'):.3f}")


if __name__ == "__main__":
    main()
