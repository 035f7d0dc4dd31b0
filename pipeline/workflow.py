"""The stages of a run, in order, each on Ray: SFT -> reward model -> PPO -> evaluation and report."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from pipeline.cluster import connect
from pipeline.config import Config
from pipeline.run_dir import RunDir, require_checkpoint

log = logging.getLogger(__name__)


def open_run(cfg: Config, path: str | None) -> RunDir:
    return RunDir.create(cfg, path)


def _done(run: RunDir, stage: str, summary: dict) -> None:
    run.record(stage, summary)
    log.info("%s finished: %s", stage, json.dumps({k: round(v, 4) if isinstance(v, float) else v
                                                    for k, v in summary.items()}))


def sft(cfg: Config, run: RunDir) -> Path:
    from actors.stages import run_sft

    connect(cfg)
    _done(run, "sft", run_sft(cfg, run.stage("sft")))
    return run.checkpoint("sft")


def rm(cfg: Config, run: RunDir, sft_checkpoint: Path | None = None) -> Path:
    from actors.stages import run_rm

    sft_ckpt = require_checkpoint(sft_checkpoint or run.checkpoint("sft"), "SFT")
    connect(cfg)
    _done(run, "rm", run_rm(cfg, run.stage("rm"), sft_ckpt))
    return run.checkpoint("rm")


def ppo(cfg: Config, run: RunDir, sft_checkpoint: Path | None = None, rm_checkpoint: Path | None = None) -> Path:
    from pipeline.driver import PPODriver

    sft_ckpt = require_checkpoint(sft_checkpoint or run.checkpoint("sft"), "SFT")
    rm_ckpt = require_checkpoint(rm_checkpoint or run.checkpoint("rm"), "reward model")
    connect(cfg)
    driver = PPODriver(cfg, run.stage("ppo"), sft_ckpt, rm_ckpt)
    try:
        _done(run, "ppo", driver.run())
    finally:
        driver.close()
    return run.checkpoint("ppo")


def evaluate(cfg: Config, run: RunDir) -> Path:
    from pipeline.evaluate import evaluate_run
    from pipeline.report import write_report

    connect(cfg)
    _done(run, "eval", evaluate_run(cfg, run))
    report = write_report(run)
    print(f"report: {report}")
    return report


def train(cfg: Config, run: RunDir) -> Path:
    sft(cfg, run)
    rm(cfg, run)
    ppo(cfg, run)
    return evaluate(cfg, run)


def shutdown() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
