"""Regenerate the config reference in docs/config.md from the config models (between its config-reference markers).

The reference once lived in README.md, hence this script's name; README.md now links to docs/config.md."""

from pathlib import Path

from rayrlhf.tools.config_docs import reference_markdown

CONFIG_DOC = Path(__file__).resolve().parents[1] / "docs" / "config.md"
START, END = "<!-- config-reference:start -->\n", "<!-- config-reference:end -->"

text = CONFIG_DOC.read_text()
head, rest = text.split(START)
CONFIG_DOC.write_text(head + START + reference_markdown() + END + rest.split(END, 1)[1])
print(f"updated {CONFIG_DOC}")
