"""Weight sync through Ray's object store: buckets shipped as torch tensors against NumPy bytes (`to_wire`).

The learner puts one packet in the object store and every rollout worker on the node reads it. A pickled torch
tensor is copied out of shared memory into each reader before the worker copies it into its weights; NumPy bytes
are handed to each reader as a view of the one shared copy (zero-copy), so the worker copies them once, straight
into its weights. This measures a sync end to end as the driver sees it (`ray.get` of every worker's load, the
arguments' deserialisation included) on random weights of a real model's shapes (default: SmolLM2-135M, fp32,
the recipe's policy), for `--workers` receivers, the two forms alternating, the median of `--repeats`:

    python bench/bench_weight_sync.py [--model smollm2-135m|tiny] [--workers 2] [--repeats 5] [--bucket-mb 64]
        [--json PATH]

`--lora-r R` compares instead what a LoRA policy sends each version (`rollout.lora_sync`): the full weights with
the adapters merged in, against the LoRA matrices alone (rank R on every linear layer, all-linear as the recipe),
both as NumPy bytes; `--model llama-8b` prints the bytes only (its 32 GB of fp32 weights are not allocated).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

from result_file import add_json_option, describe_machine, write_result


# (hidden, layers, heads, kv heads, intermediate, vocab): HuggingFaceTB/SmolLM2-135M-Instruct's config.json
MODELS = {"smollm2-135m": (576, 30, 9, 3, 1536, 49152), "tiny": (128, 2, 4, 4, 512, 1024),
          "llama-8b": (4096, 32, 32, 8, 14336, 128256)}  # meta-llama/Llama-3.1-8B's config.json


def lora_shapes(shapes: dict, r: int) -> dict:
    """The LoRA matrices of rank `r` on every linear layer of the blocks (peft's all-linear: not the LM head)."""
    out = {}
    for name, shape in shapes.items():
        if name.startswith("model.layers.") and name.endswith("_proj.weight"):
            owner = name.removesuffix(".weight")
            out[f"{owner}.lora_A.default.weight"] = (r, shape[1])
            out[f"{owner}.lora_B.default.weight"] = (shape[0], r)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="smollm2-135m")
    ap.add_argument("--workers", type=int, default=2, help="rollout workers reading each packet")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--bucket-mb", type=float, default=64.0, help="as ppo.bucket_mb")
    ap.add_argument("--lora-r", type=int, default=0, help="compare merged vs adapter-only syncs at this LoRA rank")
    add_json_option(ap)
    args = ap.parse_args()
    for name in ("workers", "repeats"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.bucket_mb <= 0:
        ap.error(f"--bucket-mb must be positive, got {args.bucket_mb}")

    machine = describe_machine()
    from rayrlhf.core.process import enable_token_auth

    enable_token_auth()
    import ray
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rayrlhf.core.weight_sync import stream_packet, to_wire, unpack

    hidden, layers, heads, kv, inter, vocab = MODELS[args.model]
    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv, intermediate_size=inter, vocab_size=vocab,
                         tie_word_embeddings=args.model != "llama-8b")  # Llama 3 has its own LM head
    with torch.device("meta"):
        shapes = {name: p.shape for name, p in LlamaForCausalLM(config).named_parameters()}
    if args.lora_r:
        adapters = lora_shapes(shapes, args.lora_r)
        full, small = (4 * sum(math.prod(s) for s in d.values()) for d in (shapes, adapters))
        print(f"=== {args.model}, LoRA r={args.lora_r} on {len(adapters) // 2} linear layers: bytes per sync (fp32) "
              f"merged {full / 2**20:.1f} MiB, adapters only {small / 2**20:.2f} MiB = {100 * small / full:.2f} % ===")
        if args.model == "llama-8b":
            return
        forms_shapes = {"merged (full weights)": shapes, "adapters only": adapters}
    else:
        forms_shapes = {"torch tensors": shapes, "NumPy bytes (to_wire)": shapes}
    gen = torch.Generator().manual_seed(0)
    weights = {form: {name: torch.randn(shape, generator=gen) for name, shape in sh.items()}
               for form, sh in forms_shapes.items()}
    n_bytes = {form: sum(t.numel() * t.element_size() for t in w.values()) for form, w in weights.items()}

    @ray.remote(num_cpus=0)
    class Receiver:
        """A rollout worker's side of a sync: its weights, and a load that copies a packet into them."""

        def __init__(self, shapes):
            self.params = {name: torch.empty(shape) for name, shape in shapes.items()}

        def load(self, packet) -> float:
            t0 = time.perf_counter()
            for name, t in unpack(packet.layouts, packet.buckets):
                self.params[name].copy_(t)
            return time.perf_counter() - t0

        def checksum(self, names) -> float:
            return float(sum(self.params[n].double().sum() for n in names))

    ray.init(num_cpus=max(2, args.workers), include_dashboard=False, log_to_driver=False)
    try:
        receivers = [Receiver.remote({n: s for sh in forms_shapes.values() for n, s in sh.items()})
                     for _ in range(args.workers)]
        ray.get([r.__ray_ready__.remote() for r in receivers])
        bucket_bytes = int(args.bucket_mb * 2**20)
        forms = {form: (None if form == "torch tensors" else to_wire) for form in forms_shapes}
        packets = {form: ray.put(stream_packet(weights[form].items(), 1, bucket_bytes, store))
                   for form, store in forms.items()}
        seconds: dict[str, list[float]] = {form: [] for form in forms}
        copy_s: dict[str, list[float]] = {form: [] for form in forms}
        for i in range(args.repeats + 1):  # the first round untimed: the workers' first touch of their weights
            for form in (forms if i % 2 == 0 else reversed(list(forms))):
                t0 = time.perf_counter()
                inside = ray.get([r.load.remote(packets[form]) for r in receivers])
                if i > 0:
                    seconds[form].append(time.perf_counter() - t0)
                    copy_s[form].append(max(inside))
                got = ray.get([r.checksum.remote(list(weights[form])) for r in receivers])
                expected = float(sum(t.double().sum() for t in weights[form].values()))
                if any(abs(g - expected) > 1e-6 * max(1.0, abs(expected)) for g in got):
                    raise SystemExit(f"{form}: a receiver's weights differ from the packet's ({got} vs {expected})")
    finally:
        ray.shutdown()

    first, second = forms
    print(f"\n=== weight sync, {args.model} ({n_bytes[first] / 4e6:.1f}M parameters, {n_bytes[first] / 2**20:.0f} MiB "
          f"fp32), {args.workers} workers, buckets of {args.bucket_mb:g} MiB, median of {args.repeats} ===")
    print(f"{'buckets shipped as':24s} {'MiB':>8s} {'sync s':>8s} {'copy in worker s':>17s} {'GiB/s':>7s}")
    med = {form: statistics.median(s) for form, s in seconds.items()}
    for form in forms:
        print(f"{form:24s} {n_bytes[form] / 2**20:8.2f} {med[form]:8.3f} {statistics.median(copy_s[form]):17.3f} "
              f"{n_bytes[form] * args.workers / med[form] / 2**30:7.2f}")
    print(f"sync time ratio {first} / {second}: {med[first] / med[second]:.2f}x; "
          f"bytes {100 * n_bytes[second] / n_bytes[first]:.2f} %")
    if args.json:
        rows = [{"buckets shipped as": form, "MiB": n_bytes[form] / 2**20, "sync s": med[form],
                 "copy in worker s": statistics.median(copy_s[form]),
                 "GiB/s": n_bytes[form] * args.workers / med[form] / 2**30,
                 f"vs {first}": med[first] / med[form]} for form in forms]
        write_result(args.json, "bench_weight_sync", machine, rows,
                     {"MiB": "{:.2f}", "sync s": "{:.3f}", "copy in worker s": "{:.3f}", "GiB/s": "{:.2f}",
                      f"vs {first}": "{:.2f}×"})


if __name__ == "__main__":
    main()
