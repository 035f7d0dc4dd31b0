"""Elastic rollout on CPU: a rollout worker joins a running PPO job, gets the current weights, produces, leaves.

On CPU a tiny PPO step takes about a second, less than a new worker needs to start (import torch, load the
model); on a real run the steps are the long part. So the driver here begins each step when the test allows
it, and before a step waits for any worker it is starting (`SteppedDriver`): the join, the first batch and the
removal land at known steps. The rest is the real driver on the real Ray topology, scaled through the
`rayrlhf scale` command.
"""

from __future__ import annotations

import json
import threading
from collections import Counter

import pytest

from rayrlhf.pipeline.cli import main
from rayrlhf.actors import RolloutScaler
from rayrlhf.core.scaling import SCALER_NAMESPACE, scaler_name
from rayrlhf.pipeline.driver import PPODriver
from rayrlhf.core.experience import BatchInfo
from rayrlhf.core.metrics import read_metrics

pytestmark = pytest.mark.slow

STEPS = 8


class SteppedDriver(PPODriver):
    """A PPODriver that begins step s only once the test allowed it, and records each batch's prompts."""

    def __init__(self, *args):
        super().__init__(*args)
        self.cv = threading.Condition()
        self.allowed = 0  # the driver may begin steps < allowed
        self.paused_at = -1  # the step it is waiting to begin
        self.batch_prompts: dict[int, list[int]] = {}

    def scale(self, step: int, version: int, next_batch: int, collected_before: int | None = None) -> None:
        import ray

        with self.cv:
            self.paused_at = step
            self.cv.notify_all()
            self.cv.wait_for(lambda: step < self.allowed)
        if self.pool.starting:  # stand-in for a step longer than a worker's start
            ray.wait([w.ready for w in self.pool.starting], num_returns=len(self.pool.starting), timeout=60)
        super().scale(step, version, next_batch, collected_before)

    def collect(self, flight) -> BatchInfo:
        info = super().collect(flight)
        self.batch_prompts[info.batch_id] = list(info.prompt_indices)
        return info

    def run_until(self, step: int, thread: threading.Thread) -> None:
        """Let steps < `step` run; return when the driver waits to begin `step`."""
        with self.cv:
            self.allowed = step
            self.cv.notify_all()
            ok = self.cv.wait_for(lambda: self.paused_at == step or not thread.is_alive(), timeout=120)
        assert ok and thread.is_alive(), f"driver did not reach step {step}"


