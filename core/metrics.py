"""Metrics as JSONL (one object per step) and TensorBoard scalars, with namespaced names (`ppo/...`)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from core.checkpoints import atomic_write_text


class MetricsLogger:
    """Appends `{"step": s, "time": t, name: value, ...}` lines to metrics.jsonl and mirrors them to TensorBoard."""

    def __init__(self, log_dir: str | Path, tensorboard: bool = True):
        self.dir = Path(log_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "metrics.jsonl"
        self._file = self.path.open("a")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.dir / "tensorboard"))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for name in metrics:
            if "/" not in name:
                raise ValueError(f"metric {name!r} must be namespaced, e.g. 'ppo/{name}'")
        clean = {k: float(v) for k, v in metrics.items()}
        self._file.write(json.dumps({"step": step, "time": time.time(), **clean}) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in clean.items():
                if math.isfinite(v):
                    self._tb.add_scalar(k, v, step)

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


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
