"""Every `@ray.remote` of rayrlhf: thin Ray wrappers around the plain role classes, a few lines per method.

PPO roles: `RolloutWorker`, `ReferenceWorker`, `RewardWorker` (or `RemoteRewardWorker`, the reward service over
HTTP), `LearnerWorker`, and `RolloutScaler` (elastic rollout's control channel). Offline stages: `SFTStage`,
`RMStage`, `evaluate_task`. Placement and resources are the caller's (`pipeline.launch`, `pipeline.workflow`).

Each actor runs one call at a time (Ray's default for sync actors), which is what makes a weight swap
and a generate call on one rollout worker mutually exclusive; except an in-flight rollout worker
(`rollout.inflight`), a threaded actor whose decode loop orders its calls itself (`roles.inflight`).
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import replace
from pathlib import Path

import ray
import torch

from rayrlhf.roles.evaluate import evaluate_policies
from rayrlhf.roles.learner import PPOLearner
from rayrlhf.roles.reference import ReferenceLogprobs
from rayrlhf.roles.reward import RewardScorer
from rayrlhf.roles.rm import RMTrainer
from rayrlhf.roles.rollout import RolloutGenerator
from rayrlhf.roles.sft import SFTTrainer
from rayrlhf.core.config import Config, role_threads
from rayrlhf.core.experience import (
    CallInfo, Experience, RefLogprobs, RolloutBatch, RolloutInfo, RolloutRequest, Scores, ShardRefs,
)
from rayrlhf.core.modeling import load_tokenizer
from rayrlhf.core.process import init_worker_process, node_cores
from rayrlhf.core.scaling import ScaleControl, ScaleStatus
from rayrlhf.core.sharding import adapter_weights, free_port, join_group
from rayrlhf.core.weight_sync import (
    BucketLayout, CollectiveGroup, VersionedChecksum, WeightsPacket, WeightSyncError, checksum, pack, to_wire,
)
from rayrlhf.serving.client import RemoteRewardScorer, RewardClient

log = logging.getLogger(__name__)

# --- PPO roles --------------------------------------------------------------------------------------


def read_batch(refs: ShardRefs) -> Experience:
    """A collected batch read from the object store and joined: in the learner; in the driver only for a
    checkpoint, which saves the batches in flight."""
    return Experience.join(ray.get(refs.rollouts), ray.get(refs.references), ray.get(refs.rewards), refs.pad_id,
                           refs.step)


def _restarted() -> bool:
    """Whether Ray restarted this actor (it then holds the SFT weights and none of its calls' state)."""
    with warnings.catch_warnings():  # Ray's property reads its own deprecated `actor_id`, with a warning
        warnings.simplefilter("ignore")
        return bool(ray.get_runtime_context().was_current_actor_reconstructed)


@ray.remote
class RolloutWorker:
    def __init__(self, cfg: Config, checkpoint: str, worker_index: int):
        init_worker_process(role_threads(cfg, "rollout", node_cores()), cfg.rollout.nice)
        restarted = cfg.rollout.inflight and _restarted()
        self.gen = RolloutGenerator(checkpoint, cfg.rollout, worker_index, cfg.model.frozen_dtype,
                                    share_prompts=cfg.rollout.share_prompts,
                                    lora=cfg.model.lora if cfg.sync_adapters else None,
                                    max_rows=cfg.rollout.inflight_max_rows or cfg.ppo.prompts_per_step * cfg.ppo.samples_per_prompt,
                                    wait_s=cfg.ppo.sync_timeout_s,
                                    restarted=restarted)
        if restarted and cfg.rollout.inflight_deterministic:
            log.warning("rollout worker %d was restarted by Ray: its requests run on arrival, out of the "
                        "deterministic order (this worker's share of the run is not repeatable)", worker_index)
        self.group: CollectiveGroup | None = None

    @ray.method(num_returns=2)
    def generate(self, req: RolloutRequest) -> tuple[RolloutBatch, RolloutInfo]:
        """The batch, read from the object store by the scorers and the learner; its info, read by the driver."""
        batch = self.gen.generate(req)
        return batch, batch.info()

    def load_weights(self, packet: WeightsPacket, verify: bool = False, after_requests: int | None = None) -> float:
        if packet.buckets and isinstance(packet.buckets[0], ray.ObjectRef):  # from a learner group's rank 0
            packet = replace(packet, buckets=tuple(ray.get(list(packet.buckets))))
        return self.gen.load_weights(packet, verify, after_requests)

    def busy_seconds(self) -> float:
        return self.gen.busy_seconds()

    def leave_order(self) -> None:
        self.gen.leave_order()

    def weights_checksum(self) -> VersionedChecksum:
        return self.gen.weights_checksum()

    def version(self) -> int:
        """The version held after the calls sent before this one (the pool reads it after loads and to drain)."""
        return self.gen.settled_version()

    def join_group(self, addr: str, port: int, rank: int, world: int, timeout_s: float,
                   layouts: tuple[BucketLayout, ...]) -> None:
        self.group = CollectiveGroup(addr, port, rank, world, timeout_s, f"rollout worker {self.gen.worker_index}")
        self.layouts = layouts

    def receive_weights(self, version: int) -> float:
        """Collective transport: the version header, then buckets laid out as agreed at join, from rank 0."""
        header = torch.zeros(1, dtype=torch.long, device=self.group.device)
        self.group.broadcast([header])
        if int(header.item()) != version:
            raise WeightSyncError(f"rollout worker {self.gen.worker_index}: expected weights v{version}, "
                                  f"the learner broadcast v{int(header.item())}")
        buckets = tuple(torch.empty(lay.numel, dtype=lay.dtype, device=self.group.device) for lay in self.layouts)
        self.group.broadcast(buckets)
        return self.gen.load_weights(WeightsPacket(version, self.layouts, buckets, checksum=""))


@ray.remote
class ReferenceWorker:
    def __init__(self, cfg: Config, checkpoint: str):
        init_worker_process(role_threads(cfg, "reference", node_cores()), cfg.reference.nice)
        self.ref = ReferenceLogprobs(checkpoint, cfg.rollout.temperature, cfg.reference.batch_size,
                                     cfg.model.frozen_dtype, max_tokens=cfg.reference.max_tokens_per_micro_batch,
                                     share_prompts=cfg.rollout.share_prompts)

    @ray.method(num_returns=2)
    def logprobs(self, batch: RolloutBatch) -> tuple[RefLogprobs, CallInfo]:
        out = self.ref.logprobs(batch)
        return out, out.info()


@ray.remote
class RewardWorker:
    def __init__(self, cfg: Config, checkpoint: str):
        init_worker_process(role_threads(cfg, "reward", node_cores()), cfg.reward.nice)
        self.scorer = RewardScorer(checkpoint, cfg.reward.missing_eos_score, cfg.reward.batch_size,
                                   cfg.model.frozen_dtype, max_tokens=cfg.reward.max_tokens_per_micro_batch,
                                   share_prompts=cfg.rollout.share_prompts)

    @ray.method(num_returns=2)
    def score(self, batch: RolloutBatch) -> tuple[Scores, CallInfo]:
        out = self.scorer.score_rollout(batch)
        return out, out.info()


@ray.remote
class RemoteRewardWorker:
    """The reward role over HTTP (`reward.backend: http`): the driver calls `score` exactly as on `RewardWorker`."""

    def __init__(self, cfg: Config, tokenizer_checkpoint: str):
        init_worker_process(1)
        rc = cfg.reward
        client = RewardClient(rc.url, os.environ.get(rc.token_env) or None, rc.timeout_s, rc.max_retries)
        info = client.model_info()  # fail at start-up, not at the first batch, if the service is unusable
        log.info("reward service %s: model %s (%s)", rc.url, info.model.version, info.model.checkpoint)
        self.scorer = RemoteRewardScorer(client, load_tokenizer(tokenizer_checkpoint), rc.missing_eos_score)

    @ray.method(num_returns=2)
    def score(self, batch: RolloutBatch) -> tuple[Scores, CallInfo]:
        out = self.scorer.score_rollout(batch)
        return out, out.info()


class _GroupRank:
    """What a rank of a trainer group (learner, SFT, reward model) does before it works: rank 0 gives the address
    where the group meets, every rank joins it."""

    rank: int
    world: int
    role: str

    def address(self) -> tuple[str, int]:
        """This node's address and a port free on it (asked of rank 0)."""
        return ray.util.get_node_ip_address(), free_port()

    def join(self, addr: str, port: int, timeout_s: float) -> None:
        join_group(addr, port, self.rank, self.world, timeout_s, self.role)


@ray.remote
class LearnerWorker(_GroupRank):
    """Rank `rank` of a learner group of `world` ranks. Alone, the learner is built at once; in a group it is
    built by `join`, once the torch.distributed group is up (FSDP2 shards the models as they are built)."""

    role = "learner"

    def __init__(self, cfg: Config, sft_checkpoint: str, rm_checkpoint: str, rank: int = 0, world: int = 1):
        init_worker_process(role_threads(cfg, "learner", node_cores()))
        self.args, self.rank, self.world = (cfg, sft_checkpoint, rm_checkpoint), rank, world
        self.learner = PPOLearner.from_config(*self.args) if world == 1 else None
        self.group: CollectiveGroup | None = None

    def join(self, addr: str, port: int, timeout_s: float) -> None:
        super().join(addr, port, timeout_s)
        self.learner = PPOLearner.from_config(*self.args)

    def train_step(self, batch: Experience | ShardRefs) -> dict[str, float]:
        """A batch's shards are read here from the object store and joined (a restored batch comes joined)."""
        return self.learner.train_step(read_batch(batch) if isinstance(batch, ShardRefs) else batch)

    def make_packet(self) -> WeightsPacket | None:
        # Buckets as NumPy bytes, which every worker on the node reads from shared memory without a copy; a group's
        # rank 0 puts each bucket in the object store as it fills: it never holds the whole model.
        return self.learner.make_packet(store=(lambda b: ray.put(to_wire(b))) if self.world > 1 else to_wire,
                                        adapters=self.args[0].sync_adapters)

    def weights_checksum(self) -> VersionedChecksum:
        named = (adapter_weights(self.learner.policy) if self.args[0].sync_adapters
                 else self.learner.policy_weights().items())
        return VersionedChecksum(self.learner.version, checksum(named))

    def save(self, out_dir: str) -> None:
        self.learner.save(out_dir)

    def load(self, ckpt_dir: str) -> int:
        return self.learner.load(ckpt_dir)

    def bucket_layouts(self) -> tuple[BucketLayout, ...]:
        """The bucket layout every receiver allocates once; ask for it before joining (joining blocks). In a
        learner group every rank is asked (the full tensors are gathered one at a time, streamed into buckets
        that are dropped as they fill) and rank 0's answer counts; the others return ()."""
        packet = self.learner.make_packet(store=lambda bucket: None)
        return packet.layouts if packet is not None else ()

    def join_group(self, addr: str, port: int, world: int, timeout_s: float,
                   layouts: tuple[BucketLayout, ...]) -> None:
        """Rank 0 of the weight-sync group (rank 0 of a learner group; its other ranks never join). Returns only
        once every worker has joined, so the workers' joins must not wait for this call's result."""
        self.layouts = layouts
        self.group = CollectiveGroup(addr, port, 0, world, timeout_s, "learner")

    def broadcast_weights(self) -> int:
        """Collective transport: header (version), then the flat buckets; returns the version sent. In a learner
        group every rank takes part in gathering the full tensors one at a time; rank 0 broadcasts each bucket
        as soon as it fills, so it never holds more than its shard, one bucket and one tensor."""
        version = self.learner.version
        if self.group is None:  # a rank > 0 of a learner group
            self.learner.make_packet(store=lambda bucket: None)
            return version
        dev = self.group.device
        self.group.broadcast([torch.tensor([version], dtype=torch.long, device=dev)])
        if not self.learner.fsdp:
            self.group.broadcast([b.to(dev) for b in pack(self.learner.policy_weights(), self.layouts)])
            return version
        sent = []

        def send(bucket: torch.Tensor) -> None:
            lay = self.layouts[len(sent)]
            if bucket.numel() != lay.numel or bucket.dtype != lay.dtype:
                raise WeightSyncError(f"learner: bucket {len(sent)} has {bucket.numel()} {bucket.dtype} values, the "
                                      f"workers expect {lay.numel} {lay.dtype} (layout agreed at join)")
            self.group.broadcast([bucket.to(dev)])
            sent.append(len(sent))

        self.learner.make_packet(store=send)
        return version


@ray.remote(num_cpus=0)
class RolloutScaler:
    """Elastic rollout's control channel (`core.scaling.ScaleControl`), a named actor (`scaler_name(run)` in
    namespace `SCALER_NAMESPACE`), not detached: it lives and dies with the driver."""

    def __init__(self, workers: int, weight_sync: str, per_worker: dict[str, float] | None = None):
        self.control = ScaleControl(workers, weight_sync, per_worker)

    def set_desired(self, n: int) -> ScaleStatus:
        return self.control.set_desired(n)

    def get_desired(self) -> int:
        return self.control.status.desired

    def report(self, active: int, starting: int, step: int) -> None:
        self.control.report(active, starting, step)

    def get_status(self) -> ScaleStatus:
        return self.control.status

    def per_worker(self) -> dict[str, float]:
        return self.control.per_worker


# --- offline stages ---------------------------------------------------------------------------------


@ray.remote
class SFTStage(_GroupRank):
    role = "sft"

    def __init__(self, cfg: Config, out_dir: str, resume: bool, rank: int = 0, world: int = 1):
        init_worker_process(cfg.sft.num_cpus)
        self.trainer, self.rank, self.world = SFTTrainer(cfg, Path(out_dir), resume), rank, world

    def run(self) -> dict[str, float]:
        return self.trainer.run()


@ray.remote
class RMStage(_GroupRank):
    def __init__(self, cfg: Config, out_dir: str, sft_checkpoint: str, resume: bool, role: str = "rm",
                 rank: int = 0, world: int = 1):
        init_worker_process(cfg.rm.num_cpus)
        self.trainer, self.rank, self.world = RMTrainer(cfg, Path(out_dir), sft_checkpoint, resume, role), rank, world
        self.role = role

    def run(self) -> dict[str, float]:
        return self.trainer.run()


@ray.remote
def evaluate_task(cfg: Config, sft_checkpoint: str, rm_checkpoint: str, ppo_checkpoint: str | None,
                  out_dir: str, judge_checkpoint: str | None = None) -> dict[str, float]:
    init_worker_process(cfg.eval.num_cpus)
    return evaluate_policies(cfg, sft_checkpoint, rm_checkpoint, ppo_checkpoint, Path(out_dir), judge_checkpoint)
