"""The stages of a run, in order, each on Ray: SFT -> reward model (-> judge) -> PPO -> evaluation and report.

The judge is a second reward model trained on comparisons disjoint from the first (data.judge_fraction): it
scores the SFT and PPO policies in evaluation, so a policy that exploits the training reward model shows.

A stage that starts (not resumed) is a new attempt: it takes itself out of stages.json before it writes anything
else and records the config it runs with (`RunDir.start_attempt`), so a killed attempt is never mistaken for
the finished one it replaces. With `resume`, a stage recorded as finished in stages.json is skipped and the
stage that was running continues from its latest checkpoint (`<stage>/checkpoints/latest`), or starts over
when it wrote none, with the config its attempt was started with.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import ray

from rayrlhf.actors import RMStage, SFTStage, evaluate_task
from rayrlhf.core.checkpoints import CheckpointDir
from rayrlhf.core.config import Config, load_config
from rayrlhf.core.metrics import read_metrics
from rayrlhf.core.text import budget_warnings
from rayrlhf.pipeline.cluster import connect
from rayrlhf.pipeline.driver import DriverState, PPODriver
from rayrlhf.pipeline.calls import first_line
from rayrlhf.pipeline.launch import LearnerLost, placed, run_group
from rayrlhf.pipeline.preflight import config_differences
from rayrlhf.pipeline.report import write_report
from rayrlhf.pipeline.resources import RoleSection, actor_options, bundle
from rayrlhf.pipeline.run_dir import RunDir, require_checkpoint

log = logging.getLogger(__name__)

STAGES = ("sft", "rm", "judge", "ppo", "eval")


def open_run(cfg: Config, path: str | None) -> RunDir:
    return RunDir.create(cfg, path)


def _done(run: RunDir, stage: str, summary: dict) -> None:
    run.record(stage, summary)
    log.info("%s finished: %s", stage, json.dumps({k: round(v, 4) if isinstance(v, float) else v
                                                    for k, v in summary.items()}))


def _skip(run: RunDir, stage: str, resume: bool) -> bool:
    if resume and stage in run.stages():
        log.info("resume: %s already finished, skipped", stage)
        return True
    return False


def _attempt(run: RunDir, stage: str, cfg: Config, resume: bool) -> Config:
    """The config `stage` runs with. Resumed: the one its interrupted attempt was started with. Else a new attempt
    starts, before the stage writes anything: `cfg` is recorded as the stage's own where it differs from the
    run's config.yaml (ignoring where Ray runs), and a stale one of an earlier attempt is removed."""
    if resume:
        own = run.attempt_config(stage)
        return load_config(own, written_by_a_run=True) if own is not None else cfg
    saved = run.path / "config.yaml"
    differs = saved.is_file() and config_differences(load_config(saved, written_by_a_run=True).model_dump(mode="json"),
                                                     cfg.model_dump(mode="json"))
    run.start_attempt(stage, cfg if differs else None)
    return cfg


def _run_on(cfg: Config, role: str, stage: type, section: RoleSection, args: tuple) -> dict[str, float]:
    """Run an offline stage's single actor to its end in a placement of its own (one the cluster cannot give
    fails within `ray.startup_timeout_s`, naming the role and resource), then free its resources."""
    with placed({role: [bundle(section)]}, cfg.ray.startup_timeout_s) as placement:
        actor = stage.options(**actor_options(section), scheduling_strategy=placement.on(role)).remote(*args)
        try:
            return ray.get(actor.run.remote())
        finally:
            ray.kill(actor)


def run_sft(cfg: Config, out_dir: Path, resume: bool = False) -> dict[str, float]:
    sc = cfg.sft
    if sc.workers > 1:
        return run_group(SFTStage, "sft", sc.workers, sc, (cfg, str(out_dir), resume), cfg.ray.startup_timeout_s)
    return _run_on(cfg, "sft", SFTStage, sc, (cfg, str(out_dir), resume))


def run_rm(cfg: Config, out_dir: Path, sft_checkpoint: Path, resume: bool = False,
           role: str = "rm") -> dict[str, float]:
    rm_cfg, args = cfg.rm, (cfg, str(out_dir), str(sft_checkpoint), resume, role)
    if rm_cfg.workers > 1:
        return run_group(RMStage, role, rm_cfg.workers, rm_cfg, args, cfg.ray.startup_timeout_s)
    return _run_on(cfg, role, RMStage, rm_cfg, args)


def evaluate_run(cfg: Config, run: RunDir) -> dict[str, float]:
    """Evaluate a run directory's policies in a Ray task with the SFT stage's resources."""
    ppo = run.checkpoint("ppo")
    judge = judge_checkpoint(cfg, run)
    sft, rm = run.evaluated_checkpoints()
    args = (cfg, str(sft), str(rm), str(ppo) if (ppo / "config.json").exists() else None, str(run.path / "eval"),
            str(judge) if judge is not None else None)
    with placed({"eval": [bundle(cfg.eval)]}, cfg.ray.startup_timeout_s) as placement:
        task = evaluate_task.options(**actor_options(cfg.eval), scheduling_strategy=placement.on("eval"))
        return ray.get(task.remote(*args))


def judge_checkpoint(cfg: Config, run: RunDir) -> Path | None:
    """The judge evaluation uses: eval.judge_checkpoint, else the run's own judge stage, else none."""
    if cfg.eval.judge_checkpoint is not None:
        return Path(cfg.eval.judge_checkpoint)
    own = run.checkpoint("judge")
    return own if (own / "config.json").is_file() else None


