"""A learner sharded over N processes with FSDP2 (`torch.distributed.fsdp.fully_shard`), gloo on CPU, NCCL on GPU.

Parameters, gradients and optimizer state are split across the ranks of the default process group. Every rank
holds the whole batch; each takes an equal number of sequences of every minibatch, balanced by tokens
(`rank_share`), and divides its loss by the token count of the whole minibatch, so that the gradients summed
over ranks (`set_gradient_divide_factor(1)`: summed, not averaged) are exactly the one-process gradient.
Full weights are gathered one parameter at a time (`full_weights`), LoRA merged on the way, so no rank holds
more than its shard and one full tensor beyond what it sends.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import timedelta

import torch
import torch.distributed as dist
from peft.utils.other import transpose
from torch import Tensor, nn

from rayrlhf.core.modeling import lora_parameters, unwrap
from rayrlhf.core.plan import longest_first
from rayrlhf.core.weight_sync import stream_packet


@dataclass(frozen=True)
class Rank:
    """This process's place in the learner group."""

    rank: int = 0
    world: int = 1

    @classmethod
    def current(cls) -> Rank:

        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def sharded(self) -> bool:
        return self.world > 1


@dataclass(frozen=True)
class TrainGroup:
    """An SFT or reward-model trainer's place in its group (`sft.workers`, `rm.workers`) and whether its model is
    FSDP2-wrapped: a group of N > 1 ranks, or one rank in mixed precision (FSDP2's policy needs a group; a group
    of one is formed for it). Every collective below is a no-op for a plain single process."""

    rank: Rank = Rank()
    fsdp: bool = False

    @classmethod
    def start(cls, mixed_precision: str, timeout_s: float) -> TrainGroup:
        """The group this process already joined (the stage's actors rendezvous first), else a plain process;
        mixed precision makes a lone process a group of one."""
        rank = Rank.current()
        if mixed_precision != "no" and not rank.sharded:

            if not dist.is_initialized():
                one_rank_group(timeout_s)
        return cls(rank, rank.sharded or mixed_precision != "no")

    @property
    def leader(self) -> bool:
        """Rank 0: it alone writes files, metrics and checkpoints' small state."""
        return self.rank.rank == 0

    def share(self, lengths: list[int]) -> list[int]:
        """The positions of one optimizer batch (by token counts) this rank trains on (`rank_share`)."""
        return rank_share(lengths, self.rank.rank, self.rank.world) if self.rank.sharded else list(range(len(lengths)))

    def busiest(self, count: int) -> int:
        """The largest of every rank's `count` (a collective in a group): the passes each rank runs, as FSDP's
        collectives need the same number on every rank."""
        return int(all_reduce_max(float(count))) if self.fsdp else count

    def sum(self, values: dict[str, float]) -> dict[str, float]:
        return all_reduce_sum(values) if self.fsdp else values

    def barrier(self) -> None:
        if self.fsdp:

            dist.barrier()

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank (pickled)."""
        if not self.rank.sharded:
            return obj

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def free_port() -> int:
    """A TCP port free on this node now (the group's rendezvous binds it moments later)."""

    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def init_default_group(addr: str, port: int, rank: int, world: int, timeout_s: float) -> str:
    """Make this process rank `rank` of its default process group (NCCL on GPU, gloo on CPU); returns the backend.

    `timeout_s` bounds the rendezvous and every later collective: a rank that never joins, or a peer that dies
    mid-collective, becomes an error instead of a hang."""


    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://{addr}:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))
    return backend


def one_rank_group(timeout_s: float) -> None:
    """Make this process a process group of its own (rank 0 of 1, on a free local port)."""
    init_default_group("127.0.0.1", free_port(), 0, 1, timeout_s)


def join_group(addr: str, port: int, rank: int, world: int, timeout_s: float, role: str = "learner") -> None:
    """Join the `role` group as rank `rank` (`init_default_group`); a failure names the rank and the address."""
    try:
        init_default_group(addr, port, rank, world, timeout_s)
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise RuntimeError(f"{role} rank {rank}/{world}: joining the {role} group at {addr}:{port} failed: "
                           f"{first}") from e


def _hf_model(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def mixed_precision_policy(mode: str):
    """FSDP2's policy for `model.mixed_precision`: bf16 parameters in forward and backward, gradients reduced
    in fp32 (the sharded fp32 parameters and the optimizer never see bf16). None for "no"."""
    if mode == "no":
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy  # public from torch 2.6; unsharded runs need not import it

    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def shard_model(model: nn.Module, mixed_precision: str = "no") -> nn.Module:
    """fully_shard every transformer block (the model's `_no_split_modules`), then the root; gradients are
    summed across ranks, not averaged (each rank's loss is already its share of the minibatch mean).
    `mixed_precision` ("no", "bf16"): `mixed_precision_policy`.

    A scalar (reward/value) model's backbone and score head are units of their own: the critic calls them
    directly for per-token values (`forward.token_values`), and a unit gathers its parameters only when its
    own forward runs. A causal LM is called through its root, which keeps tied embeddings in one unit."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    hf = _hf_model(model)
    blocks = set(getattr(hf, "_no_split_modules", None) or ())
    if not blocks:
        raise ValueError(f"{type(hf).__name__} names no transformer block class (_no_split_modules)")
    policy = mixed_precision_policy(mixed_precision)
    kwargs = {} if policy is None else {"mp_policy": policy}
    for module in model.modules():
        if type(module).__name__ in blocks:
            fully_shard(module, **kwargs)
    if hasattr(hf, "score"):
        fully_shard(getattr(hf, hf.base_model_prefix), **kwargs)
        fully_shard(hf.score, **kwargs)
    fully_shard(model, **kwargs)
    for module in model.modules():
        if isinstance(module, FSDPModule):  # a plain SUM (gloo has no pre-multiplied sum)
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    return model


def rank_share(lengths: list[int], rank: int, world: int) -> list[int]:
    """The positions (into `lengths`, the token counts of one minibatch's sequences) that `rank` takes.

    Every rank gets the same number (FSDP's collectives need every rank to run the same forward and backward
    passes), balanced by tokens: longest first, dealt out in snake order (0, 1, ..., N-1, N-1, ..., 0, ...)."""
    if len(lengths) % world:
        raise ValueError(f"{len(lengths)} sequences cannot be split evenly over {world} learner ranks")
    order = longest_first(lengths)
    mine = []
    for k, i in enumerate(order):
        lap, pos = divmod(k, world)
        if (pos if lap % 2 == 0 else world - 1 - pos) == rank:
            mine.append(i)
    return sorted(mine)


def all_gather_rows(local: Tensor, world: int) -> list[Tensor]:
    """Each rank's equally shaped tensor, in rank order (a collective: every rank calls it)."""

    out = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(out, local.contiguous())
    return out


def all_reduce_sum(values: dict[str, float]) -> dict[str, float]:
    """Sums of each rank's figures (a collective; every rank passes the same keys in the same order)."""

    if not values:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64)
    dist.all_reduce(t)
    return dict(zip(values, t.tolist()))


def all_reduce_max(value: float) -> float:

    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def clip_grad_norm(model: nn.Module, max_norm: float) -> Tensor:
    """Clip the gradients to `max_norm`; the norm before clipping, of the full gradient when sharded."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return norm.full_tensor() if _is_dtensor(norm) else norm


def _is_dtensor(t: Tensor) -> bool:
    """A sharded tensor (FSDP2's DTensor), without importing torch.distributed.tensor where nothing is sharded."""
    return hasattr(t, "full_tensor")


def _full(p: Tensor) -> Tensor:
    return (p.full_tensor() if _is_dtensor(p) else p).detach()


def full_weights(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """(name, full tensor) of the plain Hugging Face model, in parameter order, LoRA merged in: what
    `modeling.unwrap(model).named_parameters()` gives, gathered from shards one parameter at a time.

    A collective when the model is sharded: every rank must iterate it to the end."""
    hf = _hf_model(model)
    lora = {}  # module name -> [base weight, A] until its B arrives
    for name, p in hf.named_parameters():
        if ".original_module." in name:  # peft's frozen copy of a fully trained module (modules_to_save)
            continue
        full = _full(p)
        module, _, leaf = name.rpartition(".")
        if ".modules_to_save." in name:  # the trained copy, under the module's own name
            yield f"{name.split('.modules_to_save.')[0]}.{leaf}", full
        elif module.endswith(".base_layer"):
            owner = module.removesuffix(".base_layer")
            if leaf == "weight" and _is_lora(hf, owner):
                check_plain_lora(hf.get_submodule(owner), owner)
                lora[owner] = [full, None]
                continue
            yield f"{owner}.{leaf}", full
        elif ".lora_A." in name:
            lora[name.split(".lora_A.")[0]][1] = full
        elif ".lora_B." in name:
            owner, adapter = name.split(".lora_B.")[0], name.split(".lora_B.")[1].split(".")[0]
            base, a = lora.pop(owner)
            layer = hf.get_submodule(owner)
            # peft's LoraLayer.get_delta_weight on the gathered tensors: B A, transposed for Conv1D-style weights
            yield f"{owner}.weight", base + transpose(full @ a, layer.fan_in_fan_out) * layer.scaling[adapter]
        else:
            yield name, full
    if lora:
        raise ValueError(f"LoRA layers without their B matrix: {sorted(lora)[:3]}")


def _is_lora(hf: nn.Module, module_name: str) -> bool:
    return hasattr(hf.get_submodule(module_name), "lora_A")


def check_plain_lora(layer: nn.Module, name: str, merger: str = "a sharded learner (from gathered shards)") -> None:
    """`merger` merges W + B A (scaled): DoRA (a magnitude vector) and a LoRA bias merge otherwise."""
    for variant in ("use_dora", "lora_bias"):
        if any(getattr(layer, variant, {}).values()):
            raise ValueError(f"{name}: LoRA with {variant} cannot be merged by {merger}, which supports plain LoRA "
                             "only")


def plain_copy(model: nn.Module, weights: dict[str, Tensor]) -> nn.Module:
    """A plain (unsharded, LoRA-free) transformers model of `model`'s class and config holding `weights` (what
    `full_weights` gathered): what a sharded trainer saves, so `from_pretrained` and vLLM load it as usual."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    hf = _hf_model(model)
    auto = AutoModelForSequenceClassification if hasattr(hf, "score") else AutoModelForCausalLM
    plain = auto.from_config(hf.config, dtype=next(iter(weights.values())).dtype)
    missing, unexpected = plain.load_state_dict(weights, strict=False)
    tied = set(getattr(plain, "_tied_weights_keys", None) or ())
    if unexpected or set(missing) - tied:
        raise ValueError(f"gathered weights do not match {type(plain).__name__} (missing {sorted(missing)[:3]}, "
                         f"unexpected {sorted(unexpected)[:3]})")
    plain.tie_weights()
    return plain


def rollout_weights(model: nn.Module, group: TrainGroup, dtype: torch.dtype) -> dict[str, Tensor]:
    """The plain (LoRA-merged) parameters of a trained policy, named as the rollout models name them, in the
    rollout's dtype (`model.inference_dtype`: the fp32 master weights cast, e.g. to bf16 for vLLM). In a group
    this is a collective that gathers the shards one parameter at a time; rank 0 keeps them (on the CPU)."""
    if not group.fsdp:

        return {name: t.detach().to(dtype) for name, t in unwrap(model).named_parameters()}
    keep = group.leader
    return {name: t.cpu().detach().to(dtype) for name, t in full_weights(model) if keep}


def adapter_weights(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """(name, full tensor) of the policy's LoRA matrices (`modeling.lora_parameters`), in fp32 as they train:
    what an adapter-only sync sends. A collective when the model is sharded: every rank must iterate it."""
    for name, p in lora_parameters(model):
        yield name, _full(p).detach().float().cpu()


def rollout_packet(model: nn.Module, group: TrainGroup, dtype: torch.dtype, version: int, bucket_bytes: int,
                   store=None, adapters: bool = False):
    """`rollout_weights` as a versioned, checksummed packet of flat buckets (`weight_sync.stream_packet`). Sharded,
    every rank gathers the full tensors one at a time (a collective) and rank 0 fills one bucket at a time, handing
    each to `store` before the next: no rank holds more than its shard plus one bucket and one tensor. The other
    ranks return None. `adapters`: the LoRA matrices only (`adapter_weights`), for workers that hold the base.
    """
    if adapters:
        named = adapter_weights(model)
        if not group.leader:
            for _ in named:  # take part in every gather
                pass
            return None
        return replace(stream_packet(named, version, bucket_bytes, store), adapters=True)
    if not group.fsdp:
        return stream_packet(rollout_weights(model, group, dtype).items(), version, bucket_bytes, store)
    gathered = ((name, t.cpu().detach().to(dtype)) for name, t in full_weights(model))
    if not group.leader:
        for _ in gathered:  # take part in every gather, keep nothing
            pass
        return None
    return stream_packet(gathered, version, bucket_bytes, store)
