"""A learner group on Ray (`ppo.learner_workers`): N ranks, one torch.distributed group formed by the driver,
policy and critic sharded with FSDP2 (gloo on CPU).

The plain sharded learner is proven equal to one process in `test_sharding.py`; here the same on the real
topology: a whole PPO run with 2 ranks ends with the weights of a 1-rank run, a dead rank is named, a rank that
never joins is a timeout naming it, never a hang.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from rayrlhf.core.config import load_config
from rayrlhf.pipeline.driver import PPODriver
from rayrlhf.pipeline.launch import RankGroup, role_bundles

# 5 actors of 1 CPU would not fit the tests' 4-CPU Ray: the scorers and the rollout share.
OVERRIDES = ["ppo.steps=3", "ppo.max_staleness=1", "ppo.checkpoint_every=0", "ppo.sync_timeout_s=120",
             "ppo.num_cpus=1", "rollout.num_cpus=0.5", "reward.num_cpus=0.5", "reference.num_cpus=0.5"]


# --- config and placement ----------------------------------------------------------------------------

def test_learner_workers_must_split_every_minibatch():
    with pytest.raises(ValueError, match=r"ppo.minibatch_size \(6\) must be a positive multiple of "
                                         r"ppo.learner_workers \(4\)"):
        load_config(None, ["ppo.prompts_per_step=3", "ppo.minibatch_size=6", "ppo.micro_batch_size=2",
                           "ppo.learner_workers=4"])
    # the weight-sync group is a process group of its own, beside a rank's FSDP group
    assert load_config(None, ["ppo.learner_workers=2", "ppo.weight_sync=collective",
                              "model.mixed_precision=bf16"]).ppo.weight_sync == "collective"


def test_a_learner_group_takes_one_bundle_per_rank_first():
    cfg = load_config(None, ["ppo.learner_workers=2", "ppo.num_cpus=3", "ppo.num_gpus=1"])
    bundles = role_bundles(cfg)
    assert list(bundles)[0] == "learner"  # packed before the other roles fill the nodes
    assert bundles["learner"] == [{"CPU": 3, "GPU": 1}, {"CPU": 3, "GPU": 1}]


# --- the real topology ---------------------------------------------------------------------------------

def _run(cfg, run: Path, ckpts) -> dict:
    driver = PPODriver(cfg, run / "ppo", ckpts.sft, ckpts.rm)
    try:
        return driver.run()
    finally:
        driver.close()


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


def _metrics(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "ppo" / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k.startswith(("ppo/", "reward/"))} for r in rows]


@pytest.mark.slow
@pytest.mark.outside_ci  # CI: a dead learner ends the run naming it (test_faults.py, the restart-budget test)
def test_a_dead_learner_rank_ends_the_run_naming_it(ray_local, make_tiny_cfg, tiny_checkpoints, tmp_path):
    import ray

    cfg = make_tiny_cfg(*OVERRIDES, "ppo.learner_workers=2", "ppo.steps=4", "ppo.checkpoint_every=1")
    driver = PPODriver(cfg, tmp_path / "run" / "ppo", tiny_checkpoints.sft, tiny_checkpoints.rm)
    learn = driver.learn

    def kill_rank_1_then_learn(exp):
        if exp.batch_id == 2:
            ray.kill(driver.roles.learner.ranks[1], no_restart=True)
        return learn(exp)

    driver.learn = kill_rank_1_then_learn
    try:
        with pytest.raises(RuntimeError,
                           match=r"learner rank 1 on node \w+ \(.*\) died .*the last checkpoint is .*step-000002"):
            driver.run()
    finally:
        driver.close()


@pytest.mark.slow
def test_a_rank_that_never_joins_is_a_timeout_naming_it(ray_local):
    import ray

    from rayrlhf.core.sharding import free_port, join_group
    from rayrlhf.pipeline.calls import RoleTimeout

    @ray.remote(num_cpus=0)
    class Rank:
        def __init__(self, rank: int, hang: bool):
            self.rank, self.hang = rank, hang

        def address(self):
            return "127.0.0.1", free_port()

        def join(self, addr, port, timeout_s):
            if self.hang:
                time.sleep(3600)
            join_group(addr, port, self.rank, 2, timeout_s)

    group = RankGroup([Rank.remote(0, False), Rank.remote(1, True)])
    ray.get([r.__ray_ready__.remote() for r in group.ranks])  # started, as the driver awaits before rendezvous
    t0 = time.monotonic()
    try:
        with pytest.raises(RoleTimeout, match=r"^learner rank 1 did not join the learner group at 127.0.0.1:\d+ "
                                              r"within ray.startup_timeout_s=3"):
            group.rendezvous(3)
    finally:
        group.kill()
    assert time.monotonic() - t0 < 30


# --- replicated scorers and vLLM tensor parallel: config and placement ------------------------------------

def test_scorer_replicas_take_a_bundle_each():
    cfg = load_config(None, ["reference.replicas=2", "reward.replicas=3", "reward.num_gpus=1"])
    bundles = role_bundles(cfg)
    assert bundles["reference"] == [{"CPU": 1}] * 2 and bundles["reward"] == [{"CPU": 1, "GPU": 1}] * 3
    with pytest.raises(ValueError, match=r"reward.replicas 2 needs reward.backend local"):
        load_config(None, ["reward.replicas=2", "reward.backend=http", "reward.url=http://127.0.0.1:8000"])
    with pytest.raises(ValueError, match=r"ray.num_cpus 4 is less than the 6 CPUs"):
        load_config(None, ["ray.num_cpus=4", "reference.replicas=2", "reward.replicas=2"])


def test_vllm_tensor_parallel_sizes_the_bundle_and_the_engine():
    from rayrlhf.roles.vllm_backend import engine_args

    cfg = load_config(None, ["rollout.backend=vllm", "rollout.tensor_parallel_size=2", "rollout.num_gpus=2",
                             "rollout.num_workers=2"])
    assert role_bundles(cfg)["rollout"] == [{"CPU": 1, "GPU": 2}] * 2
    on_gpu = engine_args(cfg.rollout, 2048, on_gpu=True)
    assert on_gpu["tensor_parallel_size"] == 2 and on_gpu["distributed_executor_backend"] == "mp"
    with pytest.raises(ValueError, match="needs GPUs"):
        engine_args(cfg.rollout, 2048, on_gpu=False)
    alone = engine_args(load_config(None, ["rollout.backend=vllm"]).rollout, 2048, on_gpu=False)
    assert alone["distributed_executor_backend"] == "uni" and "tensor_parallel_size" not in alone
    with pytest.raises(ValueError, match=r"rollout.tensor_parallel_size 2 needs rollout.num_gpus 2 \(got 1\)"):
        load_config(None, ["rollout.backend=vllm", "rollout.tensor_parallel_size=2", "rollout.num_gpus=1"])
    with pytest.raises(ValueError, match=r"rollout.tensor_parallel_size 2 needs rollout.backend vllm"):
        load_config(None, ["rollout.tensor_parallel_size=2", "rollout.num_gpus=2"])


@pytest.mark.slow
# CI (5 minutes of it here): a learner group of two in a driver run in test_resume.py (killed and resumed), N ranks
# == 1 on the plain learner in test_sharding.py, the collective transport in test_weight_sync.py, a killed reward
# scorer in test_faults.py
@pytest.mark.outside_ci
def test_a_learner_group_with_scorer_replicas_trains_as_one_learner_through_a_dead_reward_replica(
        ray_local, make_tiny_cfg, tiny_checkpoints, tmp_path, capsys):
    """2 learner ranks syncing weights to 2 rollout workers over the collective transport, 2 reference and 2 reward
    replicas, a reward replica killed before batch 2 (restarted by Ray, its shard scored again, once) against one
    learner with the same scorers syncing through the object store, uninterrupted.
    Same batches (same seeds, same weight versions), so the runs differ only by the float order of the sharded
    reductions: the exported policy and critic of N = 2 equal N = 1's within 1e-5, and so do the logged figures.
    (RLOO and LoRA are covered on the plain learner in test_sharding.py; that re-dispatched work changes
    nothing, to the bit, in test_faults.py.)"""
    import ray

    sizes = [*OVERRIDES, "ppo.steps=4", "rollout.num_workers=2", "reference.replicas=2", "reward.replicas=2",
             "reference.num_cpus=0.25", "reward.num_cpus=0.25"]
    one, two = tmp_path / "n1", tmp_path / "n2"
    assert _run(make_tiny_cfg(*sizes), one, tiny_checkpoints)["ppo/steps"] == 4

    # the group's rank 0 broadcasts the weights it gathers with its peers, bucket by bucket, over the gloo
    # weight-sync group (the 1-rank run syncs through the object store)
    driver = PPODriver(make_tiny_cfg(*sizes, "ppo.learner_workers=2", "ppo.weight_sync=collective"), two / "ppo",
                       tiny_checkpoints.sft, tiny_checkpoints.rm)
    dispatch = driver.dispatch
    scorers_of_batch = {}

    def kill_then_dispatch(batch_id: int, version: int):
        if batch_id == 2:
            ray.kill(driver.roles.rewards[1], no_restart=False)
        flight = dispatch(batch_id, version)
        scorers_of_batch[batch_id] = {driver.roles.name_of(s.reward_actor) for s in flight.shards}
        return flight

    driver.dispatch = kill_then_dispatch
    try:
        summary = driver.run()
    finally:
        driver.close()
    assert summary["ppo/steps"] == 4 and summary["ledger/consumed_batches"] == 4
    assert all(names == {"reward scorer replica 0", "reward scorer replica 1"} for names in scorers_of_batch.values())
    diffs = {}
    for part in ("checkpoint", "critic"):
        a, b = _weights(one / "ppo" / part), _weights(two / "ppo" / part)
        assert a.keys() == b.keys()
        diffs[part] = max((a[k] - b[k]).abs().max().item() for k in a)
    assert max(diffs.values()) <= 1e-5, diffs
    for m1, m2 in zip(_metrics(one), _metrics(two), strict=True):
        assert m1.keys() == m2.keys()
        for k in m1:
            assert m2[k] == pytest.approx(m1[k], rel=1e-4, abs=1e-5), k
    audit = json.loads((two / "ppo" / "ledger.json").read_text())["audit"]
    assert audit["ok"] and audit["consumed"] == 4
    assert {r["role"] for r in audit["redispatched"]} <= {"reward"}
    with capsys.disabled():
        print(f"\n4 PPO steps, learner_workers 2 over the collective transport (reward replica 1 killed before "
              f"batch 2: "
              f"{len(audit['redispatched'])} reward call(s) again) vs 1: max abs diff of the exported weights {diffs}")
