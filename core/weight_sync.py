"""Versioned weight sync from the learner to rollout workers, sent as flat buckets.

The learner packs its policy's tensors into a few contiguous buckets per dtype (not one message per
parameter), tags them with the policy version and a checksum, and ships them by one of two transports:

- `object_store`: one `ray.put` by the learner, each worker reads the same object (default);
- `collective`: a `torch.distributed` group (gloo on CPU, NCCL on GPU) in which the learner (rank 0)
  broadcasts each bucket to the workers (ranks 1..N).

Through the object store the buckets travel as NumPy byte arrays (`to_wire`): Ray hands every reader on the node
a read-only view of the one shared-memory copy, which the worker copies straight into its parameters (a torch
tensor would be unpickled into a fresh copy in each reader first).

Either way a worker swaps weights only between generate calls, so every rollout records the single version
that produced it. A sync that does not finish within its timeout raises `WeightSyncError` naming the peer.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
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
    """A complete set of policy weights at one version. `buckets[i]` is flat, laid out by `layouts[i]`: a tensor,
    or its bytes as Ray ships them (`to_wire`); from a sharded learner the bucket's Ray ObjectRef
    (`stream_packet`), which the receiving worker resolves."""

    version: int
    layouts: tuple[BucketLayout, ...]
    buckets: tuple[Any, ...]
    checksum: str
    adapters: bool = False  # the LoRA matrices only (`sharding.adapter_weights`): the worker holds the base


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


def to_wire(bucket: Tensor) -> np.ndarray:
    """A bucket's bytes as a NumPy array: Ray stores it out of band and every reader on the node gets a view of
    the one shared-memory copy (zero-copy), where a pickled tensor is copied into each reader."""
    return bucket.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


def from_wire(bucket: Tensor | np.ndarray, dtype: torch.dtype) -> Tensor:
    """The flat tensor of a bucket as shipped (`to_wire`), without a copy; a tensor is returned as it is."""
    if isinstance(bucket, Tensor):
        return bucket
    with warnings.catch_warnings():  # read-only shared memory: the receivers only read it (copy_ into their weights)
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(bucket).view(dtype)


def unpack(layouts: tuple[BucketLayout, ...], buckets: Iterable[Tensor | np.ndarray]) -> Iterator[tuple[str, Tensor]]:
    """(name, tensor view) pairs from flat buckets (tensors, or as shipped by `to_wire`): what `load_state_dict`
    or vLLM's reload take."""
    for lay, flat in zip(layouts, buckets):
        flat = from_wire(flat, lay.dtype)
        for name, shape, off in zip(lay.names, lay.shapes, lay.offsets):
            n = 1
            for d in shape:
                n *= d
            yield name, flat[off : off + n].view(shape)


def tensor_digest(name: str, t: Tensor) -> bytes:
    h = hashlib.sha256(name.encode())
    h.update(t.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return h.digest()


def combine_digests(digests: dict[str, bytes]) -> str:
    """The checksum of a set of tensors from their digests, in name order (so the order they came in is free)."""
    h = hashlib.sha256()
    for name in sorted(digests):
        h.update(digests[name])
    return h.hexdigest()


def checksum(named: Iterable[tuple[str, Tensor]]) -> str:
    """sha256 over each tensor's name and bytes, in name order: equal iff every tensor is bit-identical."""
    return combine_digests({name: tensor_digest(name, t) for name, t in named})


def stream_packet(named: Iterable[tuple[str, Tensor]], version: int, bucket_bytes: int,
                  store: Callable[[Tensor], Any] | None = None) -> WeightsPacket:
    """A packet built as the tensors arrive: each bucket (`plan_buckets`' rule) is filled, handed to `store` and
    dropped before the next one fills, so a caller that gathers sharded weights one tensor at a time
    (`sharding.full_weights`) and stores buckets away (`ray.put`) never holds more than one bucket of them.
    `packet.buckets` holds what `store` returned: the buckets themselves without one."""
    layouts: list[BucketLayout] = []
    stored: list[Any] = []
    digests: dict[str, bytes] = {}
    pending: list[tuple[str, Tensor]] = []

    def flush() -> None:
        if not pending:
            return
        lay = plan_buckets(pending, bucket_bytes=2**62)[0]  # the rule was applied on the way in: one bucket
        layouts.append(lay)
        bucket = torch.cat([t.detach().reshape(-1).cpu() for _, t in pending])
        stored.append(bucket if store is None else store(bucket))
        pending.clear()

    size = 0
    for name, t in named:
        digests[name] = tensor_digest(name, t)
        nbytes = t.numel() * t.element_size()
        if pending and (pending[0][1].dtype != t.dtype or size + nbytes > bucket_bytes):
            flush()
            size = 0
        pending.append((name, t))
        size += nbytes
    flush()
    return WeightsPacket(version, tuple(layouts), tuple(stored), combine_digests(digests))


def make_packet(named: dict[str, Tensor], version: int, bucket_bytes: int) -> WeightsPacket:
    return stream_packet(named.items(), version, bucket_bytes)


class CollectiveGroup:
    """A process group for weight broadcast: rank 0 the learner (rank 0 of a learner group), ranks 1..N the workers.

    A group of its own (a TCPStore rendezvous at rank 0's address, then gloo or NCCL on it), not the process's
    default group: a learner rank's default group is its FSDP group, and a process may hold both. Every
    operation has the group's timeout; a peer that never joins or dies turns into `WeightSyncError` instead of
    a hang."""

    def __init__(self, master_addr: str, master_port: int, rank: int, world_size: int, timeout_s: float,
                 component: str):
        from datetime import timedelta

        import torch.distributed as dist

        self.rank, self.component = rank, component
        timeout = timedelta(seconds=timeout_s)
        try:
            store = dist.TCPStore(master_addr, master_port, world_size, is_master=rank == 0, timeout=timeout)
            if torch.cuda.is_available():
                opts = dist.ProcessGroupNCCL.Options()
                opts._timeout = timeout
                self.pg = dist.ProcessGroupNCCL(store, rank, world_size, opts)
                self.device = torch.device("cuda", torch.cuda.current_device())
            else:
                self.pg = dist.ProcessGroupGloo(store, rank, world_size, timeout)
                self.device = torch.device("cpu")
            self.store = store  # kept alive with the group (rank 0 serves it)
        except Exception as e:
            raise WeightSyncError(f"{component}: joining the weight-sync group at {master_addr}:{master_port} "
                                  f"as rank {rank}/{world_size} failed: {e}") from e

    def broadcast(self, buckets: Iterable[Tensor]) -> None:
        """Rank 0's tensors into every rank's (NCCL moves GPU tensors, gloo CPU tensors: all on `device`)."""
        import torch.distributed as dist

        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        try:
            for b in buckets:
                self.pg.broadcast([b], opts).wait()
        except Exception as e:
            raise WeightSyncError(f"{self.component}: weight broadcast failed or timed out: {e}") from e

    def close(self) -> None:
        self.pg = self.store = None
