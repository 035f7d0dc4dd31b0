"""Weight sync: bucket planning and packing by hand, checksums, and both transports between real Ray actors."""

from __future__ import annotations

import socket
import time

import pytest
import torch

from rayrlhf.core.weight_sync import (
    CollectiveGroup, WeightSyncError, checksum, from_wire, make_packet, pack, plan_buckets, stream_packet, to_wire,
    unpack,
)

# --- plain functions --------------------------------------------------------------------------------


def _mixed() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a": torch.randn(4, generator=g),  # 16 bytes
        "b": torch.randn(2, 3, generator=g),  # 24 bytes
        "c": torch.randn(5, generator=g).to(torch.bfloat16),
        "d": torch.randn(1000, generator=g),  # 4000 bytes: bigger than a bucket
        "e": torch.randn(3, 2, generator=g).t(),  # not contiguous
        "f": torch.arange(6, dtype=torch.int64).view(2, 3),
    }


def test_plan_buckets_by_hand():
    layouts = plan_buckets(_mixed().items(), bucket_bytes=64)
    # a + b = 40 bytes share a float32 bucket; c starts a bf16 bucket; d (4000 bytes) gets one of its own;
    # e cannot join d's full bucket; f is int64.
    assert [(lay.dtype, lay.names, lay.offsets, lay.numel) for lay in layouts] == [
        (torch.float32, ("a", "b"), (0, 4), 10),
        (torch.bfloat16, ("c",), (0,), 5),
        (torch.float32, ("d",), (0,), 1000),
        (torch.float32, ("e",), (0,), 6),
        (torch.int64, ("f",), (0,), 6),
    ]
    assert layouts[0].shapes == ((4,), (2, 3))
    # one big bucket per dtype run when the budget allows
    assert [lay.names for lay in plan_buckets(_mixed().items(), bucket_bytes=1 << 20)] == [
        ("a", "b"), ("c",), ("d", "e"), ("f",)]


@pytest.mark.parametrize("bucket_bytes", [1, 64, 1 << 20])
def test_pack_unpack_round_trip(bucket_bytes):
    named = _mixed()
    layouts = plan_buckets(named.items(), bucket_bytes)
    buckets = pack(named, layouts)
    assert [b.dtype for b in buckets] == [lay.dtype for lay in layouts]
    assert all(b.dim() == 1 for b in buckets)
    out = dict(unpack(layouts, buckets))
    # as shipped through the object store: each bucket's bytes (bf16 and int64 too), read back without a copy
    wire = [to_wire(b) for b in buckets]
    assert all(w.dtype.name == "uint8" and w.nbytes == b.numel() * b.element_size() for w, b in zip(wire, buckets))
    assert all(from_wire(w, lay.dtype).data_ptr() == w.ctypes.data for w, lay in zip(wire, layouts))
    shipped = dict(unpack(layouts, wire))
    assert out.keys() == shipped.keys() == named.keys()
    for k, v in named.items():
        assert out[k].dtype == shipped[k].dtype == v.dtype and out[k].shape == shipped[k].shape == v.shape
        assert torch.equal(out[k], v) and torch.equal(shipped[k], v), k


def test_checksum_equal_iff_bit_identical():
    named = _mixed()
    base = checksum(named.items())
    assert checksum(reversed(list(named.items()))) == base  # order of iteration does not matter
    assert checksum((k, v.clone()) for k, v in named.items()) == base
    layouts = plan_buckets(named.items(), 64)
    assert checksum(unpack(layouts, pack(named, layouts))) == base

    one_ulp = dict(named, a=named["a"].clone())
    one_ulp["a"][0] = torch.nextafter(one_ulp["a"][0], torch.tensor(float("inf")))
    assert checksum(one_ulp.items()) != base
    renamed = {("z" if k == "a" else k): v for k, v in named.items()}
    assert checksum(renamed.items()) != base
    # 0.0 == -0.0 numerically, but the bits differ
    assert checksum([("x", torch.tensor([0.0]))]) != checksum([("x", torch.tensor([-0.0]))])


