"""The PPO driver's pure logic in milliseconds, on fake handles: staleness gate, prompt order, rollout-pool
reconcile, and the classification of a batch's failures. No Ray cluster, no model."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
from ray.exceptions import RayActorError, RayTaskError

from rayrlhf.core.experience import VersionMismatch
from rayrlhf.pipeline.inflight import ShardFailure, classify_failures
from rayrlhf.pipeline.pool import EventLog, RolloutPool
from rayrlhf.pipeline.schedule import PromptSource, StalenessGate

# --- staleness gate and prompt order ----------------------------------------------------------------


def test_gate_admits_up_to_max_staleness_batches_ahead_of_the_published_version():
    sync, one_off = StalenessGate(0), StalenessGate(1)
    assert [b for b in range(4) if sync.admits(b)] == [0]
    assert [b for b in range(4) if one_off.admits(b)] == [0, 1]
    one_off.publish(2)
    assert [b for b in range(5) if one_off.admits(b)] == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="went backwards: 2 -> 1"):
        one_off.publish(1)


@pytest.mark.parametrize("versions, stale_tokens, regenerated, again", [
    ({2: 5, 3: 4}, "mask", False, False),  # every token within the bound at v3 (max_staleness 1)
    ({2: 5, 3: 4}, "regenerate", False, False),
    ({1: 5, 2: 4}, "mask", False, False),  # v1's tokens past it: masked
    ({1: 5, 2: 4}, "regenerate", False, True),  # ... or generated again
    ({1: 5, 2: 4}, "regenerate", True, False),  # once: late again, masked
    ({0: 3, 1: 9}, "mask", False, True),  # no token within it: it would train nothing
    ({1: 9}, "regenerate", True, True),  # even after a first regeneration
])
def test_a_streamed_shard_goes_again_when_its_tokens_are_past_the_bound(versions, stale_tokens, regenerated, again):
    gate = StalenessGate(1, version=3)
    assert gate.goes_again(versions, stale_tokens, regenerated) is again


def test_prompt_order_is_a_function_of_the_batch_and_each_pass_covers_every_prompt_once():
    src = PromptSource([[i] for i in range(10)], per_step=3, seed=7)
    first_pass = [i for b in range(3) for i in src.batch(b)]  # 10 // 3 = 3 batches a pass
    assert sorted(first_pass) == sorted(set(first_pass)) and len(first_pass) == 9
    assert src.batch(1) == PromptSource([[i] for i in range(10)], 3, seed=7).batch(1)  # resumable: no state
    assert src.batch(3) != src.batch(0) or src.batch(4) != src.batch(1)  # the next pass is reshuffled
    assert PromptSource([[i] for i in range(10)], 3, seed=8).batch(0) != src.batch(0)
    with pytest.raises(ValueError, match="prompts_per_step 11 exceeds the 10 PPO prompts"):
        PromptSource([[i] for i in range(10)], per_step=11, seed=0)


# --- failure classification -------------------------------------------------------------------------


def test_a_dead_actor_is_work_to_redo_and_the_calls_chained_on_it_go_again_with_it():
    died = RayActorError()
    errors = [("rollout", 0, died),  # worker of shard 0 died ...
              ("reference", 0, RayTaskError("logprobs", "tb", died)),  # ... so its scoring failed too
              ("reward", 0, RayTaskError("score", "tb", died)),
              ("reward", 1, RayActorError())]  # the reward actor died under shard 1
    failed = classify_failures(3, errors)
    assert failed == {0: ShardFailure("rollout", str(died)), 1: ShardFailure("reward", str(died))}


def test_a_restarted_worker_without_the_weights_is_work_to_redo():
    mismatch = VersionMismatch("rollout worker 0 holds policy v0, batch 2 needs v1")
    assert classify_failures(2, [("rollout", 0, mismatch)]) == {
        0: ShardFailure("rollout", "rollout worker 0 holds policy v0, batch 2 needs v1")}


def test_any_other_error_ends_the_run_naming_role_batch_and_shard():
    with pytest.raises(RuntimeError, match=r"reward of batch 3 shard 1 failed: ValueError\('bad score'\)"):
        classify_failures(3, [("reward", 1, RayTaskError("score", "tb", ValueError("bad score")))])


# --- rollout pool on fake handles -------------------------------------------------------------------


@dataclass
class FakeRef:
    """What a fake `.remote()` returns: a value, whether it has resolved, and the error a get would raise."""

    value: object = None
    ready: bool = True
    error: str | None = None


class LiveRef:
    """The ref of a worker's `version` call: resolves once the worker has started and has no call queued."""

    def __init__(self, worker: FakeWorker):
        self.worker = worker

    @property
    def value(self) -> int:
        return self.worker.held

    @property
    def ready(self) -> bool:
        return self.worker.started and not self.worker.busy

    @property
    def error(self) -> str | None:
        return "ActorDiedError: no GPU" if self.worker.fails else None


