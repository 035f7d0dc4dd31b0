"""Resume equals uninterrupted: checkpoints, the experience ledger, and a driver killed with SIGKILL mid-run.

The kill test runs `rayrlhf ppo` in a child process (its own local Ray), SIGKILLs it once its first PPO
checkpoint exists — wherever in the next steps it happens to be — then resumes it with
`rayrlhf ppo --resume` and compares with an uninterrupted run: final policy and critic weights and every
non-timing metric must be equal, and the ledger must show each batch consumed exactly once. The killed run is a
new attempt on a finished run directory, so its resume must continue it rather than skip it as finished. In CI it
runs the deterministic in-flight rollout, where the batches after the first are generated across a weight sync:
the kill lands after a checkpoint whose buffered batch was generated across one (asserted), with later batches
in flight.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rayrlhf.core.checkpoints import CheckpointDir
from rayrlhf.core.experience import spans_versions
from rayrlhf.core.ledger import ExperienceLedger, LedgerError
from rayrlhf.pipeline.reaper import marked
from test_resume_attempts import _finished_run

ROOT = Path(__file__).resolve().parents[1]


# --- pure parts ---------------------------------------------------------------------------------------

def test_ledger_records_exactly_once_and_round_trips():
    ledger = ExperienceLedger()
    expected = {0: [3, 1], 1: [0, 2]}
    ledger.dispatched(0, [3, 1], version=0, workers=[0, 1])
    ledger.dispatched(1, [0, 2], version=0, workers=[0, 1])
    with pytest.raises(LedgerError, match="dispatched twice"):
        ledger.dispatched(1, [0, 2], version=0, workers=[0, 1])
    with pytest.raises(LedgerError, match="before it was collected"):
        ledger.consumed(0, 0)
    assert ledger.redispatched(0, shard=1, worker=1, error="actor died") == 1
    ledger.recalled(1, shard=0, role="reward", error="actor died")
    ledger.collected(0, shards=2)
    ledger.consumed(0, 0)
    with pytest.raises(LedgerError, match="consumed twice"):
        ledger.consumed(0, 1)
    ledger.collected(1, shards=2)
    ledger.consumed(1, 1)

    again = ExperienceLedger.from_json(json.loads(json.dumps(ledger.to_json())))
    audit = again.audit(2, expected.__getitem__)
    assert audit.ok and audit.consumed == 2 and audit.lost == []
    assert [(r["batch"], r["shard"], r["role"]) for r in audit.redispatched] == [(0, 1, "rollout"), (1, 0, "reward")]
    shard1 = [a for a in again.batches[0].shards if a.shard == 1]
    assert [(a.attempt, a.outcome) for a in shard1] == [(0, "failed"), (1, "generated")]

    assert again.audit(3, lambda b: expected.get(b, [])).lost == [2]  # a batch never consumed is lost
    assert not again.audit(2, lambda b: [9, 9]).ok  # prompts other than the seeded order's


def test_ledger_of_streamed_shards_consumes_each_once_and_a_batch_with_its_last():
    """rollout.inflight_batches stream: shards of two batches trained by different steps, one generated again; a
    shard consumed twice, or regenerated once trained, is refused; a batch is consumed with its last shard."""
    ledger = ExperienceLedger()
    ledger.dispatched(0, [3, 1], version=0, workers=[0, 1])
    ledger.dispatched(1, [0, 2], version=0, workers=[1, 0])
    ledger.consumed_shard(0, 1, 0, {0: 5}, [1])
    ledger.consumed_shard(1, 0, 0, {0: 4}, [0])
    with pytest.raises(LedgerError, match="shard 1 consumed twice"):
        ledger.consumed_shard(0, 1, 1, {0: 5}, [1])
    with pytest.raises(LedgerError, match="never dispatched"):
        ledger.consumed_shard(1, 2, 1, {0: 1}, [2])
    with pytest.raises(LedgerError, match="regenerated after it was consumed"):
        ledger.regenerated(0, 1, worker=0, why="stale")
    assert ledger.unconsumed_shards() == {0: [0], 1: [1]}
    assert ledger.regenerated(0, 0, worker=1, why="tokens of v0 past ppo.max_staleness at v2") == 1
    ledger.consumed_shard(0, 0, 2, {2: 3}, [3])
    assert ledger.batches[0].consumed_by == 2 and ledger.batches[1].consumed_by is None
    assert ledger.batches[0].token_versions == {"0": 5, "2": 3}

    again = ExperienceLedger.from_json(json.loads(json.dumps(ledger.to_json())))
    assert again.audit(2, {0: [3, 1], 1: [0, 2]}.__getitem__).lost == [1]  # batch 1's shard 1 never trained
    wrong = ExperienceLedger.from_json(again.to_json())
    wrong.consumed_shard(1, 1, 2, {1: 2}, [9])  # a shard whose rollout holds a prompt not of its batch
    assert wrong.audit(2, {0: [3, 1], 1: [0, 2]}.__getitem__).mismatched == [1]
    again.consumed_shard(1, 1, 2, {1: 2}, [2, 2])  # a prompt's two samples
    audit = again.audit(2, {0: [3, 1], 1: [0, 2]}.__getitem__)
    assert audit.ok and audit.consumed == 2 and again.unconsumed_shards() == {}
    assert audit.redispatched == [] and audit.regenerated == [
        {"batch": 0, "shard": 0, "why": "tokens of v0 past ppo.max_staleness at v2"}]
    assert [a.outcome for a in again.batches[0].shards if a.shard == 0] == ["regenerated", "generated"]


def test_checkpoint_dir_a_crash_mid_save_keeps_the_previous_checkpoint(tmp_path):
    ckpts = CheckpointDir(tmp_path / "checkpoints", keep=2)
    ckpts.save(2, lambda d: (d / "state.txt").write_text("two"))

    def crash(d: Path) -> None:
        (d / "state.txt").write_text("half")
        raise KeyboardInterrupt  # the process dies mid-save

    with pytest.raises(KeyboardInterrupt):
        ckpts.save(4, crash)
    assert ckpts.latest().name == "step-000002" and (ckpts.latest() / "state.txt").read_text() == "two"
    assert (ckpts.root / "step-000004.tmp").is_dir()  # left behind, never read
    ckpts.save(4, lambda d: (d / "state.txt").write_text("four"))
    ckpts.save(6, lambda d: (d / "state.txt").write_text("six"))
    assert [p.name for p in ckpts.complete()] == ["step-000004", "step-000006"]  # keep=2
    assert not list(ckpts.root.glob("*.tmp"))
    (ckpts.root / "latest").unlink()  # even without the pointer, the newest complete one is found
    assert ckpts.latest().name == "step-000006"


@pytest.mark.parametrize("start", [0, 3, 4, 5, 11])
def test_epoch_batches_from_any_step_are_the_tail_of_the_whole_order(start):
    from rayrlhf.core.training import epoch_batches

    whole = list(epoch_batches(10, 3, epochs=4, seed=7))  # 3 batches per epoch, the 10th example dropped
    assert len(whole) == 12 and all(len(b) == 3 for b in whole)
    assert list(epoch_batches(10, 3, epochs=4, seed=7, start_step=start)) == whole[start:]
    assert sorted(i for b in whole[:3] for i in b) == sorted(set(i for b in whole[:3] for i in b))  # an epoch: no repeats
    assert whole[:3] != whole[3:6]  # each epoch reshuffled


def test_resume_bad_arguments_exit_2_and_write_nothing(tmp_path, capsys):
    from rayrlhf.pipeline.cli import main

    missing = tmp_path / "no-such-run"
    assert main(["train", "--resume", str(missing)]) == 2
    assert "not a run directory (no config.yaml)" in capsys.readouterr().err
    assert not missing.exists()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("run:\n  seed: 0\n")
    assert main(["train", "--resume", str(tmp_path / "run"), "--set", "ppo.steps=3"]) == 2
    assert "cannot be combined with --set" in capsys.readouterr().err
    assert main(["ppo", "--resume", str(tmp_path / "run"), "--sft-checkpoint", "x"]) == 2
    assert "cannot be combined with --sft-checkpoint" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["config.yaml"]


# --- plain classes ----------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_sft_and_rm_resume_from_their_last_checkpoint_equal_uninterrupted(make_tiny_cfg, tiny_checkpoints, tmp_path,
                                                                          monkeypatch, lora):
    """Die right after the first training-state save, resume, and end with the same weights. With LoRA the
    training state holds the adapters (and the reward model's head), not the frozen base weights."""
    import rayrlhf.roles.rm as rm_mod
    import rayrlhf.roles.sft as sft_mod
    import rayrlhf.core.training as training
    from safetensors.torch import load_file

    from rayrlhf.core.checkpoints import CheckpointDir

    cfg = make_tiny_cfg("sft.epochs=2", "sft.eval_every=4", "rm.epochs=2", "rm.eval_every=4",
                        *(["model.lora.r=4", "model.lora.alpha=8"] if lora else []))
    for mod, make in ((sft_mod, lambda d, r: sft_mod.SFTTrainer(cfg, d, resume=r)),
                      (rm_mod, lambda d, r: rm_mod.RMTrainer(cfg, d, tiny_checkpoints.sft, resume=r))):
        whole = make(tmp_path / f"{mod.__name__}-whole", False).run()
        real_save = training.save_training_state

        class Died(Exception):
            pass

        def save_then_die(*args, **kwargs):
            real_save(*args, **kwargs)
            raise Died

        monkeypatch.setattr(training, "save_training_state", save_then_die)
        with pytest.raises(Died):
            make(tmp_path / f"{mod.__name__}-killed", False).run()
        monkeypatch.setattr(training, "save_training_state", real_save)
        state = torch.load(CheckpointDir(tmp_path / f"{mod.__name__}-killed" / "checkpoints").latest()
                           / "trainer_state.pt", weights_only=False)
        if lora:
            assert "weights" not in state["model"] and all("lora_" in n or "score" in n
                                                          for n in state["model"]["trainable"])
        else:
            assert "trainable" not in state["model"] and "weights" in state["model"]
        resumed = make(tmp_path / f"{mod.__name__}-killed", True).run()

        for key in whole:
            if not key.startswith("timing/"):
                assert resumed[key] == whole[key], (mod.__name__, key)
        a = load_file(tmp_path / f"{mod.__name__}-whole" / "checkpoint" / "model.safetensors")
        b = load_file(tmp_path / f"{mod.__name__}-killed" / "checkpoint" / "model.safetensors")
        assert max((a[k] - b[k]).abs().max().item() for k in a) == 0.0, mod.__name__
        steps = [json.loads(line)["step"] for line in (tmp_path / f"{mod.__name__}-killed" / "metrics.jsonl").open()]
        assert steps == sorted(steps)  # the dead run's rows after its checkpoint were dropped, not duplicated


@pytest.mark.slow
def test_learner_save_load_continues_identically(make_tiny_cfg, tiny_checkpoints, make_experience, tmp_path):
    """Two updates in a row == one update, save, load into a fresh learner, second update."""
    from rayrlhf.roles.learner import PPOLearner

    cfg = make_tiny_cfg("ppo.prompts_per_step=4", "ppo.samples_per_prompt=2", "ppo.ppo_epochs=2",
                        "ppo.minibatch_size=4", "ppo.micro_batch_size=2")
    exp0, exp1 = make_experience(cfg, version=0), make_experience(cfg, version=1)
    a = PPOLearner.from_config(cfg, str(tiny_checkpoints.sft), str(tiny_checkpoints.rm), device="cpu")
    a.train_step(exp0)
    a.save(tmp_path)
    m_a = a.train_step(exp1)

    b = PPOLearner.from_config(cfg, str(tiny_checkpoints.sft), str(tiny_checkpoints.rm), device="cpu")
    assert b.load(tmp_path) == 1
    m_b = b.train_step(exp1)
    # timing/ and perf/ (tokens/s, MFU) are measured, not computed
    assert {k: v for k, v in m_a.items() if not k.startswith(("timing/", "perf/"))} == \
        {k: v for k, v in m_b.items() if not k.startswith(("timing/", "perf/"))}
    for (n, p), (_, q) in zip(a.policy.named_parameters(), b.policy.named_parameters()):
        assert torch.equal(p, q), n
    for (n, p), (_, q) in zip(a.critic.named_parameters(), b.critic.named_parameters()):
        assert torch.equal(p, q), n


# --- the real topology: SIGKILL the driver, resume ----------------------------------------------------

STEPS, EVERY = 4, 2  # killed after its step-2 checkpoint, resumed there for steps 3-4


# Two in-flight workers on shards of 2 prompts; a batch moves to the next version after 3 of its 12 tokens.
INFLIGHT = ["rollout.inflight=true", "rollout.inflight_deterministic=true", "rollout.inflight_switch_step=3",
            "rollout.num_workers=2", "rollout.inflight_shard_prompts=2"]


def _ppo_args(run: Path, ckpt, tiny_overrides: list[str], staleness: int, learners: int, inflight: bool) -> list[str]:
    argv = ["ppo", "--run-dir", str(run), "--sft-checkpoint", str(ckpt.sft), "--rm-checkpoint", str(ckpt.rm)]
    # A learner group of 2 (or two rollout workers) fits a local Ray's CPUs with the scorers and the rollout
    # workers on half a CPU each.
    halves = ["rollout.num_cpus=0.5", "reward.num_cpus=0.5", "reference.num_cpus=0.5"]
    group = [f"ppo.learner_workers={learners}", *halves] if learners > 1 else []
    for o in [*tiny_overrides, f"ppo.steps={STEPS}", f"ppo.checkpoint_every={EVERY}", f"ppo.max_staleness={staleness}",
              "ppo.prompts_per_step=4", "ppo.minibatch_size=4", "ppo.micro_batch_size=4", "run.keep_checkpoints=0",
              *group, *([*INFLIGHT, *halves] if inflight else [])]:
        argv += ["--set", o]
    return argv


def _names(processes) -> list[str]:
    """Names of processes, skipping those that ended meanwhile."""
    import psutil

    out = []
    for p in processes:
        try:
            out.append(p.name())
        except psutil.NoSuchProcess:
            pass
    return out


def _left_of_local_ray(pid: int, wait_s: float = 30.0) -> list[str]:
    """The processes of the local Ray that the command `pid` started still alive after up to `wait_s`."""
    deadline = time.monotonic() + wait_s
    while marked(f"{pid}:") and time.monotonic() < deadline:
        time.sleep(0.5)
    return _names(marked(f"{pid}:"))


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


def _learning_metrics(run: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run / "ppo" / "metrics.jsonl").read_text().splitlines()]
    volatile = ("timing/", "perf/", "rollout/sequences_per_s", "time")
    return {r["step"]: {k: v for k, v in r.items() if not k.startswith(volatile)} for r in rows}