def test_make_packet():
    named = _mixed()
    packet = make_packet(named, version=7, bucket_bytes=64)
    assert packet.version == 7 and len(packet.buckets) == len(packet.layouts) == 5
    assert packet.layouts == plan_buckets(named.items(), 64)  # the collective transport's layout
    assert packet.checksum == checksum(named.items())


def test_a_streamed_packet_stores_each_bucket_before_the_next_fills():
    """What a sharded learner's rank 0 does: tensors arrive one at a time (gathered from shards), and every
    bucket is handed to the store (ray.put) before a tensor of the next bucket is taken, so no more than one
    bucket and one tensor are ever held."""
    named = _mixed()
    events: list[tuple[str, object]] = []

    def arriving():
        for name, t in named.items():
            events.append(("tensor", name))
            yield name, t

    kept: list[torch.Tensor] = []

    def store(bucket: torch.Tensor) -> int:
        events.append(("store", bucket.numel()))
        kept.append(bucket)
        return len(kept) - 1  # a handle, as ray.put returns one

    packet = stream_packet(arriving(), version=3, bucket_bytes=64, store=store)
    assert packet.buckets == (0, 1, 2, 3, 4) and packet.checksum == checksum(named.items())
    layouts = packet.layouts
    # taken: a bucket's tensors, then at most the first tensor of the next, then the store call
    first_of = {lay.names[0]: i for i, lay in enumerate(layouts)}
    for i, event in enumerate(events):
        if event[0] == "store" and i + 1 < len(events):
            assert events[i - 1][0] == "tensor" and events[i - 1][1] in first_of  # only the next's first
    stored = [e[1] for e in events if e[0] == "store"]
    assert stored == [lay.numel for lay in layouts]
    assert checksum(unpack(layouts, kept)) == packet.checksum  # the stored buckets hold exactly the tensors


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def test_collective_join_times_out_naming_the_component_when_a_worker_never_joins():
    """Rank 0 of a 2-process group whose other rank never shows up: an error within the timeout, not a hang.

    This runs the plain class in the test process: a failed join leaves a process unable to join again, so
    it cannot share the module's learner actor (see test_collective_sync for the actor path).
    """
    t0 = time.monotonic()
    with pytest.raises(WeightSyncError, match=r"learner: joining the weight-sync group at 127\.0\.0\.1:\d+ as rank 0/2"):
        CollectiveGroup("127.0.0.1", _free_port(), rank=0, world_size=2, timeout_s=3.0, component="learner")
    assert time.monotonic() - t0 < 30
    assert not torch.distributed.is_initialized()


# --- between Ray actors ---------------------------------------------------------------------------------

SYNC_TIMEOUT_S = 10.0


@pytest.fixture(scope="module")
def actors(ray_local, make_tiny_cfg, tiny_checkpoints):
    """One learner and one rollout worker at tiny size, shared by the tests below (actor start-up is slow)."""
    from rayrlhf.actors import LearnerWorker, RolloutWorker

    cfg = make_tiny_cfg("ppo.prompts_per_step=4", "ppo.samples_per_prompt=2", "ppo.minibatch_size=8",
                        "ppo.micro_batch_size=8", f"ppo.sync_timeout_s={SYNC_TIMEOUT_S}", "ppo.max_staleness=1")
    learner = LearnerWorker.options(num_cpus=1).remote(cfg, str(tiny_checkpoints.sft), str(tiny_checkpoints.rm))
    worker = RolloutWorker.options(num_cpus=1).remote(cfg, str(tiny_checkpoints.sft), 0)
    yield cfg, learner, worker
    ray_local.kill(learner)
    ray_local.kill(worker)


def _get(refs):
    import ray

    return ray.get(refs, timeout=120)  # a hang becomes a test failure, not a stuck suite


