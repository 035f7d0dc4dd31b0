"""Load test of the reward service on loopback, next to in-process batched scoring of the same model.

    python bench/bench_reward_service.py [--checkpoint DIR] [--seconds 30] [--concurrency 16 64] [--items 8]
                                         [--config F] [--set KEY=VALUE ...]

Starts a local Ray and the service on 127.0.0.1 (a free port, a random token), then for each concurrency
level runs that many clients (asyncio + httpx), each sending requests of --items {prompt, response} pairs
back to back for --seconds. Then it scores the same texts in this process (`TextRewardModel`, i.e.
`RewardScorer` with the service's tokenization) in batches of serve.max_batch_size with the replica's thread
count, for --seconds. Prints items/s, requests/s, p50/p99 latency, errors, the mean model batch, and the ratio
HTTP@<first concurrency> / in-process. Without --checkpoint it builds an untrained model of the default
config's size (a ~1M-parameter Llama) with a tokenizer trained on the synthetic task.

The load generator shares the machine with the service: on a small machine its own CPU use lowers the
HTTP figures.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from rayrlhf.core.process import enable_token_auth, quiet_transformers

enable_token_auth()  # before Ray is imported, as the CLI does

import httpx  # noqa: E402
import torch  # noqa: E402

from rayrlhf.core.config import Config, load_config  # noqa: E402
from rayrlhf.core.data import corpus_text, load_tldr  # noqa: E402
from rayrlhf.core.modeling import build_tiny_llama, load_scalar_model, save_checkpoint, train_tokenizer  # noqa: E402
from rayrlhf.serving.text_scoring import TextRewardModel  # noqa: E402


@dataclass
class LoadResult:
    concurrency: int
    seconds: float
    requests: int
    errors: int
    latencies: list[float]
    items_per_request: int
    mean_batch: float

    @property
    def items_per_s(self) -> float:
        return self.requests * self.items_per_request / self.seconds

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.seconds

    def percentile_ms(self, q: int) -> float:
        if len(self.latencies) < 2:
            return float("nan") if not self.latencies else self.latencies[0] * 1e3
        return statistics.quantiles(self.latencies, n=100, method="inclusive")[q - 1] * 1e3


def build_checkpoint(cfg: Config, out: Path) -> Path:
    """An untrained reward model of cfg.model's size, with a tokenizer trained on the synthetic corpus."""
    data = load_tldr(cfg.data)
    tok = train_tokenizer(corpus_text(data), cfg.model.vocab_size)
    torch.manual_seed(cfg.run.seed)
    sft = save_checkpoint(build_tiny_llama(cfg.model, tok), tok, out / "sft")
    return save_checkpoint(load_scalar_model(str(sft), tok, init_head=True), tok, out / "rm")


def load_texts(cfg: Config, n: int) -> tuple[list[str], list[str]]:
    data = load_tldr(cfg.data)
    examples = (data.sft_valid + data.sft_train)[:n]
    return [e.query for e in examples], [e.reference for e in examples]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def batch_stats(client: httpx.Client) -> tuple[float, float]:
    """(sum, count) of the replica's model batch sizes."""
    from prometheus_client.parser import text_string_to_metric_families

    values = {s.name: s.value for fam in text_string_to_metric_families(client.get("/metrics").text)
              for s in fam.samples if s.name.startswith("reward_service_batch_size_")}
    return values.get("reward_service_batch_size_sum", 0.0), values.get("reward_service_batch_size_count", 0.0)


async def run_load(url: str, token: str, bodies: list[dict], concurrency: int, seconds: float) -> tuple[int, int, list[float]]:
    """`concurrency` clients, each sending the bodies in turn until the deadline. -> (ok, errors, latencies)."""
    latencies: list[float] = []
    counts = {"ok": 0, "errors": 0}
    deadline = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {token}"}, limits=limits,
                                 timeout=60) as client:

        async def worker(k: int) -> None:
            i = k
            while time.monotonic() < deadline:  # bounded by the deadline; each request by the timeout
                t0 = time.perf_counter()
                try:
                    r = await client.post("/v1/score", json=bodies[i % len(bodies)])
                    ok = r.status_code == 200
                except httpx.HTTPError:
                    ok = False
                if ok:
                    latencies.append(time.perf_counter() - t0)
                    counts["ok"] += 1
                else:
                    counts["errors"] += 1
                i += concurrency

        await asyncio.gather(*(worker(k) for k in range(concurrency)))
    return counts["ok"], counts["errors"], latencies


