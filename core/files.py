"""Files written so that a crash never leaves half of one: the foundation of checkpoints, metrics and run
directories (below all three, so none of them imports another for it)."""

from __future__ import annotations

import json
import os
from pathlib import Path


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1))


def read_json(path: Path):
    return json.loads(path.read_text())
