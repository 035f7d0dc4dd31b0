"""Fault scenarios on the real Ray topology at tiny size: actors killed mid-run, a peer that hangs, NaN.

A killed rollout worker, reference or reward actor is restarted by Ray; the driver dispatches its lost work
again, once, with the same request, seed and weight version, so the run ends with exactly the weights of an
uninterrupted run. Printed figures feed the fault-scenario table in docs/fault-tolerance.md.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from rayrlhf.pipeline.driver import PPODriver
from rayrlhf.pipeline.launch import launch_roles

pytestmark = pytest.mark.slow

STEPS = 5
# Two rollout workers: only the killed one's shard may go again.
OVERRIDES = [f"ppo.steps={STEPS}", "ppo.max_staleness=1", "rollout.num_workers=2", "rollout.num_cpus=0.5",
             "reward.num_cpus=0.5", "reference.num_cpus=0.5", "ppo.checkpoint_every=0", "ppo.sync_timeout_s=60"]


def killing(driver: PPODriver, kills: dict[str, int]) -> PPODriver:
    """`driver`, made to kill roles (as a crash would: Ray may restart them) just before it dispatches a batch:
    `kills` maps a victim (rollout, reference, reward, learner: the first of its role's handles) to that batch."""
    import ray

    earlier: list = []  # every call of the batches dispatched so far
    dispatch = driver.dispatch

    def kill_then_dispatch(batch_id: int, version: int):
        victims = [victim for victim, at_batch in kills.items() if at_batch == batch_id]
        if victims:
            # Earlier batches finish first, so each kill takes exactly the calls of its batch and later ones.
            ray.wait(earlier, num_returns=len(earlier), timeout=120)
            roles = driver.roles
            first = {"rollout": roles.rollouts[0], "reference": roles.references[0], "reward": roles.rewards[0],
                     "learner": roles.learner.ranks[0]}
            for victim in victims:
                ray.kill(first[victim], no_restart=False)
        flight = dispatch(batch_id, version)
        earlier.extend(flight.infos())
        return flight

    driver.dispatch = kill_then_dispatch
    return driver


def _with_reward(make_actor):
    """A launcher whose reward scorer is `make_actor(cfg, rm_checkpoint)` instead of the real one."""
    import ray

    def launch(cfg, sft_checkpoint, rm_checkpoint, run_name):
        roles = launch_roles(cfg, sft_checkpoint, rm_checkpoint, run_name)
        for a in roles.rewards:
            ray.kill(a)
        return replace(roles, rewards=(make_actor(cfg, rm_checkpoint),))

    return launch


def _run(driver: PPODriver) -> dict:
    try:
        return driver.run()
    finally:
        driver.close()


def _policy(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run / "ppo" / "checkpoint" / "model.safetensors")


@pytest.fixture(scope="module")
def uninterrupted(ray_local, make_tiny_cfg, tiny_checkpoints, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("faults") / "whole"
    _run(PPODriver(make_tiny_cfg(*OVERRIDES), run / "ppo", tiny_checkpoints.sft, tiny_checkpoints.rm))
    return run


# One run kills a role before each of three batches (one run, not three: each costs a minute of CI).
KILLS = {"rollout": 1, "reference": 2, "reward": 3}


def test_killed_actors_are_restarted_and_their_work_dispatched_again_once(uninterrupted, make_tiny_cfg,
                                                                         tiny_checkpoints, tmp_path, capsys):
    run = tmp_path / "killed"
    driver = PPODriver(make_tiny_cfg(*OVERRIDES), run / "ppo", tiny_checkpoints.sft, tiny_checkpoints.rm)
    summary = _run(killing(driver, KILLS))
    assert summary["ppo/steps"] == STEPS

    a, b = _policy(uninterrupted), _policy(run)
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert diff == 0.0  # the re-dispatched work is the work that was lost, nothing more

    ledger = json.loads((run / "ppo" / "ledger.json").read_text())
    audit = ledger["audit"]
    assert audit["ok"] and audit["consumed"] == STEPS
    events = [json.loads(line) for line in (run / "ppo" / "events.jsonl").read_text().splitlines()]
    again = [e for e in events if e["event"].endswith("_redispatched")]
    per_call = {(r["batch"], r["shard"], r["role"]) for r in audit["redispatched"]}
    assert len(per_call) == len(audit["redispatched"]) == len(again)  # each lost call went again exactly once
    redone = {role: [(r["batch"], r["shard"], r.get("failed_worker")) for r in audit["redispatched"] if r["role"] == role]
              for role in KILLS}
    assert set(redone) == set(KILLS) and all(redone.values()), redone  # every kill cost its role some work
    # The killed rollout worker restarts holding the SFT weights; the batch it owed was dispatched again to it, and
    # only its shard: worker 1's shards were each generated once. The next batch, already queued on worker 0 when
    # the loss was found, may also go again, depending on whether the weight sync sent to the restarting actor got
    # through before it (a version mismatch then) — never anything of worker 1.
    at = KILLS["rollout"]
    assert redone["rollout"][0] == (at, 0, 0) and set(redone["rollout"]) <= {(at, 0, 0), (at + 1, 0, 0)}
    for batch in ledger["batches"]:
        assert [s["outcome"] for s in batch["shards"] if s["shard"] == 1] == ["generated"]
    # A reference/reward call is only sent to the actor once its rollout exists, so a call queued behind the kill
    # may either fail (then it goes again) or reach the restarted actor; both end with the same weights. A call of
    # the batch before may still be queued there too: one step off policy, it is not waited for (nor is a call that
    # was itself dispatched again after the previous kill).
    for role in ("reference", "reward"):
        assert min(b for b, _, _ in redone[role]) >= KILLS[role] - 1, (role, redone[role])
    with capsys.disabled():
        print(f"\nkilled {KILLS} (victim: batch before whose dispatch it died): run completed, max abs diff to "
              f"uninterrupted {diff}, re-dispatched {audit['redispatched']}")


def test_actor_that_cannot_restart_ends_the_run_naming_it(ray_local, make_tiny_cfg, tiny_checkpoints, tmp_path):
    cfg = make_tiny_cfg(*OVERRIDES, "ppo.max_actor_restarts=0")
    driver = killing(PPODriver(cfg, tmp_path / "run" / "ppo", tiny_checkpoints.sft, tiny_checkpoints.rm),
                     {"rollout": 2})
    with pytest.raises(RuntimeError, match=r"rollout worker 0 died and Ray did not restart it \(ppo.max_actor_restarts=0\)"):
        _run(driver)


@pytest.mark.outside_ci  # CI: the same death (the learner is never restarted by Ray) in the restart-budget test below
def test_a_dead_learner_ends_the_run_pointing_at_the_last_checkpoint(ray_local, make_tiny_cfg, tiny_checkpoints,
                                                                     tmp_path):
    cfg = make_tiny_cfg(*OVERRIDES, "ppo.checkpoint_every=1", "rollout.num_workers=1")
    driver = killing(PPODriver(cfg, tmp_path / "run" / "ppo", tiny_checkpoints.sft, tiny_checkpoints.rm),
                     {"learner": 3})
    with pytest.raises(RuntimeError, match=r"learner .* failed: an actor died.*the last checkpoint is .*step-00000[12]"):
        _run(driver)


def test_learner_deaths_beyond_the_restart_budget_end_the_run_naming_the_node_and_the_resume(
        ray_local, make_tiny_cfg, tiny_checkpoints, tmp_path, monkeypatch):
    """The learner dies before its update on batch 1 in every attempt: the run goes on once from its step-1
    checkpoint by itself (ppo.max_learner_restarts=1), then stops with one line naming the learner's node, the
    budget used and the command that resumes it."""
    import re
    import shutil

    import ray

    from rayrlhf.pipeline.launch import LearnerLost
    from rayrlhf.pipeline.run_dir import RunDir
    from rayrlhf.pipeline.workflow import ppo

    learn = PPODriver.learn

    def die_then_learn(self, flight):
        if flight.batch_id == 1:
            ray.kill(self.roles.learner.ranks[0], no_restart=True)
        return learn(self, flight)

    monkeypatch.setattr(PPODriver, "learn", die_then_learn)
    cfg = make_tiny_cfg(*OVERRIDES, "ppo.max_staleness=0", "ppo.checkpoint_every=1", "rollout.num_workers=1",
                        "ppo.max_learner_restarts=1", "ppo.steps=3")
    run = RunDir.create(cfg, tmp_path / "run")
    shutil.copytree(tiny_checkpoints.sft, run.checkpoint("sft"))
    shutil.copytree(tiny_checkpoints.rm, run.checkpoint("rm"))
    with pytest.raises(LearnerLost) as e:
        ppo(cfg, run)
    message = str(e.value)
    print(message)
    assert "\n" not in message
    assert re.match(r"learner on node [0-9a-f]{12} \([0-9.]+; Ray reports it alive\) died \(", message), message
    assert "failed: an actor died" in message, message
    assert message.endswith(f"the last checkpoint is {run.path}/ppo/checkpoints/step-000001; `rayrlhf ppo --resume "
                            f"{run.path}` continues the PPO stage) [ppo.max_learner_restarts=1 used]"), message
    events = [json.loads(line) for line in (run.path / "ppo" / "events.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events if e["event"] in ("learner_lost", "resumed")] == [
        "learner_lost", "resumed", "learner_lost"]


def test_a_batch_whose_reward_scorer_hangs_times_out_naming_the_calls(ray_local):
    """`collect` on a batch of 2 shards of fake actors, the reward scorer hanging: past ppo.sync_timeout_s a
    timeout naming each shard's reward call (and no other)."""
    import ray
    from types import SimpleNamespace

    from rayrlhf.pipeline.inflight import ROLES, InFlight, ShardCalls

    @ray.remote(num_cpus=0)
    class Role:
        @ray.method(num_returns=2)
        def generate(self, request):
            return request, "rollout info"

        @ray.method(num_returns=2)
        def logprobs(self, rollout):
            return rollout, "reference info"

        @ray.method(num_returns=2)
        def score(self, rollout):
            time.sleep(3600)

    worker, reference, reward = (Role.remote() for _ in range(3))
    ray.get([a.__ray_ready__.remote() for a in (worker, reference, reward)])  # started: the timeout times calls only
    shards = [ShardCalls(request=s, worker=worker, reference_actor=reference, reward_actor=reward) for s in range(2)]
    for shard in shards:
        for role in ROLES:
            shard.dispatch(role)
    ray.get([call for shard in shards for call in (shard.rollout_info, shard.reference_info)])  # the timeout times the reward's
    driver = SimpleNamespace(pc=SimpleNamespace(sync_timeout_s=3.0, max_actor_restarts=1),
                             pool=SimpleNamespace(index_of=lambda w: 0))
    with pytest.raises(TimeoutError, match=r"^batch 0: reward of shard 0, reward of shard 1 did not finish within "
                                           r"ppo.sync_timeout_s=3.0s$"):
        PPODriver.collect(driver, InFlight(batch_id=0, version=0, shards=shards))
    for a in (worker, reference, reward):
        ray.kill(a)


# Outside CI (its 25 minutes): the same timeout on a real PPO run; CI's is the fake actors' test above.
@pytest.mark.outside_ci
def test_a_hanging_reward_scorer_times_out_naming_it(ray_local, make_tiny_cfg, tiny_checkpoints, tmp_path):
    import ray

    @ray.remote(num_cpus=0)
    class HangingReward:
        @ray.method(num_returns=2)
        def score(self, batch):
            time.sleep(3600)

    cfg = make_tiny_cfg(*OVERRIDES, "ppo.sync_timeout_s=8")
    launcher = _with_reward(lambda cfg, rm: HangingReward.remote())
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=r"batch 0: reward of shard 0, reward of shard 1 did not finish within "
                                           r"ppo.sync_timeout_s=8.0s"):
        _run(PPODriver(cfg, tmp_path / "run" / "ppo", tiny_checkpoints.sft, tiny_checkpoints.rm, launcher=launcher))
    assert time.monotonic() - t0 < 120


def test_nan_reward_stops_the_step_and_keeps_the_last_good_checkpoint(ray_local, make_tiny_cfg, tiny_checkpoints,
                                                                       tmp_path):
    """A NaN score at step 4 ends the run before any update; the step-2 checkpoint stays the latest, intact."""
    import ray

    from rayrlhf.roles.reward import RewardScorer

    @ray.remote(num_cpus=0)
    class NaNAfter:
        def __init__(self, cfg, checkpoint: str):
            self.scorer = RewardScorer(checkpoint, cfg.reward.missing_eos_score)

        @ray.method(num_returns=2)  # as the reward role's: the scores, and the info the driver reads
        def score(self, batch):
            out = self.scorer.score_rollout(batch)
            if batch.batch_id >= 3:
                out.scores[0] = float("nan")
            return out, out.info()

    launcher = _with_reward(lambda cfg, rm: NaNAfter.remote(cfg, rm))
    cfg = make_tiny_cfg(*OVERRIDES, "ppo.checkpoint_every=2", "rollout.num_workers=1")
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match=r"PPO step 4 stopped: .*non-finite reward scores in batch 3.*"
                                           r"the last checkpoint is .*step-000002"):
        _run(PPODriver(cfg, run / "ppo", tiny_checkpoints.sft, tiny_checkpoints.rm, launcher=launcher))
    latest = run / "ppo" / "checkpoints" / "latest"
    assert latest.read_text() == "step-000002"
    state = json.loads((run / "ppo" / "checkpoints" / "step-000002" / "driver_state.json").read_text())
    assert state["version"] == 2 and not (run / "ppo" / "checkpoint").exists()


def test_weight_sync_waits_once_for_every_worker_and_names_the_ones_that_hang(ray_local):
    """`await_sync` on loads of fake workers: the load times of all, in worker order; past ppo.sync_timeout_s
    a timeout naming only the workers whose load did not finish."""
    import ray
    from types import SimpleNamespace

    from rayrlhf.pipeline.driver import PendingLoad

    @ray.remote(num_cpus=0)
    class Loader:
        def load(self, seconds: float) -> float:
            time.sleep(seconds)
            return seconds

    workers = [Loader.remote() for _ in range(3)]
    ray.get([w.__ray_ready__.remote() for w in workers])  # started: the timeouts below time loads only
    driver = SimpleNamespace(pc=SimpleNamespace(sync_timeout_s=5.0, weight_sync="object_store"),
                             pool=SimpleNamespace(index_of=workers.index))
    loads = [PendingLoad(w, w.load.remote(s)) for w, s in zip(workers, (0.2, 0.0, 0.1))]
    assert PPODriver.await_sync(driver, loads) == [0.2, 0.0, 0.1]
    assert PPODriver.await_sync(driver, []) == []

    driver.pc.sync_timeout_s = 1.0
    loads = [PendingLoad(w, w.load.remote(s)) for w, s in zip(workers, (0.0, 30.0, 30.0))]
    with pytest.raises(TimeoutError, match=r"^weight sync to rollout worker\(s\) 1, 2 did not finish within "
                                           r"ppo.sync_timeout_s=1.0s$"):
        PPODriver.await_sync(driver, loads)
    for w in workers:
        ray.kill(w)
