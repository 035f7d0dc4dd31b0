"""The run directory: one per run, holding the config, every stage's output and the report.

    <run>/config.yaml          the validated config the run was started with (never rewritten)
    <run>/<stage>/config.yaml  the config of the stage's latest attempt, where it differs from the run's (e.g. other
                               PPO settings); `--resume` continues that attempt with it
    <run>/sft/checkpoint       best SFT policy (HF format + tokenizer); metrics.jsonl, tensorboard/
    <run>/rm/checkpoint        reward model (sequence classification, reward_bias in its config)
    <run>/ppo/checkpoint       final PPO policy; ppo/critic; ppo/state.pt; metrics.jsonl
    <run>/eval/                evaluation results; <run>/report.md and plots
    <run>/stages.json          each finished stage's summary metrics; a stage that starts again is taken out first
                               (`start_attempt`), so a killed attempt is never taken for the finished one before it
    <run>/inputs.json          checkpoints from outside the run a stage was started from (`--sft-checkpoint`, ...),
                               so that `--resume` continues it from the same ones
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from rayrlhf.core.checkpoints import CheckpointDir
from rayrlhf.core.files import atomic_write_text
from rayrlhf.core.config import Config, config_to_yaml


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

    def start_attempt(self, stage: str, own_config: Config | None) -> None:
        """A new attempt at `stage`, before it writes anything else: first it is no longer finished in stages.json
        (one atomic rewrite), then the previous attempt's resumable checkpoints go (a `--resume` must never continue
        them), then its config is recorded: `own_config` where it differs from the run's, else none (a stale one
        would be what `--resume` continues with)."""
        path = self.path / "stages.json"
        stages = self.stages()
        if stages.pop(stage, None) is not None:
            atomic_write_text(path, json.dumps(stages, indent=2))
        CheckpointDir(self.path / stage / "checkpoints").clear()
        config = self.path / stage / "config.yaml"
        if own_config is None:
            config.unlink(missing_ok=True)
        else:
            atomic_write_text(self.stage(stage) / "config.yaml", config_to_yaml(own_config))

    def keep_stage_config(self, stage: str, cfg: Config) -> Path:
        """The config a stage ran with when it differs from the run's (which stays as it is): a new attempt."""
        self.start_attempt(stage, cfg)
        return self.path / stage / "config.yaml"

    def attempt_config(self, stage: str) -> Path | None:
        """The config file of `stage`'s latest attempt where it ran with one of its own, else None (the run's)."""
        path = self.path / stage / "config.yaml"
        return path if path.is_file() else None

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
