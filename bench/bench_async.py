"""Synchronous (max_staleness 0) vs one-step-off-policy (max_staleness 1) PPO, side by side.

    python bench/bench_async.py [--run-dir DIR] [--config F] [--set k=v ...]

Uses the SFT and reward-model checkpoints of DIR (trains them first when DIR has none), then runs the PPO
phase once per staleness setting from the same checkpoints and seed, evaluates each policy on the same
held-out prompts, and prints PPO throughput (sequences/s of the PPO loop), the ratio async/sync, and the
gold-judge win rate of each PPO policy over SFT. Figures only; no assertion on timing.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from pipeline.cluster import enable_token_auth, quiet_transformers


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", default="runs/bench-async")
    p.add_argument("--config")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args()
    enable_token_auth()
    quiet_transformers()
    from pipeline import workflow
    from pipeline.config import load_config
    from pipeline.evaluate import evaluate_policies
    from pipeline.run_dir import RunDir

    cfg = load_config(args.config, args.overrides)
    run = RunDir.create(cfg, args.run_dir)
    try:
        if not (run.checkpoint("sft") / "config.json").exists():
            workflow.sft(cfg, run)
        if not (run.checkpoint("rm") / "config.json").exists():
            workflow.rm(cfg, run)
        results = {}
        for staleness in (0, 1):
            c = load_config(args.config, [*args.overrides, f"ppo.max_staleness={staleness}"])
            sub = RunDir(run.path / f"staleness-{staleness}")
            t0 = time.perf_counter()
            summary = _ppo(workflow, c, run, sub)
            wall = time.perf_counter() - t0
            ev = evaluate_policies(c, str(run.checkpoint("sft")), str(run.checkpoint("rm")),
                                   str(sub.path / "ppo" / "checkpoint"), sub.path / "eval")
            results[staleness] = {"wall_s": wall, **summary, **ev}
    finally:
        workflow.shutdown()
    sync, asyn = results[0], results[1]
    print("\n=== PPO phase: max_staleness 0 vs 1 (same checkpoints, seed, steps) ===")
    print(f"{'':32s} {'sync (0)':>12s} {'async (1)':>12s}")
    for key in ("ppo/sequences_per_s", "timing/ppo_loop_s", "ppo/final_score_mean", "ppo/final_kl",
                "eval/ppo_reward", "eval/ppo_gold_win_vs_sft", "eval/ppo_gold_score", "eval/sft_gold_score"):
        if key in sync:
            print(f"{key:32s} {sync[key]:12.4f} {asyn[key]:12.4f}")
    ratio = asyn["ppo/sequences_per_s"] / sync["ppo/sequences_per_s"]
    print(f"throughput ratio async/sync: {ratio:.2f}x")
    (run.path / "bench_async.json").write_text(json.dumps({"ratio": ratio, "results": results}, indent=2))


def _ppo(workflow, cfg, run, sub) -> dict:
    from pipeline.driver import PPODriver

    workflow.connect(cfg)
    driver = PPODriver(cfg, sub.path / "ppo", run.checkpoint("sft"), run.checkpoint("rm"))
    try:
        return driver.run()
    finally:
        driver.close()


if __name__ == "__main__":
    main()
