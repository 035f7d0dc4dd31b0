"""A bench's figures as data: the file `--json PATH` writes (the ones under bench/results/ are what
`scripts/render_bench.py` renders into docs/performance.md's tables).

    {"bench": name, "command": the command line, "machine": CPU, cores and load before the run, "date": UTC,
     "source": "measured", "rows": [{column: value, ...}, ...], "formats": {column: "{:.2f}", ...}}

Each row is one line of the table, columns in their first row's order; `formats` holds the precision the bench
prints each column with, so the rendered table shows what the bench printed and the file keeps every digit.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
from datetime import UTC, datetime
from pathlib import Path


def add_json_option(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--json", metavar="PATH", help="also write the figures to PATH as data (bench/results/<bench>"
                    ".json is what docs/performance.md renders); default: do not write")


def describe_machine() -> str:
    """CPU model, cores and the 1-minute load average now: call it before the measurement, which adds load."""
    cpu = platform.processor() or platform.machine()
    try:
        models = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")]
        cpu = models[0] if models else cpu
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} before it"


def write_result(path: str, bench: str, machine: str, rows: list[dict], formats: dict[str, str],
                 extra: dict | None = None) -> None:
    """Write the result file atomically (a reader never sees half of it; a failed write leaves the old one);
    `extra`: figures beside the table, kept under their own keys."""
    result = {"bench": bench, "command": shlex.join(["python", *sys.argv]), "machine": machine,
              "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "source": "measured", "rows": rows,
              "formats": formats, **(extra or {})}
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, path)
    print(f"wrote {path}")