def sft(cfg: Config, run: RunDir, resume: bool = False) -> Path:
    if not _skip(run, "sft", resume):
        cfg = _attempt(run, "sft", cfg, resume)
        connect(cfg)
        _done(run, "sft", run_sft(cfg, run.stage("sft"), resume))
    return run.checkpoint("sft")


def _inputs(run: RunDir, stage: str, resume: bool, **given: Path | None) -> dict[str, Path]:
    """The outside checkpoints `stage` starts from: those given (recorded in the run directory), or on resume
    those recorded when it started; None where the run's own stage output is used."""
    if resume:
        return run.inputs(stage)
    explicit = {k: v for k, v in given.items() if v is not None}
    run.record_inputs(stage, **explicit)
    return explicit


def rm(cfg: Config, run: RunDir, sft_checkpoint: Path | None = None, resume: bool = False,
       role: str = "rm") -> Path:
    """The reward model (role "rm") or the judge (role "judge": the same recipe on the judge's comparisons)."""
    if not _skip(run, role, resume):
        cfg = _attempt(run, role, cfg, resume)
        sft_checkpoint = _inputs(run, role, resume, sft_checkpoint=sft_checkpoint).get("sft_checkpoint")
        sft_ckpt = require_checkpoint(sft_checkpoint or run.checkpoint("sft"), "SFT")
        connect(cfg)
        _done(run, role, run_rm(cfg, run.stage(role), sft_ckpt, resume, role))
    return run.checkpoint(role)


def ppo(cfg: Config, run: RunDir, sft_checkpoint: Path | None = None, rm_checkpoint: Path | None = None,
        resume: bool = False, command: str = "ppo") -> Path:
    """PPO; `command` ("ppo" or "train") started the run and is what the driver's hints say continues it."""
    if _skip(run, "ppo", resume):
        return run.checkpoint("ppo")
    cfg = _attempt(run, "ppo", cfg, resume)
    inputs = _inputs(run, "ppo", resume, sft_checkpoint=sft_checkpoint, rm_checkpoint=rm_checkpoint)
    sft_checkpoint, rm_checkpoint = inputs.get("sft_checkpoint"), inputs.get("rm_checkpoint")
    latest = CheckpointDir(run.path / "ppo" / "checkpoints").latest() if resume else None
    if latest is not None:  # the checkpoints the interrupted run was started with
        state = DriverState.read(latest)
        sft_checkpoint, rm_checkpoint = Path(state.sft_checkpoint), Path(state.rm_checkpoint)
        log.info("resume: PPO from %s", latest)
    sft_ckpt = require_checkpoint(sft_checkpoint or run.checkpoint("sft"), "SFT")
    rm_ckpt = require_checkpoint(rm_checkpoint or run.checkpoint("rm"), "reward model")
    connect(cfg)
    summary = _run_ppo(cfg, run, sft_ckpt, rm_ckpt, latest, command)
    rows = read_metrics(run.path / "ppo" / "metrics.jsonl")
    eos = [r["rollout/eos_fraction"] for r in rows if "rollout/eos_fraction" in r]
    summary["ppo/eos_fraction_mean"] = sum(eos) / len(eos) if eos else float("nan")
    for warning in budget_warnings(summary):
        log.warning("budgets: %s", warning)
    _done(run, "ppo", summary)
    return run.checkpoint("ppo")


def _run_ppo(cfg: Config, run: RunDir, sft_ckpt: Path, rm_ckpt: Path, latest: Path | None,
             command: str) -> dict[str, float]:
    """The PPO driver, started again from the last checkpoint (on new learner ranks, wherever Ray places them)
    each time a learner rank dies, up to `ppo.max_learner_restarts` times; then the loss ends the run."""
    budget, restarts, lost = cfg.ppo.max_learner_restarts, 0, None
    while True:
        driver = PPODriver(cfg, run.stage("ppo"), sft_ckpt, rm_ckpt, command=command)
        try:
            return driver.run(resume_from=latest)
        except LearnerLost as e:
            if restarts == budget:
                raise LearnerLost(f"{e} [ppo.max_learner_restarts={budget} used]", e.nodes) from e
            restarts, lost = restarts + 1, e
            latest = CheckpointDir(run.path / "ppo" / "checkpoints").latest()
            log.warning("PPO restart %d of %d: %s; going on from %s", restarts, budget, first_line(e),
                        latest or "the start (no checkpoint was written)")
        except Exception as e:
            if lost is None:
                raise
            # e.g. no room for the new learner ranks: say which loss this attempt was replacing
            raise RuntimeError(f"{first_line(e, 500)} (PPO restart {restarts} of {budget}, after: "
                               f"{first_line(lost, 500)})") from e
        finally:
            driver.close()


def evaluate(cfg: Config, run: RunDir) -> Path:
    cfg = _attempt(run, "eval", cfg, resume=False)  # evaluation is never resumed, always run again
    connect(cfg)
    _done(run, "eval", evaluate_run(cfg, run))
    report = write_report(run)
    print(f"report: {report}")
    return report


def train(cfg: Config, run: RunDir, resume: bool = False) -> Path:
    sft(cfg, run, resume)
    rm(cfg, run, resume=resume)
    if cfg.data.judge_fraction > 0 and cfg.eval.judge_checkpoint is None:
        rm(cfg, run, resume=resume, role="judge")
    ppo(cfg, run, resume=resume, command="train")
    return evaluate(cfg, run)


def shutdown() -> None:
    if ray.is_initialized():
        ray.shutdown()
