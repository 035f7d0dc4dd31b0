"""rayrlhf against TRL's `RLOOTrainer`, side by side in one run: completions/s of the RL phase on the same SFT and
reward-model checkpoints, the same prompts cut the same way, batch, k, response length, KL coefficient and
estimator (RLOO), one update per batch. Both sides are timed alike: completions/s over the steps after the
first, whose time includes start-up on either side.

    python bench/bench_trl.py --run-dir RUN --trl-python /path/to/trl-venv/bin/python [--steps 10] [--set k=v ...]
        [--config FILE] [--sides NAME ...] [--runs N] [--json PATH]

The real model with LoRA (item 5 of the LoRA issue): the recipe's run directory and config, its prompts, lengths
and LoRA (TRL gets the same rank, alpha and targets through `peft_config`), rayrlhf's vLLM rollout with
adapter-only sync (on CPU merged by each worker into its base, `rollout.vllm_adapters`), synchronous and one step
off, two runs:

    python bench/bench_trl.py --run-dir RECIPE_RUN --config configs/smollm2-tldr.yaml --trl-python ... \
        --prompts-per-step 16 --max-new-tokens 53 --steps 4 --runs 2 --set rollout.lora_sync=adapters \
        --sides "rayrlhf rloo sync" "trl rloo" "rayrlhf rloo async"

Besides completions/s, trained tokens/s: the completion tokens the updates after the first trained on, per second
(each side's mean completion length x its completions, over the same clock).

RUN: a run directory whose `sft` and `rm` stages finished (`rayrlhf train` on the default config makes one). TRL
runs in its own virtual environment (it pins a newer transformers than rayrlhf's):

    python -m venv trl-venv && trl-venv/bin/pip install torch==2.13.0 'trl==1.16.*'

Order: rayrlhf synchronous, TRL, rayrlhf synchronous with every role on its num_cpus threads only (as before
`ppo.use_idle_cores`), rayrlhf one step off policy, rayrlhf GAE (the default estimator, with a critic:
TRL has no PPO with a critic, so it is compared with TRL's RLOO and said so) one step off policy and synchronous. Both sides get the machine's cores
(TRL: torch threads = cores, with rayrlhf's Ray cluster shut down meanwhile; rayrlhf: its roles as configured,
`ppo.use_idle_cores` on). Figures only: the
machine is shared, so the ratios are of one run and the script says what the load was.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from rayrlhf.core.process import enable_token_auth, quiet_transformers  # noqa: E402
from result_file import add_json_option, describe_machine, write_result  # noqa: E402


# The sides, in their default order: config overrides of a rayrlhf run, or None for TRL.
SIDES = {"rayrlhf rloo sync": ["ppo.max_staleness=0"], "trl rloo": None,
         "rayrlhf rloo sync, num_cpus threads": ["ppo.max_staleness=0", "ppo.use_idle_cores=false"],
         "rayrlhf rloo async": ["ppo.max_staleness=1"],
         "rayrlhf gae async": ["ppo.max_staleness=1", "ppo.advantage_estimator=gae"],
         "rayrlhf gae sync": ["ppo.max_staleness=0", "ppo.advantage_estimator=gae"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", required=True)
    p.add_argument("--trl-python", required=True, help="python of a virtual environment with trl installed")
    p.add_argument("--steps", type=int, default=10, help="updates per side (at least 2: the first is not timed)")
    p.add_argument("--prompts-per-step", type=int, default=32)
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--config", default=None, help="rayrlhf config file (default: the embedded default)")
    p.add_argument("--sides", nargs="+", default=list(SIDES), choices=list(SIDES), metavar="SIDE",
                   help=f"which sides run, in this order (default: all: {', '.join(SIDES)})")
    p.add_argument("--runs", type=int, default=1, help="run the sides this many times, one after the other")
    add_json_option(p)
    args = p.parse_args()
    run_path = Path(args.run_dir)
    for stage in ("sft", "rm"):
        if not (run_path / stage / "checkpoint" / "config.json").is_file():
            p.error(f"--run-dir {run_path}: no finished {stage} stage ({stage}/checkpoint); run `rayrlhf train` first")
    if args.runs < 1:
        p.error(f"--runs must be at least 1, got {args.runs}")
    if args.steps < 2:
        p.error(f"--steps must be at least 2 (the first step is not timed), got {args.steps}")
    if not Path(args.trl_python).is_file():
        p.error(f"--trl-python {args.trl_python}: no such file")
    enable_token_auth()
    quiet_transformers()
    from bench_async import _ppo
    from rayrlhf.core.config import load_config
    from rayrlhf.core.data import load_tldr
    from rayrlhf.core.modeling import load_tokenizer
    from rayrlhf.core.text import encode_queries, with_encodable_queries
    from rayrlhf.pipeline import workflow
    from rayrlhf.pipeline.run_dir import RunDir

    run = RunDir(run_path)
    common = [*args.overrides, "ppo.advantage_estimator=rloo", f"ppo.prompts_per_step={args.prompts_per_step}",
              f"ppo.samples_per_prompt={args.k}", f"rollout.max_new_tokens={args.max_new_tokens}",
              "ppo.ppo_epochs=1", f"ppo.minibatch_size={args.prompts_per_step * args.k}", f"ppo.steps={args.steps}",
              "ppo.checkpoint_every=0"]
    cfg = load_config(args.config, common)
    # The prompts rayrlhf's PPO phase samples from, cut to data.max_prompt_tokens, given to TRL as text.
    tok = load_tokenizer(str(run.checkpoint("sft")))
    data = with_encodable_queries(tok, load_tldr(cfg.data), cfg.data)
    prompts = [tok.decode(q) for q in encode_queries(tok, [e.query for e in data.sft_train], cfg.data.max_prompt_tokens)]
    cores = len(os.sched_getaffinity(0))
    load_before = os.getloadavg()[0]
    machine = describe_machine()

    lora = cfg.model.lora
    rows = []
    try:
        for run_no in range(1, args.runs + 1):
            results: dict[str, tuple[float, float | None]] = {}
            for name in args.sides:
                extra = SIDES[name]
                if extra is None:
                    workflow.shutdown()  # TRL runs alone: the idle Ray cluster's processes take nothing from its threads
                    results[name] = _trl(args, run, prompts, cfg, cores)
                    continue
                c = load_config(args.config, [*common, *extra])
                sub = RunDir(run.path / "bench-trl" / f"{name.replace(' ', '-').replace(',', '')}-run{run_no}")
                summary = _ppo(workflow, c, run, sub)
                results[name] = _after_first_step(sub.path / "ppo" / "metrics.jsonl", c.ppo.rollout_batch_size)
                print(f"{name}: {results[name][0]:.3g} completions/s after the first step "
                      f"({summary['ppo/sequences_per_s']:.3g} over the whole loop)"
                      + (f"; LoRA sync {'adapters only' if c.sync_adapters else 'merged'}" if lora else ""))
            rows += [{"run": run_no, "side": name, "completions/s": cps, "trained tokens/s": tps,
                      "vs TRL": cps / results["trl rloo"][0] if "trl rloo" in results else None}
                     for name, (cps, tps) in results.items()]
    finally:
        workflow.shutdown()
    print(f"\n=== RL phase, {args.steps} updates of {args.prompts_per_step} prompts x {args.k}, {args.max_new_tokens} new "
          f"tokens, one update per batch, {cfg.model.name_or_path}"
          + (f", LoRA r={lora.r}" if lora else "") + f"; {cores} cores, load average {load_before:.2f} before ===")
    for r in rows:
        vs = f"{r['vs TRL']:5.2f}x TRL" if r["vs TRL"] else ""
        tps = f"{r['trained tokens/s']:8.1f}" if r["trained tokens/s"] is not None else "       -"
        print(f"run {r['run']} {r['side']:36s} {r['completions/s']:8.3g} completions/s {tps} trained tokens/s  {vs}")
    if "rayrlhf gae sync" in args.sides:
        print("(GAE trains a critic beside the policy; TRL has no PPO with a critic, so it is set against TRL's RLOO)")
    (run.path / "bench-trl" / "results.json").write_text(json.dumps(rows, indent=2))
    if args.json:
        write_result(args.json, "bench_trl", machine, rows,
                     {"completions/s": "{:.3g}", "trained tokens/s": "{:.1f}", "vs TRL": "{:.2f}×"})


def _after_first_step(metrics: Path, batch: int) -> tuple[float, float]:
    """Completions/s and trained (response) tokens/s over the steps after the first, from the steps' wall-clock
    stamps: counted as the TRL side counts its own (its first step includes start-up; rayrlhf's waits for the
    first batch and the peak probes)."""
    from rayrlhf.core.metrics import read_metrics

    rows = read_metrics(metrics)
    seconds = rows[-1]["time"] - rows[0]["time"]
    tokens = sum(row["rollout/response_length"] for row in rows[1:]) * batch  # mean length x completions
    return (len(rows) - 1) * batch / seconds, tokens / seconds


def _trl(args, run, prompts: list[str], cfg, cores: int) -> tuple[float, float | None]:
    side = Path(__file__).resolve().parent / "trl_rloo_side.py"
    with tempfile.TemporaryDirectory() as tmp:
        prompt_file, out = Path(tmp) / "prompts.json", Path(tmp) / "out.json"
        prompt_file.write_text(json.dumps(prompts))
        cmd = [args.trl_python, str(side), "--sft", str(run.checkpoint("sft")), "--rm", str(run.checkpoint("rm")),
               "--prompts", str(prompt_file), "--out", str(out), "--prompts-per-step", str(args.prompts_per_step),
               "--k", str(args.k), "--max-new-tokens", str(args.max_new_tokens), "--steps", str(args.steps),
               "--lr", str(cfg.ppo.lr), "--beta", str(cfg.ppo.kl_coef), "--temperature", str(cfg.rollout.temperature),
               "--threads", str(cores)]
        if cfg.model.lora is not None:  # the same adapters as rayrlhf's policy
            targets = cfg.model.lora.target_modules
            cmd += ["--lora-r", str(cfg.model.lora.r), "--lora-alpha", str(cfg.model.lora.alpha),
                    "--lora-targets", targets if isinstance(targets, str) else ",".join(targets)]
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        proc = subprocess.run(cmd, env={**env, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"TRL side failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        result = json.loads(out.read_text())
    print(f"trl rloo ({result['trl']}): {result['completions_per_s']:.1f} completions/s")
    return result["completions_per_s"], result["trained_tokens_per_s"]


if __name__ == "__main__":
    main()
