"""The config reference (docs/config.md), generated from the config models: `python -m rayrlhf.tools.config_docs`
prints it, `python scripts/update_readme_config.py` rewrites it in docs/config.md, and a test keeps the two in step."""

from __future__ import annotations

from pydantic import BaseModel

from rayrlhf.core.config import Config


def reference_markdown() -> str:
    """The config reference, generated from the models so the two never drift apart."""
    lines = []
    for section, field in Config.model_fields.items():
        model = field.annotation
        lines += [f"### `{section}`", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        for name, f in model.model_fields.items():
            ann = f.annotation.__name__ if isinstance(f.annotation, type) else str(f.annotation)
            for noise in ("typing.", "__main__.", "rayrlhf.core.config."):
                ann = ann.replace(noise, "")
            ann = ann.replace("|", "\\|")
            default = f.get_default(call_default_factory=True)  # e.g. `resources`: a fresh {} per config
            default = default if not isinstance(default, BaseModel) else "{...}"
            lines.append(f"| `{section}.{name}` | `{ann}` | `{default!r}` | {(f.description or '').replace('|', '/')} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(reference_markdown())
