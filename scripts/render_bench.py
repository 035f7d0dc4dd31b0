"""Render the benchmark figures in docs/performance.md from their data, bench/results/*.json.

Each result file (written by a bench's `--json PATH`, or transcribed from the doc) becomes one table between
`<!-- bench:NAME -->` and `<!-- /bench:NAME -->`, NAME being the file's name without `.json`: a column per key of
its rows (in the order they first appear), a cell per value (`formats` gives a column's precision, as the bench
printed it), then a line with the command, machine, date and source. The prose around the blocks, what a bench
measures and what its figures mean, stays hand-written.

    python scripts/render_bench.py            # rewrite the blocks in place
    python scripts/render_bench.py --check    # exit 1, naming the stale blocks, if the doc differs from its data

Plain Python: no rayrlhf, torch or ray import, so the check runs in milliseconds.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = ("bench", "command", "machine", "date", "source", "rows")
# A block: its opening marker (indented as the list item it sits in), anything, its closing marker.
BLOCK = re.compile(r"^(?P<indent>[ \t]*)<!-- bench:(?P<name>\S+) -->\n.*?^[ \t]*<!-- /bench:(?P=name) -->",
                   re.MULTILINE | re.DOTALL)


class ResultError(ValueError):
    """A result file or the doc's markers are malformed; the message names the file, key or block."""


def load_results(results_dir: Path) -> dict[str, dict]:
    """Every bench/results/*.json by name (file name without .json), checked for the keys a block needs."""
    results = {}
    for path in sorted(results_dir.glob("*.json")):
        try:
            result = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ResultError(f"{path}: not JSON ({e})") from e
        missing = [key for key in REQUIRED if key not in result]
        if missing:
            raise ResultError(f"{path}: missing key(s) {', '.join(missing)}")
        rows = result["rows"]
        if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) and r for r in rows):
            raise ResultError(f"{path}: rows must be a non-empty list of non-empty objects")
        results[path.name.removesuffix(".json")] = result
    return results


def cell(value, fmt: str | None) -> str:
    """One table cell: absent is empty, lists are joined, numbers take the column's format, `|` is escaped."""
    if value is None:
        return ""
    if isinstance(value, list):
        return ", ".join(cell(v, fmt) for v in value)
    if isinstance(value, bool):
        return json.dumps(value)
    text = fmt.format(value) if fmt and isinstance(value, (int, float)) else str(value)
    return text.replace("|", "\\|")


def render_result(result: dict) -> list[str]:
    """The block's lines: the table, a blank line, then what produced the figures."""
    columns = list(dict.fromkeys(key for row in result["rows"] for key in row))
    formats = result.get("formats", {})
    lines = ["| " + " | ".join(c.replace("|", "\\|") for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c), formats.get(c)) for c in columns) + " |" for row in result["rows"]]
    footer = (f"command: `{result['command']}`; machine: {result['machine']}; date: {result['date'] or 'not stated'}; "
              f"source: {result['source']}")
    return [*lines, "", footer]


def render(doc: str, results: dict[str, dict]) -> str:
    """The doc with every bench block rendered from its result; every block needs a result and every result a
    block, so a figure is never left without its data nor data without its place."""
    seen = []

    def block(m: re.Match) -> str:
        name, indent = m["name"], m["indent"]
        if name not in results:
            raise ResultError(f"block bench:{name} has no bench/results/{name}.json")
        seen.append(name)
        lines = [f"<!-- bench:{name} -->", "", *render_result(results[name]), "", f"<!-- /bench:{name} -->"]
        return "\n".join(indent + line if line else "" for line in lines)

    out = BLOCK.sub(block, doc)
    unplaced = sorted(set(results) - set(seen))
    if unplaced:
        raise ResultError(f"no <!-- bench:NAME --> block for {', '.join(unplaced)}")
    return out


def stale_blocks(doc: str, rendered: str) -> list[str]:
    """Names of the blocks whose text differs between the doc and its rendering."""
    now = {m["name"]: m[0] for m in BLOCK.finditer(doc)}
    return [m["name"] for m in BLOCK.finditer(rendered) if now.get(m["name"]) != m[0]]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if the doc differs from what would be rendered")
    ap.add_argument("--doc", type=Path, default=ROOT / "docs" / "performance.md")
    ap.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()
    doc = args.doc.read_text()
    try:
        rendered = render(doc, load_results(args.results))
    except ResultError as e:
        print(f"render_bench: {e}", file=sys.stderr)
        return 1
    if args.check:
        if rendered != doc:
            print(f"{args.doc} is stale in bench block(s) {', '.join(stale_blocks(doc, rendered))}: run python "
                  "scripts/render_bench.py", file=sys.stderr)
            return 1
        return 0
    if rendered != doc:
        args.doc.write_text(rendered)
        print(f"updated {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
