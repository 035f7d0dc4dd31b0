"""Rollout throughput of the vLLM and HF backends through `RolloutGenerator`, the interface PPO uses.

    python bench/bench_rollout.py [--sizes 64 128] [--threads 2] [--repeats 2]
    python bench/bench_rollout.py --model smollm2 [--checkpoint RUN/sft/checkpoint]   # the real-model recipe

`--model tiny` (default): a ~33M-parameter Llama (hidden 512, 8 layers, 8 heads, intermediate 1376, vocabulary
8000; random weights), prompts of 64 tokens from the synthetic TL;DR task with 2 samples each, 48 new tokens at
T = 0.7. `--model smollm2`: SmolLM2-135M-Instruct (its GGUF file converted, or `--checkpoint`, e.g. the recipe's
SFT policy) on the recipe's batch: real TL;DR posts from configs/smollm2-tldr.yaml's posts file cut to its
max_prompt_tokens, 2 samples each, its max_new_tokens. Each backend runs in its own subprocess (vLLM's CPU worker
patches `torch.set_num_threads` process-wide) with the same number of torch threads; after a warm-up call, the
two take turns, and the best of `--repeats` timed calls per size counts. Tokens are the response tokens kept (up
to and including EOS). HF's figure includes its log-prob forward pass, which vLLM returns while sampling. Each
call samples other prompts than the warm-up's, so vLLM's prefix cache gives no head start.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT_TOKENS = 64
NEW_TOKENS = 48
SAMPLES_PER_PROMPT = 2
TEMPERATURE = 0.7
VOCAB = 8000


def build_policy(out_dir: Path) -> tuple[Path, list[list[int]]]:
    """Writes the checkpoint and returns it with 64-token prompts (tokenizer trained on the synthetic corpus)."""
    import torch

    from rayrlhf.core.config import DataConfig, ModelConfig
    from rayrlhf.core.data import corpus_text, load_tldr
    from rayrlhf.core.modeling import build_tiny_llama, count_params, save_checkpoint, train_tokenizer

    data = load_tldr(DataConfig(num_train_posts=400, num_valid_posts=1, num_test_posts=1, num_train_pairs=1,
                                num_valid_pairs=1))
    tok = train_tokenizer(corpus_text(data), 1024)
    torch.manual_seed(0)
    model = build_tiny_llama(ModelConfig(hidden_size=512, num_layers=8, num_heads=8, intermediate_size=1376,
                                         vocab_size=1024), tok)
    model.resize_token_embeddings(VOCAB, mean_resizing=False)  # a model vocabulary beyond the tokenizer's
    path = save_checkpoint(model, tok, out_dir / "policy")
    prompts = [ids[:PROMPT_TOKENS] for ids in tok([e.query for e in data.sft_train]).input_ids]
    print(f"policy: {count_params(model) / 1e6:.1f}M parameters, vocabulary {VOCAB}, head_dim 64", flush=True)
    return path, prompts


def real_policy(out_dir: Path, checkpoint: str | None) -> tuple[Path, list[list[int]], int]:
    """SmolLM2 (converted from its GGUF file, or `checkpoint`) and the recipe's prompts and response budget."""
    from rayrlhf.core.config import load_config
    from rayrlhf.core.data import load_tldr
    from rayrlhf.core.modeling import convert_gguf, load_tokenizer
    from rayrlhf.core.text import encode_queries

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "smollm2-tldr.yaml")
    path = Path(checkpoint) if checkpoint else convert_gguf(*cfg.model.gguf, out_dir / "smollm2")
    tok = load_tokenizer(str(path))
    queries = [e.query for e in load_tldr(cfg.data).sft_train]
    prompts = encode_queries(tok, queries, cfg.data.max_prompt_tokens)
    print(f"policy: {path}; {len(prompts)} real TL;DR prompts cut to {cfg.data.max_prompt_tokens} tokens "
          f"(mean {sum(map(len, prompts)) / len(prompts):.0f}), {cfg.rollout.max_new_tokens} new tokens", flush=True)
    return path, prompts, cfg.rollout.max_new_tokens


