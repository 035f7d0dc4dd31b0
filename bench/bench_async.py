"""Synchronous (max_staleness 0) vs one-step-off-policy (max_staleness 1) PPO, side by side.

    python bench/bench_async.py [--run-dir DIR] [--config F] [--set k=v ...] [--rounds N]

Uses the SFT and reward-model checkpoints of DIR (trains them first when DIR has none), then runs the PPO
phase per staleness setting from the same checkpoints and seed, in ABBA order over N rounds (sync, async,
async, sync, ...) so that a slow drift in the shared machine's speed weighs on both settings alike. It prints
PPO throughput (sequences/s of the PPO loops, pooled over rounds), the ratio async/sync, the median step time
of each, and the gold-judge win rate over SFT of each setting's policy (evaluated once: a repeat of a setting
trains the same policy, which the script checks). Figures only; no assertion on timing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
from pathlib import Path

from rayrlhf.core.process import enable_token_auth, quiet_transformers
from rayrlhf.core.metrics import read_metrics


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", default="runs/bench-async")
    p.add_argument("--config")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--rounds", type=int, default=2, help="sync/async pairs, run in ABBA order (default 2)")
    args = p.parse_args()
    if args.rounds < 1:
        p.error(f"--rounds must be at least 1, got {args.rounds}")
    enable_token_auth()
    quiet_transformers()
    from rayrlhf.pipeline import workflow
    from rayrlhf.core.config import load_config
    from rayrlhf.roles.evaluate import evaluate_policies
    from rayrlhf.pipeline.run_dir import RunDir

    cfg = load_config(args.config, args.overrides)
    run = RunDir.create(cfg, args.run_dir)
    try:
        if not (run.checkpoint("sft") / "config.json").exists():
            workflow.sft(cfg, run)
        if not (run.checkpoint("rm") / "config.json").exists():
            workflow.rm(cfg, run)
        runs = []  # (staleness, summary, policy checksum, step times)
        order = [(0, 1) if r % 2 == 0 else (1, 0) for r in range(args.rounds)]
        for r, staleness in ((r, st) for r, pair in enumerate(order) for st in pair):
            c = load_config(args.config, [*args.overrides, f"ppo.max_staleness={staleness}"])
            sub = RunDir(run.path / (f"staleness-{staleness}" + (f"-round{r}" if r > 0 else "")))
            summary = _ppo(workflow, c, run, sub)
            runs.append((staleness, summary, _checksum(sub.path / "ppo" / "checkpoint"), _step_times(sub)))
            if not any(s == staleness for s, *_ in runs[:-1]):  # first run of this setting: evaluate it
                summary.update(evaluate_policies(c, str(run.checkpoint("sft")), str(run.checkpoint("rm")),
                                                 str(sub.path / "ppo" / "checkpoint"), sub.path / "eval"))
    finally:
        workflow.shutdown()
    results = {}
    for staleness in (0, 1):
        mine = [(summ, ck, steps) for s, summ, ck, steps in runs if s == staleness]
        seqs = sum(summ["ppo/sequences_per_s"] * summ["timing/ppo_loop_s"] for summ, _, _ in mine)
        loop = sum(summ["timing/ppo_loop_s"] for summ, _, _ in mine)
        results[staleness] = {**mine[0][0], "ppo/sequences_per_s": seqs / loop, "timing/ppo_loop_s": loop / len(mine),
                              "timing/median_step_s": statistics.median(t for *_, steps in mine for t in steps),
                              "rounds_per_loop_s": [summ["timing/ppo_loop_s"] for summ, _, _ in mine],
                              "repeats_same_policy": len({ck for _, ck, _ in mine}) == 1}
    sync, asyn = results[0], results[1]
    print(f"\n=== PPO phase: max_staleness 0 vs 1 (same checkpoints, seed, steps; {args.rounds} rounds, ABBA) ===")
    print(f"{'':32s} {'sync (0)':>12s} {'async (1)':>12s}")
    for key in ("ppo/sequences_per_s", "timing/ppo_loop_s", "timing/median_step_s", "ppo/final_score_mean",
                "ppo/final_kl", "eval/ppo_reward", "eval/ppo_gold_win_vs_sft", "eval/ppo_gold_score",
                "eval/sft_gold_score"):
        if key in sync:
            print(f"{key:32s} {sync[key]:12.4f} {asyn[key]:12.4f}")
    for staleness, res in results.items():
        loops = ", ".join(f"{x:.1f}" for x in res["rounds_per_loop_s"])
        same = "the same policy" if res["repeats_same_policy"] else "DIFFERENT policies"
        print(f"max_staleness {staleness}: PPO loop seconds per round {loops}; repeats trained {same}")
    ratio = asyn["ppo/sequences_per_s"] / sync["ppo/sequences_per_s"]
    print(f"median step time ratio sync/async: {sync['timing/median_step_s'] / asyn['timing/median_step_s']:.2f}x")
    print(f"throughput ratio async/sync: {ratio:.2f}x")
    (run.path / "bench_async.json").write_text(json.dumps({"ratio": ratio, "results": results}, indent=2))


def _checksum(checkpoint: Path) -> str:
    """The policy's weights as saved (safetensors files), so repeats of a setting can be compared."""
    h = hashlib.sha256()
    for f in sorted(checkpoint.glob("*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()


def _step_times(sub) -> list[float]:
    return [row["timing/step_s"] for row in read_metrics(sub.path / "ppo" / "metrics.jsonl")]


def _ppo(workflow, cfg, run, sub) -> dict:
    from rayrlhf.pipeline.driver import PPODriver

    workflow.connect(cfg)
    driver = PPODriver(cfg, sub.path / "ppo", run.checkpoint("sft"), run.checkpoint("rm"))
    try:
        return driver.run()
    finally:
        driver.close()


if __name__ == "__main__":
    main()
