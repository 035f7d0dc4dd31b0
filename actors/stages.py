"""Ray actors for the offline stages (SFT, reward model): each hosts its trainer on the configured resources."""

from __future__ import annotations

from pathlib import Path

import ray

from pipeline.cluster import init_worker_process
from pipeline.config import Config
from pipeline.rm import RMTrainer
from pipeline.sft import SFTTrainer


@ray.remote
class SFTStage:
    def __init__(self, cfg: Config, out_dir: str, resume: bool):
        init_worker_process(cfg.sft.num_cpus)
        self.trainer = SFTTrainer(cfg, Path(out_dir), resume)

    def run(self) -> dict[str, float]:
        return self.trainer.run()


@ray.remote
class RMStage:
    def __init__(self, cfg: Config, out_dir: str, sft_checkpoint: str, resume: bool):
        init_worker_process(cfg.rm.num_cpus)
        self.trainer = RMTrainer(cfg, Path(out_dir), sft_checkpoint, resume)

    def run(self) -> dict[str, float]:
        return self.trainer.run()


def run_sft(cfg: Config, out_dir: Path, resume: bool = False) -> dict[str, float]:
    actor = SFTStage.options(num_cpus=cfg.sft.num_cpus, num_gpus=cfg.sft.num_gpus).remote(cfg, str(out_dir), resume)
    try:
        return ray.get(actor.run.remote())
    finally:
        ray.kill(actor)


def run_rm(cfg: Config, out_dir: Path, sft_checkpoint: Path, resume: bool = False) -> dict[str, float]:
    actor = RMStage.options(num_cpus=cfg.rm.num_cpus, num_gpus=cfg.rm.num_gpus).remote(
        cfg, str(out_dir), str(sft_checkpoint), resume)
    try:
        return ray.get(actor.run.remote())
    finally:
        ray.kill(actor)