def http_benchmark(url: str, token: str, bodies: list[dict], concurrency: int, seconds: float, items: int) -> LoadResult:
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as c:
        for body in bodies[:4]:  # warm-up
            c.post("/v1/score", json=body).raise_for_status()
        s0, n0 = batch_stats(c)
        t0 = time.perf_counter()
        ok, errors, latencies = asyncio.run(run_load(url, token, bodies, concurrency, seconds))
        elapsed = time.perf_counter() - t0
        s1, n1 = batch_stats(c)
    return LoadResult(concurrency, elapsed, ok, errors, latencies, items, (s1 - s0) / max(n1 - n0, 1))


def in_process_items_per_s(checkpoint: Path, cfg: Config, prompts: list[str], responses: list[str],
                           seconds: float) -> float:
    """Texts -> scores in this process: same tokenization, batch size and thread count as one replica."""
    torch.set_num_threads(max(1, int(cfg.serve.num_cpus)))
    model = TextRewardModel(checkpoint, cfg.data, cfg.serve.max_batch_size, cfg.model.frozen_dtype)
    bs = cfg.serve.max_batch_size
    model.score_texts(prompts[:bs], responses[:bs], truncate_responses=True)  # warm-up
    done, i = 0, 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        batch = [(i + j) % len(prompts) for j in range(bs)]
        model.score_texts([prompts[k] for k in batch], [responses[k] for k in batch], truncate_responses=True)
        done, i = done + bs, i + bs
    return done / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="reward-model checkpoint (default: build an untrained one)")
    p.add_argument("--config", help="YAML config (its serve, data and model sections apply)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--seconds", type=float, default=30.0, help="duration of each load level and of the in-process run")
    p.add_argument("--concurrency", type=int, nargs="+", default=[16, 64])
    p.add_argument("--items", type=int, default=8, help="{prompt, response} items per request")
    p.add_argument("--num-texts", type=int, default=256, help="distinct texts cycled through")
    args = p.parse_args(argv)
    if args.seconds <= 0 or args.items < 1 or min(args.concurrency) < 1:
        p.error("--seconds, --items and --concurrency must be positive")

    import ray

    from ray import serve
    from rayrlhf.serving.reward_service import start_service

    quiet_transformers()
    cfg = load_config(args.config, args.overrides)
    with tempfile.TemporaryDirectory(prefix="bench-reward-") as tmp:
        checkpoint = Path(args.checkpoint) if args.checkpoint else build_checkpoint(cfg, Path(tmp))
        prompts, responses = load_texts(cfg, args.num_texts)
        bodies = [{"items": [{"prompt": prompts[(i + j) % len(prompts)], "response": responses[(i + j) % len(prompts)]}
                             for j in range(args.items)], "truncate_responses": True}
                  for i in range(0, len(prompts), args.items)]
        token = secrets.token_hex(16)
        os.environ[cfg.serve.token_env] = token  # before Ray starts: the replicas inherit it
        ray.init(address="local", num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False,
                 runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}, log_to_driver=False)
        try:
            url = start_service(str(checkpoint.resolve()), cfg, "127.0.0.1", free_port(), require_token=True)
            results = [http_benchmark(url, token, bodies, c, args.seconds, args.items) for c in args.concurrency]
        finally:
            serve.shutdown()
            ray.shutdown()
        local = in_process_items_per_s(checkpoint, cfg, prompts, responses, args.seconds)

    s = cfg.serve
    print(f"\nreward service on 127.0.0.1: checkpoint {checkpoint}, {s.num_replicas} replica(s) x {s.num_cpus} CPU, "
          f"max_batch_size {s.max_batch_size}, batch_wait_timeout_s {s.batch_wait_timeout_s}, "
          f"{args.items} items/request, {args.seconds:.0f}s per level, {os.cpu_count()} cores on this machine")
    print(f"{'clients':>8} {'items/s':>9} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7} {'mean batch':>11}")
    for r in results:
        print(f"{r.concurrency:>8} {r.items_per_s:>9.1f} {r.requests_per_s:>8.1f} {r.percentile_ms(50):>8.1f} "
              f"{r.percentile_ms(99):>8.1f} {r.errors:>7} {r.mean_batch:>11.1f}")
    print(f"in-process (TextRewardModel, batch {s.max_batch_size}, {max(1, int(s.num_cpus))} thread(s)): "
          f"{local:.1f} items/s")
    print(f"ratio HTTP@{results[0].concurrency} / in-process: {results[0].items_per_s / local:.2f}")
    return 1 if any(r.errors for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