class FakeMethod:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args, **kwargs) -> FakeRef:
        return self.fn(*args, **kwargs)


class FakeWorker:
    def __init__(self, index: int, started: bool = True, fails: bool = False):
        self.index, self.started, self.fails, self.held, self.busy = index, started, fails, 0, False
        self.load_weights = FakeMethod(self._load)
        self.version = FakeMethod(lambda: LiveRef(self))

    def _load(self, packet: int, verify: bool = False) -> FakeRef:
        assert verify  # a joining worker's weights are checksummed
        self.held = packet
        return FakeRef(0.01)

    def __repr__(self) -> str:
        return f"FakeWorker({self.index})"


class FakeLearner:
    def __init__(self, version: int):
        self.version = version

    def packet(self):  # the packet stands for the weights of `version`
        return self.version


class FakeCalls:
    def __init__(self):
        self.killed: list[FakeWorker] = []

    def get(self, refs, what: str):
        return [r.value for r in refs] if isinstance(refs, list) else refs.value

    def ready(self, ref: FakeRef) -> bool:
        return ref.ready

    def start_error(self, ready: FakeRef) -> str | None:
        return ready.error

    def kill(self, handle: FakeWorker) -> None:
        self.killed.append(handle)

    def free(self) -> dict[str, float]:
        return {}


def _pool(tmp_path, launched: list, **worker_kwargs) -> tuple[RolloutPool, FakeCalls]:
    def launch(index: int) -> FakeWorker:
        launched.append(FakeWorker(index, started=False, **worker_kwargs))
        return launched[-1]

    calls = FakeCalls()
    return RolloutPool([FakeWorker(0)], launch, calls, EventLog(tmp_path), sync_timeout_s=60), calls


def _events(tmp_path) -> list[tuple]:
    rows = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    return [(r["step"], r["event"], r["worker"]) for r in rows]


def test_pool_starts_a_worker_without_waiting_and_lets_it_join_only_with_the_current_weights(tmp_path):
    launched: list[FakeWorker] = []
    pool, _ = _pool(tmp_path, launched)
    assert pool.reconcile(2, step=3, version=3, next_batch=4, learner=FakeLearner(3)) == 0
    assert [w.index for w in pool.active] == [0] and [w.index for w in pool.starting] == [1]
    assert pool.reconcile(2, step=4, version=4, next_batch=5, learner=FakeLearner(4)) == 0  # still starting
    assert len(pool.active) == 1 and not launched[0].held
    launched[0].started = True
    assert pool.reconcile(2, step=5, version=5, next_batch=6, learner=FakeLearner(5)) == 0
    assert pool.handles() == [pool.active[0].handle, launched[0]] and launched[0].held == 5
    assert pool.awaiting_first_batch == {1: 5}
    assert _events(tmp_path) == [(4, "worker_starting", 1), (6, "worker_joined", 1)]


