"""One import name: a plain (non-editable) wheel installs only `rayrlhf` (the repository's folders become
`rayrlhf.core`, `rayrlhf.roles`, ...), and `rayrlhf train` runs from that install alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY_OVERRIDES

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def test_a_wheel_installs_one_top_level_package_and_trains(tmp_path):
    wheels, target = tmp_path / "wheels", tmp_path / "site"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(wheels), str(ROOT)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert build.returncode == 0, build.stderr
    wheel = next(wheels.glob("rayrlhf-*.whl"))
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                              str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr
    top = sorted(p.name for p in target.iterdir() if p.name != "bin")
    assert top == ["rayrlhf", "rayrlhf-0.1.0.dist-info"]
    assert (target / "rayrlhf" / "configs" / "default.yaml").is_file()

    # The installed console script, from outside the repository, the install first on the path (the workers
    # of its local Ray inherit PYTHONPATH), so nothing of the checkout is imported.
    run = tmp_path / "run"
    argv = [str(target / "bin" / "rayrlhf"), "train", "--run-dir", str(run)]
    for o in [*TINY_OVERRIDES, "ppo.steps=2", "sft.epochs=1", "rm.epochs=1", "eval.num_prompts=8"]:
        argv += ["--set", o]
    env = {**os.environ, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run(argv, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert list(json.loads((run / "stages.json").read_text())) == ["sft", "rm", "ppo", "eval"]
    assert (run / "report.md").is_file()
    where = subprocess.run([sys.executable, "-c", "import rayrlhf.pipeline.cli as c; print(c.__file__)"],
                           capture_output=True, text=True, cwd=tmp_path, env=env)
    assert where.stdout.strip().startswith(str(target)), where.stdout
