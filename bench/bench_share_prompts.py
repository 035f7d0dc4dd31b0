"""The rollout side with each prompt run once for its samples, measured: the Hugging Face rollout backend's
`generate` and the reward scorer on one PPO batch of a finished run (its SFT and reward-model checkpoints, its
config's prompts, response length and temperature), `rollout.share_prompts` off then on, on this machine's CPU threads:

1. generate: every row prefills its own prompt, or each distinct prompt is prefilled once and its samples are
   sampled on copies of its cache (`sampling.prefill_distinct_prompts`);
2. reward: every row scored whole, or each distinct prompt once and its samples' responses on its cache
   (`forward.response_scores`).

Both settings give the same log-probs and scores up to float rounding, so they sample the same tokens for the
same seed (rounding could flip a rare sample; the script stops if one does); it prints seconds per call (after
one untimed call of each, the median of `--repeats`, the settings alternating) and the ratio.

    python bench/bench_share_prompts.py --run-dir RUN [--prompts 16] [--k 2] [--repeats 3] [--threads 2] [--json PATH]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from result_file import add_json_option, describe_machine, write_result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run-dir", required=True, help="a run whose sft and rm stages finished")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--k", type=int, default=2, help="samples per prompt")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    add_json_option(ap)
    args = ap.parse_args()
    run = Path(args.run_dir)
    for stage in ("sft", "rm"):
        if not (run / stage / "checkpoint" / "config.json").is_file():
            ap.error(f"--run-dir {run}: no finished {stage} stage ({stage}/checkpoint)")
    if not (run / "config.yaml").is_file():
        ap.error(f"--run-dir {run}: no config.yaml")
    for name in ("prompts", "k", "repeats", "threads"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    machine = describe_machine()
    import torch

    from rayrlhf.roles.reward import RewardScorer
    from rayrlhf.roles.rollout import RolloutGenerator
    from rayrlhf.core.config import load_config
    from rayrlhf.core.data import load_tldr
    from rayrlhf.core.experience import RolloutRequest
    from rayrlhf.core.process import quiet_transformers
    from rayrlhf.core.text import encode_queries, with_encodable_queries

    quiet_transformers()
    torch.set_num_threads(args.threads)
    cfg = load_config(str(run / "config.yaml"), ["rollout.backend=hf"])
    sft, rm = str(run / "sft" / "checkpoint"), str(run / "rm" / "checkpoint")
    gens = {s: RolloutGenerator(sft, cfg.rollout, dtype=cfg.model.frozen_dtype, share_prompts=s) for s in (False, True)}
    scorers = {s: RewardScorer(rm, cfg.reward.missing_eos_score, cfg.reward.batch_size, cfg.model.frozen_dtype,
                               share_prompts=s) for s in (False, True)}
    tok = gens[False].backend.tokenizer
    data = with_encodable_queries(tok, load_tldr(cfg.data), cfg.data)
    prompts = encode_queries(tok, [e.query for e in data.sft_train[: args.prompts]], cfg.data.max_prompt_tokens)
    rows = [i for i in range(len(prompts)) for _ in range(args.k)]
    req = RolloutRequest(batch_id=0, shard=0, prompt_indices=rows, prompts=[prompts[i] for i in rows], seed=0)

    for share in (False, True):  # untimed: the peak probe and first-call costs of each role
        scorers[share].score_rollout(gens[share].generate(req))
    seconds: dict[str, dict[bool, list[float]]] = {"generate": {False: [], True: []}, "reward": {False: [], True: []}}
    diffs: dict[str, list[float]] = {"generate": [], "reward": []}  # max |diff| of log-probs, of scores
    for r in range(args.repeats):
        order = (False, True) if r % 2 == 0 else (True, False)  # alternate, so a drift weighs on both
        batches, scores = {}, {}
        for share in order:
            t0 = time.perf_counter()
            batches[share] = gens[share].generate(req)
            seconds["generate"][share].append(time.perf_counter() - t0)
        for share in order:
            t0 = time.perf_counter()
            scores[share] = scorers[share].score_rollout(batches[False])
            seconds["reward"][share].append(time.perf_counter() - t0)
        if not torch.equal(batches[False].responses, batches[True].responses):
            raise SystemExit("the shared prefill sampled other tokens than the whole one")
        lp = (batches[False].logprobs - batches[True].logprobs).abs().max().item()
        sc = (scores[False].raw_scores - scores[True].raw_scores).abs().max().item()
        diffs["generate"].append(lp)
        diffs["reward"].append(sc)
        print(f"repeat {r}: generate {seconds['generate'][False][-1]:.2f} -> {seconds['generate'][True][-1]:.2f} s, "
              f"reward {seconds['reward'][False][-1]:.2f} -> {seconds['reward'][True][-1]:.2f} s; "
              f"max |diff| log-probs {lp:.1e}, scores {sc:.1e}")
    lengths = batches[False].prompt_mask.sum(-1).float(), batches[False].response_mask.sum(-1).float()
    print(f"\n=== {len(prompts)} prompts x {args.k} samples of {run} ({cfg.model.name_or_path}), prompts "
          f"{lengths[0].mean():.0f} tokens, responses {lengths[1].mean():.0f} of {cfg.rollout.max_new_tokens}, "
          f"{args.threads} threads ===")
    rows = []
    for what, s in seconds.items():
        whole, shared = statistics.median(s[False]), statistics.median(s[True])
        print(f"{what:9s} every row whole {whole:7.2f} s   each prompt once {shared:7.2f} s   {whole / shared:5.2f}x")
        rows.append({"call": what, "repeats": args.repeats, "every row whole s": whole, "each prompt once s": shared,
                     "speed-up": whole / shared, "max abs diff": max(diffs[what])})
    if args.json:
        write_result(args.json, "bench_share_prompts", machine, rows,
                     {"every row whole s": "{:.2f}", "each prompt once s": "{:.2f}", "speed-up": "{:.2f}×",
                      "max abs diff": "{:.1e}"})


if __name__ == "__main__":
    main()