def _train_step(cfg, learner, worker) -> int:
    """Generate on the worker, score by hand (reference = behaviour, seeded random scores), one learner update."""
    from rayrlhf.core.experience import Experience, RolloutRequest

    version = _get(learner.weights_checksum.remote())[0]
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16], [17, 18]]
    rep = [p for p in prompts for _ in range(2)]
    req = RolloutRequest(batch_id=version, shard=0, prompt_indices=[i // 2 for i in range(8)], prompts=rep, seed=version)
    rollout, info = _get(list(worker.generate.remote(req)))
    assert (info.batch_id, info.sequences, info.response_tokens) == (version, 8, int(rollout.response_mask.sum()))
    exp = Experience(
        batch_id=version, policy_version=version, prompt_indices=rollout.prompt_indices, prompts=rollout.prompts,
        prompt_mask=rollout.prompt_mask, responses=rollout.responses, response_mask=rollout.response_mask,
        logprobs=rollout.logprobs, ref_logprobs=rollout.logprobs.clone(),
        scores=torch.randn(8, generator=torch.Generator().manual_seed(version)), has_eos=torch.ones(8, dtype=torch.bool),
    )
    _get(learner.train_step.remote(exp))
    return version + 1


@pytest.mark.slow
@pytest.mark.xdist_group("sync_actors")  # on one worker: the actors fixture starts once
def test_object_store_sync(actors):
    cfg, learner, worker = actors
    version = _train_step(cfg, learner, worker)
    (lv, lsum), (wv, wsum) = _get([learner.weights_checksum.remote(), worker.weights_checksum.remote()])
    assert lv == version and wv < version and lsum != wsum  # the update changed the learner's weights
    # as the driver does it: one packet in the object store, read by every worker; its buckets are NumPy bytes,
    # which a reader gets as a read-only view of the object store's shared memory, not a copy
    packet = learner.make_packet.remote()
    buckets = _get(packet).buckets
    assert all(b.dtype.name == "uint8" and not b.flags.writeable for b in buckets)
    _get(worker.load_weights.remote(packet, verify=True))
    (lv, lsum), (wv, wsum) = _get([learner.weights_checksum.remote(), worker.weights_checksum.remote()])
    assert (wv, wsum) == (lv, lsum) == (version, lsum)
    assert _get(worker.version.remote()) == version


@pytest.mark.slow
@pytest.mark.xdist_group("sync_actors")  # on one worker: the actors fixture starts once
def test_collective_sync(actors, ray_local):
    """gloo broadcast learner -> worker; then a broadcast nobody receives times out, naming the learner."""
    cfg, learner, worker = actors
    addr, port = ray_local.util.get_node_ip_address(), _free_port()
    # as the driver does it: the layout first, then both joins at once (the learner's join blocks until all joined)
    layouts = _get(learner.bucket_layouts.remote())
    _get([learner.join_group.remote(addr, port, 2, SYNC_TIMEOUT_S, layouts),
          worker.join_group.remote(addr, port, 1, 2, SYNC_TIMEOUT_S, layouts)])

    version = _train_step(cfg, learner, worker)
    assert _get(learner.weights_checksum.remote()) != _get(worker.weights_checksum.remote())
    sent, loaded = learner.broadcast_weights.remote(), worker.receive_weights.remote(version)
    assert _get(sent) == version
    assert _get(loaded) >= 0.0
    (lv, lsum), (wv, wsum) = _get([learner.weights_checksum.remote(), worker.weights_checksum.remote()])
    assert (wv, wsum) == (lv, lsum) and lv == version

    # The worker never calls receive_weights: the broadcast fails within the group's timeout.
    t0 = time.monotonic()
    with pytest.raises(WeightSyncError, match="learner: weight broadcast failed or timed out"):
        _get(learner.broadcast_weights.remote())
    assert time.monotonic() - t0 < SYNC_TIMEOUT_S + 30
