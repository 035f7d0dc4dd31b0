"""bench/gpu_check.py, the GPU path rehearsed, on the CPU: the toy size runs every role of both architectures and
passes every check; a failed check, or a role that raises, makes the exit status non-zero and is named."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    """The script as a module (it imports no torch until it runs)."""
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    yield module
    del sys.modules["gpu_check"]


@pytest.mark.slow
def test_toy_run_on_the_cpu_passes_every_check_of_every_role(gpu_check, tmp_path):
    out = tmp_path / "gpu_check.json"
    result = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--size", "toy", "--json", str(out)],
                            cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                            timeout=900, check=False)
    assert result.returncode == 0, result.stdout + result.stderr[-6000:]
    archs, _ = gpu_check.SIZES["toy"]
    table = [line.split() for line in result.stdout.splitlines() if line.strip()]
    for arch in archs:
        rows = [cells for cells in table if cells[0] == arch.name]
        assert [cells[1] for cells in rows] == list(gpu_check.ROLES), result.stdout
        assert all("ok" in cells for cells in rows), result.stdout
    assert any(c[0] == "all" and c[-2:] == ["checks", "passed"] for c in table), result.stdout
    data = json.loads(out.read_text())
    expected = [(arch.name, role) for arch in archs for role in gpu_check.ROLES]
    assert [(r["model"], r["role"]) for r in data["rows"]] == expected
    assert not any(r["failed"] for r in data["rows"])


def test_a_failed_check_fails_the_run_and_is_named(gpu_check):
    passed, failed = gpu_check.Row("pythia-1b", "sft"), gpu_check.Row("pythia-1b", "learner")
    passed.check("ran", True)
    failed.check("ran", True)
    failed.diff_max, failed.diff_mean = 2e-3, 1e-4
    gpu_check.check_mismatch(failed, "fp32", None)  # above the fp32 bound, within bf16's
    lines: list[str] = []
    assert gpu_check.report([passed], lines.append) == 0
    assert lines[-1] == "all 1 checks passed"
    lines.clear()
    assert gpu_check.report([passed, failed], lines.append) == 1
    assert "FAILED pythia-1b/learner: mismatch (max |dlogp| 0.002 > 0.001)" in lines
    assert lines[-1] == "1 of 3 checks failed"


def test_mismatch_bounds_by_precision(gpu_check):
    def mismatch(precision: str, diff_max: float, diff_mean: float, bound: float | None = None) -> bool:
        row = gpu_check.Row("m", "reference", diff_max=diff_max, diff_mean=diff_mean)
        gpu_check.check_mismatch(row, precision, bound)
        return row.checks[-1].ok

    assert mismatch("fp32", 5e-4, 1e-5) and not mismatch("fp32", 2e-3, 1e-5)
    assert mismatch("bf16", 0.5, 0.01)
    assert not mismatch("bf16", 1.5, 0.01)  # the max
    assert not mismatch("bf16", 0.5, 0.1)  # the mean
    assert not mismatch("bf16", 0.5, 0.01, bound=0.1)  # --max-abs-diff
    assert not mismatch("bf16", float("nan"), float("nan"))


def test_a_role_that_raises_fails_its_ran_check_and_the_run_goes_on(gpu_check, capsys):
    row = gpu_check.Row("smollm2-135m", "rollout")
    assert gpu_check.attempt(row, lambda r: 1 / 0) is None
    assert [(c.name, c.ok) for c in row.checks] == [("ran", False)]
    assert row.checks[0].detail == "ZeroDivisionError: division by zero"
    assert "Traceback" in capsys.readouterr().err  # for whoever reads the GPU machine's log
    done = gpu_check.Row("smollm2-135m", "reference")
    assert gpu_check.attempt(done, lambda r: r.check("finite", True) and 7) == 7
    assert gpu_check.report([row, done], print) == 1
    assert "FAILED smollm2-135m/rollout: ran (ZeroDivisionError: division by zero)" in capsys.readouterr().out


def test_main_exits_non_zero_when_a_check_fails(gpu_check, monkeypatch, capsys):
    """The exit status is the checks': main() with every model's roles replaced by one failing row."""
    def one_failing_row(arch, *args):
        row = gpu_check.Row(arch.name, "sft")
        row.check("loss falls", False, "loss 6.2 -> 6.3")
        return [row]

    monkeypatch.setattr(gpu_check, "check_model", one_failing_row)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", os.environ.get("CUDA_VISIBLE_DEVICES", ""))  # main() hides GPUs
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--device", "cpu", "--size", "toy", "--precision", "fp32"])
    assert gpu_check.main() == 1
    out = capsys.readouterr().out
    assert "FAILED smollm2-toy/sft: loss falls (loss 6.2 -> 6.3)" in out and "2 of 2 checks failed" in out
