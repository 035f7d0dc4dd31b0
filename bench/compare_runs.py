"""Compare two run directories: max abs diff of each stage's final weights, and every differing metric.

    python bench/compare_runs.py RUN_A RUN_B

For a refactor that must not change behaviour: on the same machine and config, every weight diff is 0.0 and
only `timing/*` and throughput metrics differ. Prints figures; exit 0 either way.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from safetensors.torch import load_file

VOLATILE = ("timing/", "perf/")  # and every stage's throughput: `<stage>/mfu`, `<stage>/..._per_s` (`volatile`)


def volatile(key: str) -> bool:
    """A figure of time (seconds, MFU, throughput): it differs between any two runs."""
    return key.startswith(VOLATILE) or key.endswith(("/mfu", "_per_s")) or key == "time"


def weight_diff(a: Path, b: Path) -> float:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    if wa.keys() != wb.keys():
        return math.inf
    return max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    args = p.parse_args()
    for stage in ("sft/checkpoint", "rm/checkpoint", "ppo/checkpoint", "ppo/critic"):
        if (args.a / stage).is_dir():
            print(f"{stage}: max abs weight diff {weight_diff(args.a / stage, args.b / stage)}")
    sa, sb = (json.loads((r / "stages.json").read_text()) for r in (args.a, args.b))
    differing = 0
    for stage in sa:
        for key in sorted(set(sa[stage]) | set(sb.get(stage, {}))):
            va, vb = sa[stage].get(key), sb.get(stage, {}).get(key)
            if va != vb and not volatile(key):
                differing += 1
                print(f"{stage} {key}: {va} != {vb}")
    print(f"{differing} non-timing summary metrics differ")
    for stage in ("sft", "rm", "judge", "ppo"):
        files = [r / stage / "metrics.jsonl" for r in (args.a, args.b)]
        if not all(f.is_file() for f in files):
            print(f"{stage}/metrics.jsonl: not in both runs")
            continue
        rows = [[json.loads(line) for line in f.read_text().splitlines()] for f in files]
        strip = [[{k: v for k, v in row.items() if not volatile(k)} for row in rs] for rs in rows]
        same = strip[0] == strip[1]
        print(f"{stage}/metrics.jsonl: {len(rows[0])} vs {len(rows[1])} rows, non-timing values "
              f"{'identical' if same else 'DIFFER'}")
        if not same:
            keys = set().union(*strip[0]) ^ set().union(*strip[1])
            print(f"  keys in only one run: {sorted(keys)}")


if __name__ == "__main__":
    main()
