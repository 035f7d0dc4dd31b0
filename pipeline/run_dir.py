"""The run directory: one per run, holding the config, every stage's output and the report.

    <run>/config.yaml          the validated config the run was started with (never rewritten)
    <run>/<stage>/config.yaml  a stage's own config, where it was run with another (e.g. other PPO settings)
    <run>/sft/checkpoint       best SFT policy (HF format + tokenizer); metrics.jsonl, tensorboard/
    <run>/rm/checkpoint        reward model (sequence classification, reward_bias in its config)
    <run>/ppo/checkpoint       final PPO policy; ppo/critic; ppo/state.pt; metrics.jsonl
    <run>/eval/                evaluation results; <run>/report.md and plots
    <run>/stages.json          each finished stage's summary metrics
    <run>/inputs.json          checkpoints from outside the run a stage was started from (`--sft-checkpoint`, ...),
                               so that `--resume` continues it from the same ones
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from core.checkpoints import atomic_write_text
from core.config import Config, config_to_yaml


@dataclass(frozen=True)
class RunDir:
    path: Path

    @classmethod
    def create(cls, cfg: Config, path: str | Path | None = None) -> RunDir:
        """A new run directory (or an existing one to add stages to), with the config written into it."""
        if path is None:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            path = Path(cfg.run.output_dir) / f"{cfg.run.name}-{stamp}"
        run = cls(Path(path))
        run.path.mkdir(parents=True, exist_ok=True)
        if not (run.path / "config.yaml").is_file():  # an existing run keeps its own (`preflight.run_config`)
            atomic_write_text(run.path / "config.yaml", config_to_yaml(cfg))
        return run

    def stage(self, name: str) -> Path:
        p = self.path / name
        p.mkdir(parents=True, exist_ok=True)
        return p

    def checkpoint(self, stage: str) -> Path:
        return self.path / stage / "checkpoint"

    def record(self, stage: str, summary: dict) -> None:
        path = self.path / "stages.json"
        stages = json.loads(path.read_text()) if path.exists() else {}
        stages[stage] = summary
        atomic_write_text(path, json.dumps(stages, indent=2))

    def keep_stage_config(self, stage: str, cfg: Config) -> Path:
        """The config a stage ran with when it differs from the run's (which stays as it is)."""
        path = self.stage(stage) / "config.yaml"
        atomic_write_text(path, config_to_yaml(cfg))
        return path

    def record_inputs(self, stage: str, **checkpoints: Path) -> None:
        """Remember the outside checkpoints `stage` starts from (absolute paths)."""
        path = self.path / "inputs.json"
        inputs = json.loads(path.read_text()) if path.exists() else {}
        inputs[stage] = {k: str(Path(v).resolve()) for k, v in checkpoints.items()}
        atomic_write_text(path, json.dumps(inputs, indent=2))

    def inputs(self, stage: str) -> dict[str, Path]:
        path = self.path / "inputs.json"
        recorded = json.loads(path.read_text()).get(stage, {}) if path.exists() else {}
        return {k: Path(v) for k, v in recorded.items()}

    def evaluated_checkpoints(self) -> tuple[Path, Path]:
        """(SFT, reward model) that evaluation compares against: those the PPO stage started from when they came
        from outside the run (`inputs.json`), else the run's own."""
        given = self.inputs("ppo")
        return given.get("sft_checkpoint", self.checkpoint("sft")), given.get("rm_checkpoint", self.checkpoint("rm"))

    def stages(self) -> dict:
        path = self.path / "stages.json"
        return json.loads(path.read_text()) if path.exists() else {}


def require_checkpoint(path: Path, what: str) -> Path:
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{what} checkpoint not found at {path} (no config.json); run that stage first "
                                f"or pass its path")
    return path
