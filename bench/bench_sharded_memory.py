"""Memory of a sharded learner and of gradient checkpointing, on a random-initialised model of SmolLM2-135M's
config (full fine-tuning, fp32, AdamW), on CPU:

1. per-rank bytes of parameters + gradients + optimizer state after one step, learner group of N = 1 and N = 2
   (FSDP2 via `core.sharding.shard_model`, gloo): the ratio N=2 / N=1 (target <= 0.55);
2. activation memory of one micro batch: bytes of the tensors autograd saves for the backward pass during the
   forward, without and with `model.gradient_checkpointing` (non-reentrant: only block inputs are kept).

    python bench/bench_sharded_memory.py [--seq 245 --micro 4]
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.multiprocessing as mp



def smollm2_config():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                       num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=2048)


def _local_bytes(t: torch.Tensor) -> int:
    from torch.distributed.tensor import DTensor

    local = t.to_local() if isinstance(t, DTensor) else t
    return local.numel() * local.element_size()


def state_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, int]:
    params = list(model.parameters())
    return {
        "parameters": sum(_local_bytes(p) for p in params),
        "gradients": sum(_local_bytes(p.grad) for p in params if p.grad is not None),
        "optimizer": sum(_local_bytes(v) for s in opt.state.values() for v in s.values() if torch.is_tensor(v)
                         and v.dim() > 0),
    }


def _rank(rank: int, world: int, port: int, seq: int, out: dict) -> None:
    import torch.distributed as dist
    from transformers import LlamaForCausalLM

    from rayrlhf.core.sharding import shard_model

    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = LlamaForCausalLM(smollm2_config())
    if world > 1:
        model = shard_model(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids = torch.randint(0, 49152, (2, seq))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    out[rank] = state_bytes(model, opt)
    if world > 1:
        dist.destroy_process_group()


def per_rank(world: int, seq: int) -> dict[str, int]:
    from rayrlhf.core.sharding import free_port

    if world == 1:
        out: dict = {}
        _rank(0, 1, 0, seq, out)
        return out[0]
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_rank, args=(world, free_port(), seq, out), nprocs=world)
    return max((dict(v) for v in out.values()), key=lambda d: sum(d.values()))  # the fullest rank


def saved_activation_bytes(checkpointing: bool, micro: int, seq: int) -> int:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(smollm2_config())
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    ids = torch.randint(0, 49152, (micro, seq))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=245, help="tokens per sequence (the recipe: 192 + 53)")
    ap.add_argument("--micro", type=int, default=4, help="sequences per micro batch")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    gib = 2**30
    one, two = per_rank(1, 32), per_rank(2, 32)
    print("per-rank bytes after one AdamW step (SmolLM2-135M config, fp32, full fine-tuning):")
    for k in one:
        print(f"  {k:11s} N=1 {one[k] / gib:6.3f} GiB   N=2 {two[k] / gib:6.3f} GiB")
    ratio = sum(two.values()) / sum(one.values())
    print(f"  total       N=1 {sum(one.values()) / gib:6.3f} GiB   N=2 {sum(two.values()) / gib:6.3f} GiB   "
          f"ratio {ratio:.3f} (target <= 0.55)")
    off = saved_activation_bytes(False, args.micro, args.seq)
    on = saved_activation_bytes(True, args.micro, args.seq)
    print(f"activations saved for backward, one micro batch of {args.micro} x {args.seq} tokens: "
          f"{off / gib:.3f} GiB without, {on / gib:.3f} GiB with gradient checkpointing (ratio {on / off:.3f})")


if __name__ == "__main__":
    main()
