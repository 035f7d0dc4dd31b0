"""Adapter-only against merged LoRA sync into real vLLM rollout workers, on the recipe's model and LoRA.

The learner side is a peft policy over the recipe's base model (configs/smollm2-tldr.yaml: SmolLM2-135M-Instruct,
LoRA r=16 on every linear layer, fp32), its adapters moved by AdamW steps (the recipe's lr) on the language-model
loss of TL;DR posts: not PPO, but adapters a few updates away from their zero start, as after a few PPO steps.
Each sync is built as the learner actor builds it (`sharding.rollout_packet`, buckets as NumPy bytes, one
`ray.put`) and loaded by `actors.RolloutWorker`s with `rollout.backend vllm`, as a run makes them:

- `adapters`: workers that hold the base and load each version as a new LoRA request, read back before it serves
  (`rollout.vllm_adapters lora`);
- `adapters, worker merge`: the same packet; the workers merge it into their own copy of the base and reload the
  engine (`rollout.vllm_adapters merge`), probed;
- `merged`: the learner merges, workers reload every weight it sends (`reload_weights`), probed too.

Printed per mode and worker count: MiB per sync, the sync's seconds as the driver sees it (`ray.get` of every
worker's load: the object store read, the copy, vLLM's load, the probe), the slowest worker's own load seconds,
medians over the syncs after the first. Then, at the last version (staleness 0, after `--syncs` >= 2 syncs):
the engine's behaviour log-probs of a batch of recipe prompts against the learner's own (peft, fp32), max and
mean |difference|, for each mode, and each adapter mode against merged on the same tokens; and the seconds one
worker takes to generate that batch with each (the faster of two calls): what the sync mode costs the rollout.

    python bench/bench_lora_vllm.py [--config configs/smollm2-tldr.yaml] [--workers 1 2] [--syncs 4]
        [--prompts 8] [--json PATH]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from result_file import add_json_option, describe_machine, write_result  # noqa: E402


# The sync modes compared: their config overrides
MODES = {"adapters": ["rollout.lora_sync=adapters", "rollout.vllm_adapters=lora"],
         "adapters, worker merge": ["rollout.lora_sync=adapters", "rollout.vllm_adapters=merge"],
         "merged": ["rollout.lora_sync=merged"]}


def base_checkpoint(cfg, work: Path) -> str:
    """The recipe's base model as a Hugging Face folder (a GGUF file converted once, cached)."""
    from rayrlhf.core.modeling import convert_gguf

    gguf = cfg.model.gguf
    return str(convert_gguf(*gguf, work / "base_model")) if gguf else cfg.model.name_or_path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/smollm2-tldr.yaml")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--syncs", type=int, default=4, help="versions sent (>= 2); the first is untimed")
    ap.add_argument("--prompts", type=int, default=8, help="prompts of the log-prob check (2 samples each)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides")
    add_json_option(ap)
    args = ap.parse_args()
    if args.syncs < 2:
        ap.error(f"--syncs must be at least 2 (the log-probs are checked after two syncs or more), got {args.syncs}")
    if min(args.workers) < 1 or args.prompts < 1:
        ap.error("--workers and --prompts must be at least 1")

    from rayrlhf.core.config import load_config

    cfg = load_config(args.config, args.set)
    if cfg.model.lora is None or cfg.rollout.backend != "vllm":
        ap.error(f"{args.config}: needs model.lora and rollout.backend vllm")
    machine = describe_machine()
    from rayrlhf.core.process import enable_token_auth

    enable_token_auth()  # before Ray is imported: the session it starts takes a token
    import ray
    import torch
    from transformers import AutoModelForCausalLM

    from rayrlhf.actors import RolloutWorker
    from rayrlhf.core.data import load_tldr
    from rayrlhf.core.experience import RolloutRequest
    from rayrlhf.core.forward import response_logprobs
    from rayrlhf.core.modeling import apply_lora, load_tokenizer
    from rayrlhf.core.sharding import TrainGroup, rollout_packet
    from rayrlhf.core.text import encode_queries
    from rayrlhf.core.weight_sync import to_wire

    work = Path(tempfile.mkdtemp(prefix="bench-lora-vllm-"))
    base = base_checkpoint(cfg, work)
    tok = load_tokenizer(base)
    torch.manual_seed(0)
    policy = apply_lora(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), cfg.model.lora, "CAUSAL_LM")
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=cfg.ppo.lr)
    data = load_tldr(cfg.data)
    posts = [e.query for e in data.sft_train[:64]]
    prompts = encode_queries(tok, [e.query for e in data.sft_valid[: args.prompts]], cfg.data.max_prompt_tokens)

    def update(step: int) -> None:
        """One AdamW step of the LM loss on 4 posts: the adapters move as a few updates would move them."""
        batch = tok(posts[4 * step % 64: 4 * step % 64 + 4], return_tensors="pt", padding=True, truncation=True,
                    max_length=cfg.data.max_prompt_tokens)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        policy.train()
        loss = policy(**batch, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()

    bucket = int(cfg.ppo.bucket_mb * 2**20)
    group = TrainGroup()
    versions = []  # the learner's adapters at each version, to replay the same versions for every worker set
    for v in range(1, args.syncs + 1):
        update(v)
        versions.append({n: p.detach().clone() for n, p in policy.named_parameters() if "lora_" in n})

    def packet(v: int, adapters: bool):
        """Version `v` put in the object store as the learner actor puts it; its ref and its bytes."""
        with torch.no_grad():
            for n, p in policy.named_parameters():
                if n in versions[v - 1]:
                    p.copy_(versions[v - 1][n])
        built = rollout_packet(policy, group, torch.float32, v, bucket, to_wire, adapters)
        return ray.put(built), sum(lay.numel * lay.dtype.itemsize for lay in built.layouts)

    ray.init(num_cpus=max(2, max(args.workers)), include_dashboard=False, log_to_driver=False)
    rows, batches = [], {}
    try:
        for mode, overrides in MODES.items():
            wcfg = load_config(args.config, [*args.set, *overrides, "rollout.num_cpus=1"])
            assert wcfg.sync_adapters == (mode != "merged")
            for n in args.workers:
                workers = [RolloutWorker.options(num_cpus=0).remote(wcfg, base, i) for i in range(n)]
                ray.get([w.version.remote() for w in workers])  # engines started
                sync_s, load_s, nbytes = [], [], 0
                for v in range(1, args.syncs + 1):
                    ref, nbytes = packet(v, wcfg.sync_adapters)
                    t0 = time.perf_counter()
                    inside = ray.get([w.load_weights.remote(ref) for w in workers])
                    if v > 1:
                        sync_s.append(time.perf_counter() - t0)
                        load_s.append(max(inside))
                row = {"mode": mode, "workers": n, "MiB per sync": nbytes / 2**20,
                       "sync s": statistics.median(sync_s), "worker load s": statistics.median(load_s)}
                if n == min(args.workers):  # the log-prob check, staleness 0 at the last version; generation speed
                    req = RolloutRequest(batch_id=0, shard=0, prompt_indices=[i for i in range(len(prompts))
                                                                               for _ in range(2)],
                                         prompts=[p for p in prompts for _ in range(2)], seed=7, version=args.syncs)
                    gen_s = []
                    for _ in range(2):  # the same request twice, the faster counts
                        t0 = time.perf_counter()
                        batches[mode] = ray.get(workers[0].generate.remote(req))[0]
                        gen_s.append(time.perf_counter() - t0)
                    row["generate s"] = min(gen_s)
                rows.append(row)
                print(row, flush=True)
                for w in workers:
                    ray.kill(w)
    finally:
        ray.shutdown()

    policy.eval()
    agree = {}
    with torch.no_grad():
        for mode, b in batches.items():
            lp, _ = response_logprobs(policy, b.prompts, b.prompt_mask, b.responses, b.response_mask,
                                      cfg.rollout.temperature)
            d = ((lp - b.logprobs) * b.response_mask).abs()
            agree[mode] = (d.max().item(), (d.sum() / b.response_mask.sum()).item(), int(b.response_mask.sum()))
        m = batches["merged"]  # each adapter mode against it, on the same tokens (NaN where they sampled others)
        cross = {mode: ((b.logprobs - m.logprobs) * b.response_mask).abs().max().item()
                 if torch.equal(b.responses, m.responses) else float("nan")
                 for mode, b in batches.items() if mode != "merged"}

    merged = {r["workers"]: r for r in rows if r["mode"] == "merged"}
    print(f"\n=== LoRA sync into vLLM workers, {cfg.model.name_or_path} r={cfg.model.lora.r}, fp32, medians of "
          f"{args.syncs - 1} syncs; {machine} ===")
    print(f"{'mode':22s} {'workers':>7s} {'MiB/sync':>9s} {'sync s':>8s} {'worker load s':>14s} {'bytes %':>8s} "
          f"{'speed-up':>8s} {'generate s':>10s}")
    for r in rows:
        m = merged[r["workers"]]
        r["bytes % of merged"] = 100 * r["MiB per sync"] / m["MiB per sync"]
        r["merged / this sync s"] = m["sync s"] / r["sync s"]
        gen = f"{r['generate s']:10.2f}" if "generate s" in r else ""
        print(f"{r['mode']:22s} {r['workers']:7d} {r['MiB per sync']:9.2f} {r['sync s']:8.3f} {r['worker load s']:14.3f} "
              f"{r['bytes % of merged']:8.2f} {r['merged / this sync s']:7.2f}x {gen}")
    print(f"\nbehaviour log-probs at v{args.syncs} (staleness 0) vs the learner's peft forward (fp32, T = "
          f"{cfg.rollout.temperature}), {len(prompts)} prompts x 2 samples:")
    for mode, (mx, mean, tokens) in agree.items():
        print(f"  {mode:22s} max |diff| {mx:.2e}, mean {mean:.2e} over {tokens} tokens")
    for mode, d in cross.items():
        print(f"  {mode} vs merged on the same tokens: max |diff| {d:.2e}" if d == d else
              f"  {mode} and merged sampled different tokens (their kernels differ in the last bits)")
    if args.json:
        write_result(args.json, "bench_lora_vllm", machine, rows,
                     {"MiB per sync": "{:.2f}", "sync s": "{:.3f}", "worker load s": "{:.3f}",
                      "bytes % of merged": "{:.2f}", "merged / this sync s": "{:.2f}×", "generate s": "{:.2f}"},
                     extra={"logprob_agreement": agree, "vs_merged_max": cross})


if __name__ == "__main__":
    main()
