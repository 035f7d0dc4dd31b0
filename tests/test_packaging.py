"""One import name: a plain (non-editable) wheel installs only `rayrlhf` (the repository's folders become
`rayrlhf.core`, `rayrlhf.roles`, ...). `rayrlhf train` from that install alone is the real-model recipe's smoke
run (tests/test_recipe.py), which runs the wheel's console script."""

from __future__ import annotations

import subprocess
import sys


def test_a_wheel_installs_one_top_level_package(wheel_install, tmp_path):
    top = sorted(p.name for p in wheel_install.site.iterdir() if p.name != "bin")
    assert top == ["rayrlhf", "rayrlhf-0.1.0.dist-info"]
    assert (wheel_install.site / "rayrlhf" / "configs" / "default.yaml").is_file()
    code = "import rayrlhf.pipeline.cli as c, rayrlhf.core.config as k; print(c.__file__); print(k.packaged_config_path())"
    where = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                           env=wheel_install.env, timeout=120)
    assert where.returncode == 0, where.stderr
    assert all(line.startswith(str(wheel_install.site)) for line in where.stdout.split()), where.stdout
    help_ = subprocess.run([wheel_install.rayrlhf, "--help"], capture_output=True, text=True, cwd=tmp_path,
                           env=wheel_install.env, timeout=120)
    assert help_.returncode == 0 and "rayrlhf" in help_.stdout
