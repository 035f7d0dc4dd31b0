"""The README's config reference is generated from the config models; it must match them."""

from pathlib import Path

from rayrlhf.core.config_docs import reference_markdown


def test_readme_config_reference_is_current():
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split("<!-- config-reference:start -->\n")[1].split("<!-- config-reference:end -->")[0]
    assert section == reference_markdown(), "README config reference is stale: regenerate with python scripts/update_readme_config.py"


def test_readme_test_command_is_what_ci_runs():
    root = Path(__file__).resolve().parents[1]
    command = "bash scripts/setup.sh test && .venv/bin/python -m pytest"
    assert command in (root / "README.md").read_text()
    assert command in (root / ".ci" / "run").read_text()
