"""Metrics as JSONL (one object per step), TensorBoard scalars and Weights & Biases, with namespaced names
(`ppo/...`). The JSONL file is the record (reports, resume); the others mirror it."""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from rayrlhf.core.files import atomic_write_text

if TYPE_CHECKING:
    from rayrlhf.core.config import Config


# What W&B reads from the environment to reach (or not reach) its server: each stage's W&B run is made in the
# process that runs the stage, an actor on any node of a cluster, which does not inherit this process's environment.
WANDB_ENV = ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL")


def wandb_env(cfg: Config) -> dict[str, str]:
    """The W&B variables set here, to hand to the cluster's processes (a job's or a connection's runtime env)
    when the run logs to W&B; nothing otherwise."""
    if "wandb" not in cfg.run.loggers:
        return {}
    return {k: os.environ[k] for k in WANDB_ENV if k in os.environ}


def wandb_run(cfg: Config, run_dir: Path, stage: str):
    """The W&B run of one stage of a rayrlhf run: id `<run id>-<stage>` (the run id is made once and kept in
    <run>/wandb_id, so a resumed stage appends to its own W&B run), grouped by the run directory's name, with the
    whole config. Offline (WANDB_MODE=offline) it is written under <run>/wandb."""
    import wandb

    id_file = run_dir / "wandb_id"
    if not id_file.exists():
        atomic_write_text(id_file, uuid.uuid4().hex[:8])
    run_id = id_file.read_text().strip()
    return wandb.init(project=cfg.run.wandb_project, entity=cfg.run.wandb_entity, id=f"{run_id}-{stage}",
                      name=f"{run_dir.name}/{stage}", group=run_dir.name, job_type=stage, dir=str(run_dir),
                      config=cfg.model_dump(mode="json"), resume="allow", reinit="finish_previous")


class MetricsLogger:
    """Appends `{"step": s, "time": t, name: value, ...}` lines to metrics.jsonl and mirrors them to TensorBoard
    and, with `cfg.run.loggers` naming it, to the stage's W&B run (`wandb_run`)."""

    def __init__(self, log_dir: str | Path, tensorboard: bool = True, cfg: Config | None = None):
        self.dir = Path(log_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "metrics.jsonl"
        self._file = self.path.open("a")
        loggers = cfg.run.loggers if cfg is not None else ["tensorboard"] if tensorboard else []
        self._tb = self._wandb = None
        if "tensorboard" in loggers:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.dir / "tensorboard"))
        if "wandb" in loggers:  # only a cfg names it
            self._wandb = wandb_run(cfg, self.dir.parent, self.dir.name)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for name in metrics:
            if "/" not in name:
                raise ValueError(f"metric {name!r} must be namespaced, e.g. 'ppo/{name}'")
        clean = {k: float(v) for k, v in metrics.items()}
        self._file.write(json.dumps({"step": step, "time": time.time(), **clean}) + "\n")
        self._file.flush()
        finite = {k: v for k, v in clean.items() if math.isfinite(v)}
        if self._tb is not None:
            for k, v in finite.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(finite, step=step)

    @staticmethod
    def truncate(log_dir: str | Path, last_step: int) -> int:
        """Drop rows after `last_step` (written by a run that then died); returns how many were dropped.
        A resumed run writes those steps again; TensorBoard shows the newest value of a step."""
        path = Path(log_dir) / "metrics.jsonl"
        rows = read_metrics(path)
        keep = [r for r in rows if r["step"] <= last_step]
        if len(keep) < len(rows):
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in keep))
        return len(rows) - len(keep)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


class NoMetrics:
    """Where the ranks of a trainer group other than rank 0 log: nowhere (rank 0 logs the group's figures)."""

    def log(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def close(self) -> None:
        pass


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
