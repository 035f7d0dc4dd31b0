"""A stage run again on a finished run directory is a new attempt, and `--resume` continues that attempt.

The issue's scenario at tiny size: a finished run R (SFT, RM and PPO recorded in stages.json), then
`rayrlhf ppo --run-dir R` with other PPO settings dies after a checkpoint (here: its learner is killed before an
update, which leaves the run directory as a SIGKILL of the driver would: nothing recorded, the checkpoint and
the metric rows up to the crash). `rayrlhf ppo --resume R` must continue that attempt, with the config it ran
with, and never skip it as finished; the hint printed on the crash must name that command.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from rayrlhf.core.config import config_to_yaml, load_config

# Cheap PPO steps (as tests/test_resume.py's kill test); the run's own PPO: 2 steps, a checkpoint after step 1.
PPO_SIZES = ["ppo.prompts_per_step=4", "ppo.minibatch_size=4", "ppo.micro_batch_size=4", "run.keep_checkpoints=0",
             "ppo.steps=2", "ppo.checkpoint_every=1", "ppo.max_learner_restarts=0"]


def _finished_run(path: Path, ckpt, tiny_overrides: list[str], ppo_finished: bool = True) -> Path:
    """A run directory as a finished `rayrlhf train` leaves it: its config, SFT and RM checkpoints, and (with
    `ppo_finished`) a PPO policy of 40 steps, stood for by a copy of the SFT policy."""
    path.mkdir()
    (path / "config.yaml").write_text(config_to_yaml(load_config(None, [*tiny_overrides, *PPO_SIZES])))
    shutil.copytree(ckpt.sft, path / "sft" / "checkpoint")
    shutil.copytree(ckpt.rm, path / "rm" / "checkpoint")
    stages = {"sft": {"sft/valid_loss": 3.0}, "rm": {"rm/valid_accuracy": 0.6}}
    if ppo_finished:
        shutil.copytree(ckpt.sft, path / "ppo" / "checkpoint")
        (path / "ppo" / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 41)))
        stages["ppo"] = {"ppo/steps": 40.0, "ppo/resumed_at_step": 0.0}
    (path / "stages.json").write_text(json.dumps(stages))
    return path


def _learner_dies_before(monkeypatch, batch: int) -> None:
    """The learner actor is killed just before its update on `batch` (and on no other)."""
    import ray

    from rayrlhf.pipeline.driver import PPODriver

    learn = PPODriver.learn

    def die_then_learn(self, flight):
        if flight.batch_id == batch:
            ray.kill(self.roles.learner.ranks[0], no_restart=True)
        return learn(self, flight)

    monkeypatch.setattr(PPODriver, "learn", die_then_learn)


def _steps_logged(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "ppo" / "metrics.jsonl").read_text().splitlines()]


def _policy(path: Path):
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


@pytest.mark.slow
# Outside CI (its 25 minutes): CI's test_resume.py kill test SIGKILLs a new attempt on a finished run and resumes
# it to the uninterrupted weights; the crash hint is test_the_resume_hint_names_the_command_that_started_the_run's.
@pytest.mark.outside_ci
def test_a_ppo_attempt_killed_on_a_finished_run_is_resumed_not_skipped(ray_local, monkeypatch, tiny_checkpoints,
                                                                      tiny_overrides, tmp_path, capsys):
    from rayrlhf.pipeline.cli import main

    monkeypatch.setattr("rayrlhf.pipeline.workflow.shutdown", lambda: None)  # keep the session's Ray for other tests
    run = _finished_run(tmp_path / "R", tiny_checkpoints, tiny_overrides)
    sets = sum((["--set", o] for o in [*tiny_overrides, *PPO_SIZES, "ppo.steps=4", "ppo.checkpoint_every=2"]), [])

    # 4 steps, a checkpoint after step 2; dies after logging step 3 (the issue: 12, every 4, killed at step 7).
    _learner_dies_before(monkeypatch, batch=3)
    assert main(["ppo", "--run-dir", str(run), *sets]) == 1
    err = capsys.readouterr().err
    assert f"`rayrlhf ppo --resume {run}`" in err and "train --resume" not in err, err
    assert set(json.loads((run / "stages.json").read_text())) == {"sft", "rm"}  # PPO is no longer finished
    assert yaml.safe_load((run / "ppo" / "config.yaml").read_text())["ppo"]["steps"] == 4
    assert _steps_logged(run) == [1, 2, 3]
    monkeypatch.undo()
    monkeypatch.setattr("rayrlhf.pipeline.workflow.shutdown", lambda: None)

    assert main(["ppo", "--resume", str(run)]) == 0
    assert "already finished" not in capsys.readouterr().err
    summary = json.loads((run / "stages.json").read_text())["ppo"]
    assert (summary["ppo/steps"], summary["ppo/resumed_at_step"]) == (4.0, 2.0)
    assert _steps_logged(run) == [1, 2, 3, 4]  # the killed attempt's step 3 run again, not kept twice
    old, new = _policy(tiny_checkpoints.sft), _policy(run / "ppo" / "checkpoint")
    assert max((old[k] - new[k]).abs().max().item() for k in old) > 0  # the new attempt's policy, not the old one


@pytest.mark.slow
def test_a_plain_rerun_drops_a_stale_stage_config_so_resume_continues_it(monkeypatch, tiny_checkpoints,
                                                                         tiny_overrides, tmp_path):
    """R/ppo/config.yaml of an earlier attempt with other settings (killed; PPO then started over with the run's
    own config, killed too): `ppo --resume` continues the latest attempt with its config, not the stale one.
    Without Ray: the PPO loop is replaced by one that dies the first time and records its config the second (the
    loop's own kill and resume from a checkpoint: the killed-attempt test above and tests/test_resume.py)."""
    from rayrlhf.pipeline.cli import main

    ran = []

    def ppo_loop(cfg, run, sft_ckpt, rm_ckpt, latest, command):
        ran.append(cfg)
        if len(ran) == 1:
            raise RuntimeError("the PPO attempt was killed")
        return {"ppo/steps": float(cfg.ppo.steps)}

    monkeypatch.setattr("rayrlhf.pipeline.workflow.shutdown", lambda: None)
    monkeypatch.setattr("rayrlhf.pipeline.workflow.connect", lambda cfg: None)
    monkeypatch.setattr("rayrlhf.pipeline.workflow._run_ppo", ppo_loop)
    run = _finished_run(tmp_path / "R", tiny_checkpoints, tiny_overrides, ppo_finished=False)
    stale = load_config(None, [*tiny_overrides, *PPO_SIZES, "ppo.steps=4", "ppo.checkpoint_every=2"])
    (run / "ppo").mkdir()
    (run / "ppo" / "config.yaml").write_text(config_to_yaml(stale))

    assert main(["ppo", "--run-dir", str(run)]) == 1
    assert not (run / "ppo" / "config.yaml").exists()  # the plain rerun ran with the run's own config
    assert main(["ppo", "--resume", str(run)]) == 0
    assert [c.ppo.steps for c in ran] == [2, 2]  # the run's config both times, not the stale attempt's 4
    assert json.loads((run / "stages.json").read_text())["ppo"]["ppo/steps"] == 2.0


def test_start_attempt_unfinishes_the_stage_drops_its_checkpoints_and_records_its_config(make_tiny_cfg, tmp_path):
    from rayrlhf.pipeline.run_dir import RunDir

    cfg, other = make_tiny_cfg(), make_tiny_cfg("ppo.steps=4")
    run = RunDir.create(cfg, tmp_path / "R")
    run.record("sft", {"sft/valid_loss": 3.0})
    run.record("ppo", {"ppo/steps": 2.0})
    (run.stage("ppo") / "checkpoints" / "step-000001").mkdir(parents=True)
    run.start_attempt("ppo", other)
    assert set(run.stages()) == {"sft"}
    assert not (run.path / "ppo" / "checkpoints").exists()  # never continued by a `--resume` of this attempt
    assert load_config(run.attempt_config("ppo")).ppo.steps == 4
    run.start_attempt("ppo", None)  # again with the run's own config: the other one is stale
    assert run.attempt_config("ppo") is None and set(run.stages()) == {"sft"}


def test_the_resume_hint_names_the_command_that_started_the_run(monkeypatch, make_tiny_cfg, tiny_checkpoints,
                                                               tiny_overrides, tmp_path):
    """`train` hands its own name to the PPO driver, `ppo` its own: each hint continues the PPO stage that failed
    (`train --resume` on a run begun by `rayrlhf ppo` would start it over from SFT)."""
    from rayrlhf.pipeline import workflow
    from rayrlhf.pipeline.driver import PPODriver
    from rayrlhf.pipeline.run_dir import RunDir

    run = RunDir(_finished_run(tmp_path / "R", tiny_checkpoints, tiny_overrides, ppo_finished=False))
    cfg = load_config(run.path / "config.yaml")
    hints = []

    class Started(Exception):
        pass

    def driver(*args, command: str):
        hints.append(PPODriver(*args, command=command)._resume_hint())  # before any role starts
        raise Started

    monkeypatch.setattr(workflow, "connect", lambda cfg: None)
    monkeypatch.setattr(workflow, "PPODriver", driver)
    for start in (lambda: workflow.ppo(cfg, run, resume=True), lambda: workflow.train(cfg, run, resume=True)):
        with pytest.raises(Started):
            start()
    assert hints == [f" (no PPO checkpoint was written yet; `rayrlhf {command} --resume {run.path}` continues the "
                     f"PPO stage)" for command in ("ppo", "train")]
