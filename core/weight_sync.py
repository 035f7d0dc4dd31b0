"""Versioned weight sync from the learner to rollout workers, sent as flat buckets.

The learner packs its policy's tensors into a few contiguous buckets per dtype (not one message per
parameter), tags them with the policy version and a checksum, and ships them by one of two transports:

- `object_store`: one `ray.put` by the learner, each worker reads the same object (default);
- `collective`: a `torch.distributed` group (gloo on CPU, NCCL on GPU) in which the learner (rank 0)
  broadcasts each bucket to the workers (ranks 1..N).

Either way a worker swaps weights only between generate calls, so every rollout records the single version
that produced it. A sync that does not finish within its timeout raises `WeightSyncError` naming the peer.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor


class VersionedChecksum(NamedTuple):
    """The policy version a role holds and the checksum of its weights (`checksum`): equal on both ends of a
    sync means the worker generates with exactly the learner's weights."""

    version: int
    checksum: str


class WeightSyncError(RuntimeError):
    """A weight transfer that failed or timed out; the message names the component."""


@dataclass(frozen=True)
class BucketLayout:
    """Where each tensor lives in its bucket: names, shapes and element offsets, for one dtype."""

    dtype: torch.dtype
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]
    numel: int


@dataclass(frozen=True)
class WeightsPacket:
    """A complete set of policy weights at one version. `buckets[i]` is flat, laid out by `layouts[i]`."""

    version: int
    layouts: tuple[BucketLayout, ...]
    buckets: tuple[Tensor, ...]
    checksum: str


def plan_buckets(named: Iterable[tuple[str, Tensor]], bucket_bytes: int) -> tuple[BucketLayout, ...]:
    """Group tensors, in order, into buckets of one dtype and at most `bucket_bytes` (a bigger tensor gets its own)."""
    layouts: list[BucketLayout] = []
    cur: dict | None = None

    def close() -> None:
        if cur and cur["names"]:
            layouts.append(BucketLayout(cur["dtype"], tuple(cur["names"]), tuple(cur["shapes"]),
                                        tuple(cur["offsets"]), cur["numel"]))

    for name, t in named:
        size = t.numel() * t.element_size()
        if cur is None or cur["dtype"] != t.dtype or (cur["numel"] * t.element_size() + size > bucket_bytes and cur["names"]):
            close()
            cur = {"dtype": t.dtype, "names": [], "shapes": [], "offsets": [], "numel": 0}
        cur["names"].append(name)
        cur["shapes"].append(tuple(t.shape))
        cur["offsets"].append(cur["numel"])
        cur["numel"] += t.numel()
    close()
    return tuple(layouts)


def pack(named: dict[str, Tensor], layouts: tuple[BucketLayout, ...]) -> tuple[Tensor, ...]:
    """Copy tensors into flat CPU-or-device buckets following `layouts`."""
    out = []
    for lay in layouts:
        first = named[lay.names[0]]
        flat = torch.empty(lay.numel, dtype=lay.dtype, device=first.device)
        for name, off in zip(lay.names, lay.offsets):
            t = named[name].detach()
            flat[off : off + t.numel()].copy_(t.reshape(-1))
        out.append(flat)
    return tuple(out)


def unpack(layouts: tuple[BucketLayout, ...], buckets: Iterable[Tensor]) -> Iterator[tuple[str, Tensor]]:
    """(name, tensor view) pairs from flat buckets: what `load_state_dict` or vLLM's reload take."""
    for lay, flat in zip(layouts, buckets):
        for name, shape, off in zip(lay.names, lay.shapes, lay.offsets):
            n = 1
            for d in shape:
                n *= d
            yield name, flat[off : off + n].view(shape)


def checksum(named: Iterable[tuple[str, Tensor]]) -> str:
    """sha256 over names and bytes in name order: equal iff every tensor is bit-identical."""
    h = hashlib.sha256()
    for name, t in sorted(named, key=lambda kv: kv[0]):
        h.update(name.encode())
        h.update(t.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def make_packet(named: dict[str, Tensor], version: int, bucket_bytes: int) -> WeightsPacket:
    layouts = plan_buckets(named.items(), bucket_bytes)
    buckets = tuple(b.cpu() for b in pack(named, layouts))
    return WeightsPacket(version, layouts, buckets, checksum(named.items()))


class CollectiveGroup:
    """A torch.distributed process group for weight broadcast: rank 0 the learner, ranks 1..N the workers.

    Each process holds one (the default group). Every operation has the group's timeout; a peer that
    never joins or dies turns into `WeightSyncError` instead of a hang.
    """

    def __init__(self, master_addr: str, master_port: int, rank: int, world_size: int, timeout_s: float,
                 component: str):
        from core.sharding import init_default_group

        self.rank, self.component = rank, component
        try:
            backend = init_default_group(master_addr, master_port, rank, world_size, timeout_s)
        except Exception as e:
            raise WeightSyncError(f"{component}: joining the weight-sync group at {master_addr}:{master_port} "
                                  f"as rank {rank}/{world_size} failed: {e}") from e
        # NCCL moves GPU tensors, gloo CPU tensors: every buffer of this group lives on `device`.
        self.device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")

    def broadcast(self, buckets: Iterable[Tensor]) -> None:
        import torch.distributed as dist

        try:
            for b in buckets:
                dist.broadcast(b, src=0)
        except Exception as e:
            raise WeightSyncError(f"{self.component}: weight broadcast failed or timed out: {e}") from e

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
