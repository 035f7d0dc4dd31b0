"""The real-model recipe's figures against its targets, from a finished run directory.

    python bench/peak_memory.py --json mem.json -- .venv/bin/rayrlhf train --config configs/smollm2-tldr.yaml
    python bench/recipe_targets.py RUN_DIR [--memory mem.json]

Prints each stage's wall time, then every target of the recipe (docs/recipe.md) with the
measured figure, its 95 % interval where there is one, and whether it is met: by the interval where there is one
(a lower bound above a ">=" goal), by the figure otherwise (ROUGE-L, memory, wall time). The comparisons are GPT-4-judged, not human: the reward model's and the
judge's accuracies are agreement with GPT-4. Exit 0 either way: this reports, it does not gate.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from rayrlhf.core.stats import accuracy_vs_chance


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
    rows: list[tuple] = []
    if args.memory:
        mem = json.loads(args.memory.read_text())
        rows += [("wall time, rayrlhf train to report", mem["wall_s"] / 60, "<=", 90.0, "min"),
                 ("peak memory (PSS, all processes)", mem["peak_pss_gib"], "<=", 16.0, "GiB")]
    sft, rm, judge = stages.get("sft", {}), stages.get("rm", {}), stages.get("judge", {})

    def accuracy(stage: dict, role: str) -> tuple[float, tuple[float, float] | None]:
        """The accuracy and its exact (Clopper-Pearson) interval over the held-out pairs."""
        acc, n = get(stage, f"{role}/valid_accuracy"), stage.get(f"{role}/valid_pairs")
        if n is None or math.isnan(acc):
            return acc, None
        test = accuracy_vs_chance(round(acc * n), int(n))
        return acc, (test.ci_low, test.ci_high)

    def interval(key: str) -> tuple[float, float] | None:
        return (m[f"{key}_ci_low"], m[f"{key}_ci_high"]) if f"{key}_ci_low" in m else None

    rm_acc, judge_acc = accuracy(rm, "rm"), accuracy(judge, "judge")
    rows = [(*row, None) for row in rows]
    rows += [
        ("SFT ROUGE-L, held-out validation posts (greedy)", get(sft, "sft/rougeL"), ">=", 0.20, "", None),
        ("reward model accuracy, held-out pairs (GPT-4 labels)", rm_acc[0], ">=", 0.65, "", rm_acc[1]),
        ("judge accuracy, its held-out pairs: better than chance", judge_acc[0], ">", 0.5, "", judge_acc[1]),
        ("training-RM score SFT -> PPO: rises", get(m, "eval/ppo_minus_sft_reward"), ">", 0.0, "",
         interval("eval/ppo_minus_sft_reward")),
        ("training-RM win rate PPO vs SFT (ties half)", get(m, "eval/ppo_reward_win_vs_sft"), ">", 0.5, "",
         interval("eval/ppo_reward_win_vs_sft")),
        ("KL to the SFT policy (nats per response)", get(m, "eval/ppo_kl"), "", nan, "", None),
        ("judge win rate PPO vs SFT (ties half)", get(m, "eval/ppo_judge_win_vs_sft"), ">=", 0.60, "",
         interval("eval/ppo_judge_win_vs_sft")),
        ("ROUGE-L PPO - SFT (sampled, test posts)", get(m, "eval/ppo_rougeL") - get(m, "eval/sft_rougeL"), ">=",
         -0.02, "", None),
    ]
    print(f"\n{'target':<56} {'measured':>10}  {'95 % interval':>16}  {'goal':>8}  met")
    for name, value, op, goal, unit, ci in rows:
        low, high = ci if ci is not None else (value, value)  # no interval: the figure itself decides
        met = "" if math.isnan(goal) else {"<=": high <= goal, ">=": low >= goal, ">": low > goal}[op]
        goal_text = "" if math.isnan(goal) else f"{op} {goal:g}"
        ci_text = f"[{low:.3f}, {high:.3f}]" if ci is not None else ""
        print(f"{name:<56} {value:>10.4g}  {ci_text:>16}  {goal_text:>8}  {'' if met == '' else ('yes' if met else 'NO')}"
              f" {unit}")
    print(f"\nlength beside the win rates: PPO {get(m, 'eval/ppo_length'):.1f} vs SFT {get(m, 'eval/sft_length'):.1f} "
          f"tokens; training-RM win rate PPO vs SFT {get(m, 'eval/ppo_reward_win_vs_sft'):.3f}")


if __name__ == "__main__":
    main()
