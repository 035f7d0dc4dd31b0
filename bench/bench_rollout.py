"""Rollout throughput of the vLLM and HF backends through `RolloutGenerator`, the interface PPO uses.

    python bench/bench_rollout.py [--sizes 64 128] [--threads 2] [--repeats 2]

A ~33M-parameter Llama (hidden 512, 8 layers, 8 heads, intermediate 1376, vocabulary 8000; random weights),
prompts of 64 tokens from the synthetic TL;DR task with 2 samples each, 48 new tokens at T = 0.7. Each backend
runs in its own subprocess (vLLM's CPU worker patches `torch.set_num_threads` process-wide) with the same
number of torch threads; one warm-up call, then the best of `--repeats` timed calls per size. Tokens are the
response tokens kept (up to and including EOS). HF's figure includes its log-prob forward pass, which vLLM
returns while sampling.
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

    from pipeline.config import DataConfig, ModelConfig
    from pipeline.data import corpus_text, load_tldr
    from pipeline.modeling import build_tiny_llama, count_params, save_checkpoint, train_tokenizer

    data = load_tldr(DataConfig(num_train_posts=400, num_valid_posts=1, num_test_posts=1, num_train_pairs=1,
                                num_valid_pairs=1))
    tok = train_tokenizer(corpus_text(data), 1024)
    torch.manual_seed(0)
    model = build_tiny_llama(ModelConfig(hidden_size=512, num_layers=8, num_heads=8, intermediate_size=1376,
                                         vocab_size=1024), tok)
    model.resize_token_embeddings(VOCAB)  # the model's vocabulary, beyond the small tokenizer's
    path = save_checkpoint(model, tok, out_dir / "policy")
    prompts = [ids[:PROMPT_TOKENS] for ids in tok([e.query for e in data.sft_train]).input_ids]
    print(f"policy: {count_params(model) / 1e6:.1f}M parameters, vocabulary {VOCAB}, head_dim 64", flush=True)
    return path, prompts


def run_backend(backend: str, checkpoint: str, prompts: list[list[int]], sizes: list[int], threads: int,
                repeats: int) -> dict:
    """In the subprocess: one RolloutGenerator, a warm-up call, then the timed calls."""
    import torch

    torch.set_num_threads(threads)
    from actors.rollout import RolloutGenerator
    from pipeline.config import RolloutConfig
    from pipeline.experience import RolloutRequest

    cfg = RolloutConfig(backend=backend, temperature=TEMPERATURE, max_new_tokens=NEW_TOKENS)
    t0 = time.perf_counter()
    gen = RolloutGenerator(checkpoint, cfg)
    result = {"backend": backend, "start_s": time.perf_counter() - t0, "threads": torch.get_num_threads()}

    def request(num_seqs: int, seed: int) -> RolloutRequest:
        rep = [i for i in range(num_seqs // SAMPLES_PER_PROMPT) for _ in range(SAMPLES_PER_PROMPT)]
        return RolloutRequest(0, 0, rep, [prompts[i] for i in rep], seed)

    gen.generate(request(8, seed=0))  # warm-up
    for n in sizes:
        best = None
        for r in range(repeats):
            batch = gen.generate(request(n, seed=r + 1))
            tokens = int(batch.response_mask.sum())
            if best is None or batch.generate_s < best[0]:
                best = (batch.generate_s, tokens)
        result[str(n)] = {"seconds": best[0], "tokens": best[1], "tokens_per_s": best[1] / best[0]}
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 128], help="sequences per generate call")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch threads per backend")
    p.add_argument("--repeats", type=int, default=2, help="timed calls per size; the fastest counts")
    p.add_argument("--json", help="also write the figures to this file")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: JSON job for one backend's subprocess
    args = p.parse_args()
    if args.worker:
        job = json.loads(Path(args.worker).read_text())
        print("RESULT " + json.dumps(run_backend(**job)), flush=True)
        return

    env = os.environ | {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(args.threads)}
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_rollout_") as tmp:
        checkpoint, prompts = build_policy(Path(tmp))
        if len(prompts) * SAMPLES_PER_PROMPT < max(args.sizes):
            raise SystemExit(f"only {len(prompts)} prompts for {max(args.sizes)} sequences")
        for backend in ("vllm", "hf"):
            job = Path(tmp) / f"{backend}.json"
            job.write_text(json.dumps({"backend": backend, "checkpoint": str(checkpoint), "prompts": prompts,
                                       "sizes": args.sizes, "threads": args.threads, "repeats": args.repeats}))
            proc = subprocess.run([sys.executable, __file__, "--worker", str(job)], env=env, capture_output=True,
                                  text=True)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode or not lines:
                raise SystemExit(f"{backend} benchmark failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
            results[backend] = json.loads(lines[-1].removeprefix("RESULT "))
            print(f"{backend}: started in {results[backend]['start_s']:.1f} s, "
                  f"{results[backend]['threads']} torch threads", flush=True)

    print(f"\nrollout throughput: {PROMPT_TOKENS}-token prompts x {SAMPLES_PER_PROMPT} samples, "
          f"{NEW_TOKENS} new tokens, T={TEMPERATURE}")
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