def serve_backend(backend: str, checkpoint: str, prompts: list[list[int]], threads: int, new_tokens: int) -> None:
    """In a backend's subprocess: build one RolloutGenerator, warm it up, then time the calls asked on stdin.

    Protocol (one JSON object per line): out `READY {...}`, then per input line {"num_seqs", "seed"} out
    `RESULT {...}`; stdout carries nothing else of ours, library logs go to stderr.
    """
    import torch

    torch.set_num_threads(threads)
    from rayrlhf.roles.rollout import RolloutGenerator
    from rayrlhf.core.config import RolloutConfig
    from rayrlhf.core.experience import RolloutRequest

    def request(num_seqs: int, seed: int) -> RolloutRequest:
        first = seed * num_seqs // SAMPLES_PER_PROMPT  # other prompts on every call
        rep = [(first + i) % len(prompts) for i in range(num_seqs // SAMPLES_PER_PROMPT) for _ in range(SAMPLES_PER_PROMPT)]
        return RolloutRequest(batch_id=0, shard=0, prompt_indices=rep, prompts=[prompts[i] for i in rep], seed=seed)

    t0 = time.perf_counter()
    gen = RolloutGenerator(checkpoint, RolloutConfig(backend=backend, temperature=TEMPERATURE,
                                                     max_new_tokens=new_tokens))
    start_s = time.perf_counter() - t0
    gen.generate(request(8, seed=0))  # warm-up
    print("READY " + json.dumps({"start_s": start_s, "threads": torch.get_num_threads()}), flush=True)
    for line in sys.stdin:
        ask = json.loads(line)
        batch = gen.generate(request(ask["num_seqs"], ask["seed"]))
        print("RESULT " + json.dumps({"seconds": batch.seconds, "tokens": int(batch.response_mask.sum())}), flush=True)


class BackendProcess:
    """One backend in its own process, driven line by line so the two backends can take turns."""

    def __init__(self, backend: str, job: Path, env: dict[str, str], log: Path):
        self.backend, self.log, self.stderr = backend, log, log.open("w")
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", str(job)], env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr)

    def read(self, tag: str) -> dict:
        for line in self.proc.stdout:
            if line.startswith(tag + " "):
                return json.loads(line.removeprefix(tag + " "))
        raise SystemExit(f"{self.backend} benchmark process failed (exit {self.proc.wait()}):\n"
                         f"{self.log.read_text()[-4000:]}")

    def time_call(self, num_seqs: int, seed: int) -> dict:
        self.proc.stdin.write(json.dumps({"num_seqs": num_seqs, "seed": seed}) + "\n")
        self.proc.stdin.flush()
        return self.read("RESULT")

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()
        self.stderr.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["tiny", "smollm2"], default="tiny", help="see above")
    p.add_argument("--checkpoint", help="--model smollm2: a SmolLM2 folder (e.g. a recipe run's sft/checkpoint)")
    p.add_argument("--sizes", type=int, nargs="+", help="sequences per generate call (tiny: 64 128; smollm2: 32, "
                   "the recipe's 16 prompts x 2)")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch threads per backend")
    p.add_argument("--repeats", type=int, default=2, help="timed calls per backend and size; the fastest counts")
    p.add_argument("--json", help="also write the figures to this file")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: the job file of one backend's process
    args = p.parse_args()
    if args.worker:
        serve_backend(**json.loads(Path(args.worker).read_text()))
        return

    env = os.environ | {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(args.threads)}
    backends = ("vllm", "hf")
    results: dict = {b: {} for b in backends}
    args.sizes = args.sizes or ([32] if args.model == "smollm2" else [64, 128])
    with tempfile.TemporaryDirectory(prefix="bench_rollout_") as tmp:
        if args.model == "smollm2":
            checkpoint, prompts, new_tokens = real_policy(Path(tmp), args.checkpoint)
        else:
            (checkpoint, prompts), new_tokens = build_policy(Path(tmp)), NEW_TOKENS
        if len(prompts) * SAMPLES_PER_PROMPT < max(args.sizes):
            raise SystemExit(f"only {len(prompts)} prompts for {max(args.sizes)} sequences")
        procs = {}
        for b in backends:  # started one after the other: engine start-up is heavy
            job = Path(tmp) / f"{b}.json"
            job.write_text(json.dumps({"backend": b, "checkpoint": str(checkpoint), "prompts": prompts,
                                       "threads": args.threads, "new_tokens": new_tokens}))
            procs[b] = BackendProcess(b, job, env, Path(tmp) / f"{b}.log")
            results[b].update(procs[b].read("READY"))
            print(f"{b}: started in {results[b]['start_s']:.1f} s, {results[b]['threads']} torch threads", flush=True)
        # Turns alternate between the backends (the idle one waits on stdin), so load from other work on the
        # machine falls on both alike; the fastest of the repeats counts.
        for r in range(args.repeats):
            for n in args.sizes:
                for b in backends:
                    got = procs[b].time_call(n, seed=r + 1)
                    runs = results[b].setdefault(str(n), {"runs_s": []})
                    runs["runs_s"].append(got["seconds"])
                    if got["seconds"] <= min(runs["runs_s"]):
                        runs.update(seconds=got["seconds"], tokens=got["tokens"],
                                    tokens_per_s=got["tokens"] / got["seconds"])
        for proc in procs.values():
            proc.close()

    prompt_len = "real TL;DR" if args.model == "smollm2" else f"{PROMPT_TOKENS}-token"
    print(f"\nrollout throughput ({args.model}): {prompt_len} prompts x {SAMPLES_PER_PROMPT} samples, "
          f"{new_tokens} new tokens, T={TEMPERATURE}, best of {args.repeats}")
    print(f"{'sequences':>9} | {'vLLM tok/s':>10} | {'HF tok/s':>8} | {'vLLM/HF':>7}")
    for n in args.sizes:
        v, h = results["vllm"][str(n)], results["hf"][str(n)]
        results[f"ratio_{n}"] = v["tokens_per_s"] / h["tokens_per_s"]
        print(f"{n:>9} | {v['tokens_per_s']:>10.0f} | {h['tokens_per_s']:>8.0f} | {results[f'ratio_{n}']:>6.2f}x"
              f"   (vLLM {v['tokens']} tok in {v['seconds']:.2f} s, HF {h['tokens']} tok in {h['seconds']:.2f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
