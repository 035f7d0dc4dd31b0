"""The README is a short front page; the docs site builds; the config reference in docs/config.md is generated
from the config models and must match them."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rayrlhf.tools.config_docs import reference_markdown

ROOT = Path(__file__).resolve().parents[1]


def test_config_reference_is_current():
    text = (ROOT / "docs" / "config.md").read_text()
    section = text.split("<!-- config-reference:start -->\n")[1].split("<!-- config-reference:end -->")[0]
    assert section == reference_markdown(), (
        "docs/config.md config reference is stale: regenerate with python scripts/update_readme_config.py"
    )


def test_readme_test_command_is_what_ci_runs():
    command = "bash scripts/setup.sh test && .venv/bin/python -m pytest"
    assert command in (ROOT / "README.md").read_text()
    assert command in (ROOT / ".ci" / "run").read_text()


def test_readme_is_a_front_page():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines (at most 250): move detail into docs/"


def test_docs_site_builds_strict(tmp_path):
    # --strict turns every warning into an error: a broken link or anchor, a page missing from nav (mkdocs.yml).
    pytest.importorskip("mkdocs")
    pytest.importorskip("material")  # mkdocs-material, the theme
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