def test_pool_removes_a_worker_only_after_its_batches_are_collected_and_its_calls_ended(tmp_path):
    launched: list[FakeWorker] = []
    pool, calls = _pool(tmp_path, launched)
    pool.reconcile(2, step=0, version=0, next_batch=1, learner=FakeLearner(0))
    launched[0].started = True
    pool.reconcile(2, step=1, version=1, next_batch=2, learner=FakeLearner(1))
    launched[0].busy = True  # a generate still queued on it
    pool.reconcile(1, step=2, version=2, next_batch=4, learner=FakeLearner(2))  # batches <= 3 may hold its shards
    assert [w.index for w in pool.active] == [0] and [w.index for w in pool.retiring] == [1]
    pool.reconcile(1, step=3, version=3, next_batch=5, learner=FakeLearner(3))  # batch 3 not collected yet
    pool.reconcile(1, step=4, version=4, next_batch=6, learner=FakeLearner(4))  # collected, but still busy
    assert calls.killed == [] and pool.retiring
    launched[0].busy = False
    pool.reconcile(1, step=5, version=5, next_batch=7, learner=FakeLearner(5))
    assert calls.killed == [launched[0]] and not pool.retiring and pool.index_of(pool.handles()[0]) == 0
    assert _events(tmp_path)[-2:] == [(3, "worker_draining", 1), (6, "worker_removed", 1)]


def test_pool_counts_a_worker_that_failed_to_start_and_cancels_one_never_joined(tmp_path):
    launched: list[FakeWorker] = []
    pool, calls = _pool(tmp_path, launched, fails=True)
    pool.reconcile(3, step=0, version=0, next_batch=1, learner=FakeLearner(0))
    launched[0].started = True  # its constructor raised
    assert pool.reconcile(3, step=1, version=1, next_batch=2, learner=FakeLearner(1)) == 1
    assert len(pool.active) == 1 and [w.index for w in pool.starting] == [2, 3]  # replaced, not joined
    pool.reconcile(1, step=2, version=2, next_batch=3, learner=FakeLearner(2))
    assert not pool.starting and calls.killed == [launched[2], launched[1]]
    assert (2, "worker_failed", 1) in _events(tmp_path) and (3, "worker_removed", 3) in _events(tmp_path)


def test_a_started_worker_without_room_is_reported_at_once(tmp_path):
    launched: list = []

    def launch(index: int) -> FakeWorker:
        launched.append(FakeWorker(index, started=False))
        return launched[-1]

    calls = FakeCalls()
    calls.free = lambda: {"CPU": 1.0}
    pool = RolloutPool([FakeWorker(0)], launch, calls, EventLog(tmp_path), 60, per_worker={"CPU": 1.0})
    pool.reconcile(3, step=2, version=2, next_batch=3, learner=FakeLearner(2))
    rows = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert [(r["event"], r["worker"]) for r in rows] == [
        ("worker_starting", 1), ("worker_starting", 2), ("worker_unplaced", 2)]
    assert rows[-1]["asks"] == {"CPU": 1.0} and rows[-1]["free"] == {"CPU": 1.0} and rows[-1]["step"] == 3


def test_a_checkpoint_from_before_newer_config_keys_still_resumes():
    """A PPO checkpoint records the config it ran with; a key added to rayrlhf since (here rollout.lora_sync) takes
    its default when the two are compared, while a real difference is still found. Where the roles run and how
    often a lost learner is replaced are not part of what a resume must share."""
    from rayrlhf.core.config import load_config
    from rayrlhf.pipeline.driver import _resumable_config, _saved_config
    from rayrlhf.pipeline.preflight import config_differences

    cfg = load_config(None, [])
    old = _resumable_config(cfg)
    del old["rollout"]["lora_sync"]
    assert config_differences(_saved_config(old), _resumable_config(cfg)) == []
    assert config_differences(_saved_config(old), _resumable_config(load_config(None, ["ppo.lr=0.5"]))) != []
    moved = load_config(None, ["ppo.max_learner_restarts=5", "ppo.resources={learner_node: 1}"])
    assert _resumable_config(moved) == _resumable_config(cfg)
