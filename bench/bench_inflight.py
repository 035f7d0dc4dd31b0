"""Synchronous, one-step-off and in-flight PPO on the same checkpoints and prompts, in one run.

    python bench/bench_inflight.py [--run-dir DIR] [--workload long_tail|uniform] [--steps N] [--set k=v ...]
                                   [--modes sync one-step-off in-flight in-flight-stream] [--json PATH]

The long-tailed workload is the builtin task's `data.synthetic_lengths: long_tail` variant (1 to 8 key facts per
post, so good summaries run from ~10 to ~80 tokens of the builtin tokenizer), with a 96-token response budget;
`uniform` is the default task (two facts, 24 tokens). SFT and reward model are trained once in DIR (or reused);
then each mode's PPO phase runs from them with the same seed and steps:

- sync: `ppo.max_staleness 0`, generation then learning;
- one-step-off: `ppo.max_staleness 1`, today's asynchronous PPO (a batch generated whole by one version, the
  driver waiting for its slowest sequence);
- in-flight: `ppo.max_staleness 1` and `rollout.inflight` (continuous batching, weight versions applied between
  decode steps, each prompt's samples scored as soon as they finish);
- in-flight-stream: the same with `rollout.inflight_batches stream` (a step trains the first shards scored,
  whichever batch dispatched them; stale tokens masked);
- in-flight-stream-s2: streamed with `ppo.max_staleness 2` (three batches in flight; not in the default modes).

Per mode: completions/s and trained (response) tokens/s of the PPO loop, the machine's CPU busy share during the
loop (1 - idle time / CPU time of all cores, from the first step to the last: a loop that keeps every core busy
cannot be sped up by scheduling, only by less work), the learner's idle share of the loop
(outside its updates), the rollout workers' idle share (outside generation), the share of trained tokens of each
age (versions between sampler and learner), of sequences sampled by two versions, of masked (stale) tokens and of
shards a step took from a later batch (streamed), and the gold judge's win rate
of the final policy over SFT on held-out posts with its 95 % bootstrap interval. Figures only; no assertion.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_async import _ppo  # noqa: E402  (one PPO phase on a run's checkpoints)
from result_file import add_json_option, describe_machine, write_result  # noqa: E402

from rayrlhf.core.metrics import read_metrics  # noqa: E402
from rayrlhf.core.process import enable_token_auth, quiet_transformers  # noqa: E402

MODES = {
    "sync": ["ppo.max_staleness=0"],
    "one-step-off": ["ppo.max_staleness=1"],
    "in-flight": ["ppo.max_staleness=1", "rollout.inflight=true"],
    "in-flight-stream": ["ppo.max_staleness=1", "rollout.inflight=true", "rollout.inflight_batches=stream"],
    # fully asynchronous as AReaL's staleness bound of 2: a third batch in flight for the stream to draw from
    "in-flight-stream-s2": ["ppo.max_staleness=2", "rollout.inflight=true", "rollout.inflight_batches=stream"],
}
WORKLOADS = {
    # sizes for a 2-core machine: SFT and RM in a few minutes, PPO a minute or two a mode
    "long_tail": ["data.synthetic_lengths=long_tail", "data.num_train_posts=4000", "data.num_train_pairs=3000",
                  "data.max_prompt_tokens=192", "data.max_summary_tokens=96", "rollout.max_new_tokens=96",
                  "sft.epochs=2", "rm.epochs=2", "eval.num_prompts=200"],
    "uniform": ["data.num_train_posts=4000", "data.num_train_pairs=3000", "sft.epochs=2", "rm.epochs=2",
                "eval.num_prompts=200"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run-dir", default="runs/bench-inflight")
    ap.add_argument("--workload", choices=sorted(WORKLOADS), default="long_tail")
    ap.add_argument("--steps", type=int, default=12, help="PPO steps of every mode (default 12)")
    ap.add_argument("--modes", nargs="+", choices=list(MODES), default=[m for m in MODES if m != "in-flight-stream-s2"])
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    add_json_option(ap)
    args = ap.parse_args()
    if args.steps < 2:
        ap.error(f"--steps must be at least 2, got {args.steps}")
    enable_token_auth()
    quiet_transformers()
    from rayrlhf.core.config import ConfigError, load_config
    from rayrlhf.pipeline import workflow
    from rayrlhf.pipeline.run_dir import RunDir
    from rayrlhf.roles.evaluate import evaluate_policies

    base = [*WORKLOADS[args.workload], f"ppo.steps={args.steps}", "ppo.checkpoint_every=0", *args.overrides]
    try:
        configs = {mode: load_config(None, [*base, *MODES[mode]]) for mode in args.modes}
    except ConfigError as e:
        ap.exit(2, f"bench_inflight: {e}\n")
    machine = describe_machine()
    cfg = next(iter(configs.values()))
    run = RunDir.create(cfg, args.run_dir)
    results = {}
    try:
        if not (run.checkpoint("sft") / "config.json").exists():
            workflow.sft(cfg, run)
        if not (run.checkpoint("rm") / "config.json").exists():
            workflow.rm(cfg, run)
        for mode, c in configs.items():
            sub = RunDir(run.path / mode)
            summary = _ppo_on_cpu(workflow, c, run, sub)
            summary.update(evaluate_policies(c, str(run.checkpoint("sft")), str(run.checkpoint("rm")),
                                             str(sub.path / "ppo" / "checkpoint"), sub.path / "eval"))
            results[mode] = {**summary, **_step_means(sub)}
    finally:
        workflow.shutdown()
    rows = [_row(mode, r, results.get("one-step-off")) for mode, r in results.items()]
    formats = {"completions/s": "{:.2f}", "trained tokens/s": "{:.1f}", "vs one-step-off": "{:.2f}x",
               "CPU busy": "{:.1%}", "learner idle": "{:.1%}", "rollout idle": "{:.1%}", "token age 0": "{:.1%}",
               "token age 1": "{:.1%}",
               "two versions": "{:.1%}", "stale (masked)": "{:.2%}", "later shards/step": "{:.2f}",
               "mean response tokens": "{:.1f}", "win rate vs SFT": "{:.3f}",
               "95 % interval": "{}"}
    print(f"\n=== {args.workload} workload, {args.steps} PPO steps per mode, same checkpoints and seed ({machine}) ===")
    for row in rows:
        print("  ".join(f"{k}={formats.get(k, '{}').format(v)}" for k, v in row.items()))
    (run.path / "bench_inflight.json").write_text(json.dumps(results, indent=2))
    if args.json:
        write_result(args.json, "bench_inflight", machine, rows, formats,
                     extra={"workload": args.workload, "steps": args.steps})


def _ppo_on_cpu(workflow, cfg, run, sub) -> dict:
    """One PPO phase (bench_async's `_ppo`), with the machine's CPU busy share from its first step to its end."""
    import psutil

    from rayrlhf.pipeline.driver import PPODriver

    marks = []
    run_step, finish = PPODriver.run_step, PPODriver.finish

    def first_step(self, *args):
        if not marks:
            marks.append(psutil.cpu_times())
        return run_step(self, *args)

    def finished(self, *args):
        marks.append(psutil.cpu_times())
        return finish(self, *args)

    PPODriver.run_step, PPODriver.finish = first_step, finished
    try:
        summary = _ppo(workflow, cfg, run, sub)
    finally:
        PPODriver.run_step, PPODriver.finish = run_step, finish
    # per field of cpu_times, summed over cores (guest time is inside user time already)
    spent = {f: b - a for f, a, b in zip(marks[0]._fields, *marks) if not f.startswith("guest")}
    return {**summary, "cpu/busy_fraction": 1 - (spent["idle"] + spent.get("iowait", 0.0)) / sum(spent.values())}


def _step_means(sub) -> dict[str, float]:
    """Per-step figures averaged over the run: token ages, sequences spanning versions, response length."""
    rows = read_metrics(sub.path / "ppo" / "metrics.jsonl")
    keys = ("rollout/token_age_0", "rollout/token_age_1", "rollout/multi_version_fraction", "rollout/response_length",
            "ppo/stale_token_fraction", "rollout/shards_from_later_batches")
    return {f"mean/{k}": statistics.fmean(r.get(k, 0.0) for r in rows) for k in keys}


def _row(mode: str, r: dict, base: dict | None) -> dict:
    win, lo, hi = (r.get(f"eval/ppo_gold_win_vs_sft{s}", float("nan")) for s in ("", "_ci_low", "_ci_high"))
    return {"mode": mode, "completions/s": r["ppo/sequences_per_s"], "trained tokens/s": r["ppo/tokens_per_s"],
            "vs one-step-off": r["ppo/sequences_per_s"] / base["ppo/sequences_per_s"] if base else float("nan"),
            "CPU busy": r["cpu/busy_fraction"], "learner idle": r["ppo/learner_idle_fraction"],
            "rollout idle": r["rollout/idle_fraction"],
            "token age 0": r["mean/rollout/token_age_0"], "token age 1": r["mean/rollout/token_age_1"],
            "two versions": r["mean/rollout/multi_version_fraction"],
            "stale (masked)": r["mean/ppo/stale_token_fraction"],
            "later shards/step": r["mean/rollout/shards_from_later_batches"],
            "mean response tokens": r["mean/rollout/response_length"],
            "win rate vs SFT": win, "95 % interval": f"[{lo:.3f}, {hi:.3f}] n={int(r.get('eval/ppo_gold_win_vs_sft_n', 0))}"}


if __name__ == "__main__":
    main()