def test_worker_joins_and_leaves_a_running_job(ray_local, make_tiny_cfg, tiny_checkpoints, tmp_path, capsys):
    # The session's local Ray has 4 CPUs; half a CPU per rollout worker leaves room for a second one.
    cfg = make_tiny_cfg(f"ppo.steps={STEPS}", "ppo.max_staleness=1", "ppo.weight_sync=object_store",
                        "rollout.num_workers=1", "rollout.num_cpus=0.5")
    run = tmp_path / "elastic-run"
    driver = SteppedDriver(cfg, run / "ppo", tiny_checkpoints.sft, tiny_checkpoints.rm)
    outcome: dict = {}

    def go() -> None:
        try:
            outcome["summary"] = driver.run()
        except BaseException as e:  # re-raised by the test thread below
            outcome["error"] = e
        finally:
            with driver.cv:
                driver.cv.notify_all()

    thread = threading.Thread(target=go, daemon=True)
    thread.start()
    try:
        driver.run_until(2, thread)  # steps 1 and 2 of metrics.jsonl are done with one worker
        assert main(["scale", "--run-dir", str(run), "--workers", "2"]) == 0
        driver.run_until(5, thread)  # the worker starts, joins, and its first batch is collected
        assert main(["scale", "--run", run.name, "--workers", "1"]) == 0
        with driver.cv:
            driver.allowed = STEPS
            driver.cv.notify_all()
        thread.join(timeout=120)
    finally:
        with driver.cv:  # never leave the driver thread waiting
            driver.allowed = STEPS
            driver.cv.notify_all()
        thread.join(timeout=120)
        driver.close()
    assert "error" not in outcome, outcome.get("error")
    assert outcome["summary"]["ppo/steps"] == STEPS

    rows = read_metrics(run / "ppo" / "metrics.jsonl")
    events = [json.loads(line) for line in (run / "ppo" / "events.jsonl").read_text().splitlines()]
    out = capsys.readouterr().out
    with capsys.disabled():
        print("\nrollout/num_workers by step:", {r["step"]: int(r["rollout/num_workers"]) for r in rows})
        print("staleness by step:          ", {r["step"]: int(r["ppo/staleness"]) for r in rows})
        print("policy version by step:     ", {r["step"]: int(r["rollout/policy_version"]) for r in rows})
        print("timeline (ppo/events.jsonl):")
        for e in events:
            print("  ", json.dumps({k: v for k, v in e.items() if k != "time"}))
        print("scale command said:", *[line for line in out.splitlines() if "requested" in line], sep="\n   ")

    # Every step ran, within the staleness bound, on a whole batch.
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for r in rows:
        assert 0 <= r["ppo/staleness"] <= 1
        assert r["rollout/policy_version"] == r["step"] - 1 - r["ppo/staleness"]
        assert r["rollout/sequences"] == cfg.ppo.rollout_batch_size
    n = cfg.ppo.samples_per_prompt
    for b in range(STEPS):  # no prompt lost or doubled, whoever generated it
        assert Counter(driver.batch_prompts[b]) == Counter({i: n for i in driver.prompt_source.batch(b)})

    # The timeline: worker 1 starts at step 3, joins holding the version then published (3) at step 4, its
    # first batch (4) is generated by that version, and it is removed once its last batch was collected.
    by_event = {e["event"]: e for e in events if e["worker"] == 1}
    assert set(by_event) == {"worker_starting", "worker_joined", "worker_first_batch", "worker_draining",
                             "worker_removed"}
    joined, first = by_event["worker_joined"], by_event["worker_first_batch"]
    assert (by_event["worker_starting"]["step"], joined["step"], joined["version"]) == (3, 4, 3)
    assert first["version"] == joined["version"] == first["joined_version"]
    assert first["batch"] == 4 and first["step"] == 5
    draining, removed = by_event["worker_draining"], by_event["worker_removed"]
    # batch b is collected at step b + 1: the worker is killed only after its last batch was collected
    assert (draining["step"], draining["last_batch"]) == (6, 5)
    assert removed["last_batch"] == draining["last_batch"] and removed["step"] >= removed["last_batch"] + 2
    workers = [int(r["rollout/num_workers"]) for r in rows]
    assert workers == [1, 1, 1, 2, 2, 1, 1, 1]


def test_scaler_rejects_bad_requests(ray_local, capsys):
    """Checked at scale time: at least one worker, and the collective transport cannot change its world size."""
    import ray

    scaler = RolloutScaler.options(name=scaler_name("collective-run"), namespace=SCALER_NAMESPACE).remote(2, "collective")
    try:
        with pytest.raises(ValueError, match=">= 1"):
            ray.get(scaler.set_desired.remote(0))
        with pytest.raises(ValueError, match="elastic scaling needs ppo.weight_sync=object_store"):
            ray.get(scaler.set_desired.remote(3))
        assert main(["scale", "--run", "collective-run", "--workers", "3"]) == 1
        assert "elastic scaling needs ppo.weight_sync=object_store" in capsys.readouterr().err
        assert ray.get(scaler.get_desired.remote()) == 2
        assert main(["scale", "--run", "no-such-run", "--workers", "2"]) == 1
        assert "no running PPO job named 'no-such-run'" in capsys.readouterr().err
    finally:
        ray.kill(scaler)


def test_scale_command_line_checks(monkeypatch, capsys):
    """`rayrlhf scale` refuses a count below 1, and outside a cluster asks for its address instead of starting
    an empty local Ray."""
    with pytest.raises(SystemExit) as e:
        main(["scale", "--run", "x", "--workers", "0"])
    assert e.value.code == 2
    monkeypatch.setattr("ray.is_initialized", lambda: False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(["scale", "--run", "x", "--workers", "2"]) == 2
    assert "--address" in capsys.readouterr().err