def _kill_after_first_checkpoint(run: Path, argv: list[str], tmp_path: Path) -> None:
    """`rayrlhf <argv>` in its own process, with its own local Ray, SIGKILLed once its first PPO checkpoint is
    complete; no process of its Ray is left after it (its watchdog ends them; test_reaper: Ray's agents too)."""
    env = {**os.environ, "RAY_ADDRESS": ""}
    stderr = tmp_path / "stderr.log"
    with stderr.open("w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "rayrlhf.pipeline.cli", *argv], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=err)
    latest = run / "ppo" / "checkpoints" / "latest"
    deadline = time.monotonic() + 300
    while not latest.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert latest.exists(), f"no checkpoint before the driver ended: {stderr.read_text()[-2000:]}"
    names = set(_names(marked(f"{proc.pid}:")))
    assert "raylet" in names, f"the command's local Ray is not up: {names}"
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    left = _left_of_local_ray(proc.pid)
    assert left == [], f"processes of the killed command's Ray still alive after 30 s: {left}"


@pytest.mark.slow
def test_a_streamed_run_killed_after_a_checkpoint_trains_each_shard_once_on_resume(ray_local, monkeypatch,
                                                                                   tiny_checkpoints, tiny_overrides,
                                                                                   tmp_path):
    """rollout.inflight_batches stream: `rayrlhf ppo` SIGKILLed after its step-2 checkpoint, a batch's shards in
    flight (not saved with it), then `--resume`d: the two shards in flight at the checkpoint are generated again,
    once each, and the ledger's audit finds every shard of the 4 batches trained once."""
    from rayrlhf.pipeline.cli import main

    monkeypatch.setattr("rayrlhf.pipeline.workflow.shutdown", lambda: None)  # keep the session's Ray for other tests
    run = tmp_path / "killed"
    argv = _ppo_args(run, tiny_checkpoints, tiny_overrides, 1, 1, False)
    for o in ["rollout.inflight=true", "rollout.inflight_batches=stream", "rollout.num_workers=2",
              "rollout.inflight_shard_prompts=2", "rollout.num_cpus=0.5", "reward.num_cpus=0.5", "reference.num_cpus=0.5"]:
        argv += ["--set", o]
    _kill_after_first_checkpoint(run, argv, tmp_path)
    assert main(["ppo", "--resume", str(run)]) == 0
    assert json.loads((run / "stages.json").read_text())["ppo"]["ppo/resumed_at_step"] == EVERY
    ledger = json.loads((run / "ppo" / "ledger.json").read_text())
    assert ledger["audit"]["ok"] and ledger["audit"]["consumed"] == STEPS
    for e in ledger["batches"]:
        assert sorted(int(s) for s in e["consumed_shards"]) == [0, 1]
    again = [(r["batch"], r["shard"]) for r in ledger["audit"]["regenerated"]
             if r["why"] == "in flight at the checkpoint resumed from"]
    assert len(again) == len(set(again)) == 2, again  # 3 batches x 2 shards dispatched by then, 2 steps x 2 trained


@pytest.mark.slow
# In CI: one step off-policy with in-flight rollout (its buffered batch, generated across a sync, restored from the
# checkpoint) and one learner. Outside CI only (CI's limit is 25 minutes; they pass locally): whole-batch rollout,
# with one learner, a learner group of two, and synchronous. Whole-batch rollout resuming to the uninterrupted
# weights, with a learner group of two, is CI's in test_multinode.py (a learner node killed).
@pytest.mark.parametrize(("staleness", "learners", "inflight"), [
    pytest.param(1, 1, True, id="inflight"), pytest.param(1, 1, False, marks=pytest.mark.outside_ci),
    pytest.param(1, 2, False, marks=pytest.mark.outside_ci), pytest.param(0, 1, False, marks=pytest.mark.outside_ci)])
def test_driver_killed_and_resumed_matches_uninterrupted(ray_local, monkeypatch, tiny_checkpoints, tiny_overrides,
                                                         tmp_path, staleness, learners, inflight, capsys):
    from rayrlhf.pipeline.cli import main

    monkeypatch.setattr("rayrlhf.pipeline.workflow.shutdown", lambda: None)  # keep the session's Ray for other tests
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert main(_ppo_args(whole, tiny_checkpoints, tiny_overrides, staleness, learners, inflight)) == 0

    # A new attempt, with other PPO settings, on a finished run (`rayrlhf train`'s SFT, RM and a 40-step PPO):
    # `--resume` must continue this attempt with its own config, never skip it as finished.
    _finished_run(killed, tiny_checkpoints, tiny_overrides)
    _kill_after_first_checkpoint(killed, _ppo_args(killed, tiny_checkpoints, tiny_overrides, staleness, learners,
                                                    inflight), tmp_path)
    steps_before = len(_learning_metrics(killed))
    assert "ppo" not in json.loads((killed / "stages.json").read_text())  # the attempt did not finish

    assert main(["ppo", "--resume", str(killed)]) == 0
    stages = json.loads((killed / "stages.json").read_text())["ppo"]
    resumed_at = int(stages["ppo/resumed_at_step"])
    assert EVERY <= resumed_at < STEPS and resumed_at % EVERY == 0

    diffs = {}
    for part in ("checkpoint", "critic"):
        a, b = _weights(whole / "ppo" / part), _weights(killed / "ppo" / part)
        assert a.keys() == b.keys()
        diffs[part] = max((a[k] - b[k]).abs().max().item() for k in a)
    assert diffs == {"checkpoint": 0.0, "critic": 0.0}
    assert _learning_metrics(whole) == _learning_metrics(killed)
    # one row a step: the killed attempt's rows after its checkpoint dropped, the finished run's 40 too
    assert [json.loads(line)["step"] for line in (killed / "ppo" / "metrics.jsonl").read_text().splitlines()] == \
        list(range(1, STEPS + 1))

    ledger = json.loads((killed / "ppo" / "ledger.json").read_text())
    audit = ledger["audit"]
    assert audit["ok"] and audit["consumed"] == STEPS and audit["lost"] == []
    # no actor died: nothing dispatched again (a deterministic worker wrongly out of its order would show here)
    assert audit["redispatched"] == [] and json.loads((whole / "ppo" / "ledger.json").read_text())["audit"][
        "redispatched"] == []
    assert sorted(b["batch_id"] for b in ledger["batches"]) == list(range(STEPS))
    assert all(b["consumed_by"] == b["batch_id"] for b in ledger["batches"])
    # With one step of staleness the batch generated before the checkpoint was saved with it, not regenerated.
    assert audit["restored"] == ([resumed_at] if staleness == 1 else [])
    spans = [b["batch_id"] for b in ledger["batches"] if len(b["token_versions"]) > 1]
    if inflight:  # the batch restored from the checkpoint was generated across a sync, as were the later ones
        buffered = torch.load(killed / "ppo" / "checkpoints" / f"step-{resumed_at:06d}" / "buffer.pt", weights_only=False)
        assert any(spans_versions(e.token_versions, e.response_mask).any() for e in buffered.values())
        assert spans and 0 not in spans
    with capsys.disabled():
        print(f"\nmax_staleness={staleness}, learner_workers={learners}, inflight={inflight}: killed with {steps_before} steps logged, resumed at step {resumed_at}, "
              f"max abs diff policy {diffs['checkpoint']} critic {diffs['critic']}, ledger consumed "
              f"{audit['consumed']}/{STEPS}, lost {audit['lost']}, restored batches {audit['restored']}, batches spanning a sync {spans}")


@pytest.mark.slow
def test_stages_started_from_outside_checkpoints_resume_from_them(ray_local, monkeypatch, tiny_checkpoints,
                                                                   tiny_overrides, tmp_path):
    """`rm --sft-checkpoint P` and `ppo --sft-checkpoint P --rm-checkpoint Q` record P and Q in the run directory:
    `--resume` continues an interrupted one from them (not from the run's own, absent, SFT/RM outputs)."""
    from rayrlhf.pipeline.cli import main

    monkeypatch.setattr("rayrlhf.pipeline.workflow.shutdown", lambda: None)  # keep the session's Ray for other tests
    sets = sum((["--set", o] for o in tiny_overrides), [])
    rm_run = tmp_path / "rm-run"
    assert main(["rm", "--run-dir", str(rm_run), "--sft-checkpoint", str(tiny_checkpoints.sft), *sets,
                 "--set", "rm.eval_every=2"]) == 0
    # Interrupted after its checkpoints: the stage is not recorded as finished, its final output not written.
    (rm_run / "stages.json").unlink()
    assert (rm_run / "rm" / "checkpoints" / "latest").exists()
    assert main(["rm", "--resume", str(rm_run)]) == 0
    assert "rm" in json.loads((rm_run / "stages.json").read_text())

    ppo_run = tmp_path / "ppo-run"

    def killed(cfg):  # the first attempt dies before its first checkpoint (once its inputs are recorded)
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr("rayrlhf.pipeline.workflow.connect", killed)
        assert main(["ppo", "--run-dir", str(ppo_run), "--sft-checkpoint", str(tiny_checkpoints.sft),
                     "--rm-checkpoint", str(tiny_checkpoints.rm), *sets, "--set", "ppo.steps=2",
                     "--set", "ppo.checkpoint_every=0"]) == 130
    stages = ppo_run / "stages.json"
    assert not stages.exists() or "ppo" not in json.loads(stages.read_text())
    recorded = json.loads((ppo_run / "inputs.json").read_text())["ppo"]
    assert recorded == {"sft_checkpoint": str(tiny_checkpoints.sft.resolve()),
                        "rm_checkpoint": str(tiny_checkpoints.rm.resolve())}
    # `--resume` starts the stage over, from the same checkpoints: the driver is handed them (a PPO run resumed
    # through the driver is the kill test's)
    started = []

    def run_ppo(cfg, run, sft, rm, latest, command):
        started.append((sft, rm, latest, cfg.ppo.steps))
        return {"ppo/steps": float(cfg.ppo.steps)}

    monkeypatch.setattr("rayrlhf.pipeline.workflow.connect", lambda cfg: None)
    monkeypatch.setattr("rayrlhf.pipeline.workflow._run_ppo", run_ppo)
    assert main(["ppo", "--resume", str(ppo_run)]) == 0
    assert started == [(tiny_checkpoints.sft.resolve(), tiny_checkpoints.rm.resolve(), None, 2)]
    assert json.loads((ppo_run / "stages.json").read_text())["ppo"]["ppo/steps"] == 2.0


@pytest.mark.slow
# Outside CI (its 25 minutes): the kill test above checks the same after its SIGKILL, later in a run's life.
@pytest.mark.outside_ci
def test_a_killed_command_leaves_no_process_of_its_local_ray(tiny_overrides, tmp_path):
    """SIGKILL of `rayrlhf sft` while its local Ray runs: within 30 s no process of that Ray is left."""
    # As from a shell: the command starts its own Ray with its own token.
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAYRLHF_LOCAL_RAY", "RAY_AUTH_TOKEN")}
    argv = ["sft", "--run-dir", str(tmp_path / "run"), *sum((["--set", o] for o in tiny_overrides), []),
            "--set", "sft.epochs=1000"]  # still training when it is killed
    proc = subprocess.Popen([sys.executable, "-m", "rayrlhf.pipeline.cli", *argv], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = tmp_path / "run" / "sft" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and not metrics.exists():
        time.sleep(0.2)
    # Killed in its first seconds, Ray's agents end with it; later they outlive it, reparented to PID 1.
    time.sleep(10)
    names = {p.name() for p in marked(f"{proc.pid}:")}
    assert proc.poll() is None and "raylet" in names, f"the command's Ray did not come up: {names}"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    left = _left_of_local_ray(proc.pid)
    assert left == [], f"processes of the killed command's Ray still alive after 30 s: {left}"


def test_a_checkpoint_of_another_state_format_is_refused_naming_what_to_do(tmp_path):
    """A stage checkpoint written before `trainer_state.pt` named its parts (format 1: flat model/optimizer keys,
    or the learner's learner_state.pt) cannot be resumed: one error that says to start the stage over, not a
    KeyError from inside the loader. The current format round-trips."""
    from rayrlhf.core.checkpoints import CheckpointFormatError, Trained, read_state, write_state

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    parts = [Trained("model", model, opt, sched)]
    old = tmp_path / "old"
    old.mkdir()
    torch.save({"step": 3, "model": model.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "torch_rng": torch.get_rng_state(), "best": {}},
               old / "trainer_state.pt")
    with pytest.raises(CheckpointFormatError, match=r"format 1; this rayrlhf reads format 2: start this stage over"):
        read_state(old, parts)
    with pytest.raises(CheckpointFormatError, match="holds no trainer_state.pt"):
        read_state(tmp_path, parts)
    new = tmp_path / "new"
    new.mkdir()
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    write_state(new, parts, {"step": 4, "torch_rng": torch.get_rng_state(), "best": {"x": 1.0}})
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    fresh = torch.nn.Linear(3, 2)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    state = read_state(new, [Trained("model", fresh, fresh_opt,
                                     torch.optim.lr_scheduler.LambdaLR(fresh_opt, lambda step: 1.0))])
    assert state["step"] == 4 and state["best"] == {"x": 1.0}
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in trained.items())
    assert fresh_opt.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]
