"""Regenerate README.md's config reference from the config models (between its config-reference markers)."""

from pathlib import Path

from rayrlhf.core.config_docs import reference_markdown

README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- config-reference:start -->\n", "<!-- config-reference:end -->"

text = README.read_text()
head, rest = text.split(START)
README.write_text(head + START + reference_markdown() + END + rest.split(END, 1)[1])
print(f"updated {README}")
