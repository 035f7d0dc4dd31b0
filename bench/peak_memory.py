"""Run a command and report its wall time and the peak memory of its whole process tree (Ray workers included).

    python bench/peak_memory.py [--json FILE] -- rayrlhf train

Memory is sampled every 2 s as the sum of PSS (proportional set size: shared pages split between the
processes that map them, so torch's libraries are not counted once per Ray worker) over the command and
all its descendants; RSS is printed too, as an upper bound.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import psutil


def tree_memory(root: psutil.Process) -> tuple[int, int]:
    pss = rss = 0
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0, 0
    for p in procs:
        try:
            info = p.memory_full_info()
            pss += getattr(info, "pss", info.rss)
            rss += info.rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return pss, rss


def main() -> int:
    if "--" not in sys.argv:
        print(__doc__, file=sys.stderr)
        return 2
    cmd = sys.argv[sys.argv.index("--") + 1 :]
    ours = sys.argv[1 : sys.argv.index("--")]
    if ours and (len(ours) != 2 or ours[0] != "--json"):
        print(f"peak_memory: expected [--json FILE] before --, got {' '.join(ours)}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    root = psutil.Process(proc.pid)
    peak_pss = peak_rss = 0
    while proc.poll() is None:
        pss, rss = tree_memory(root)
        peak_pss, peak_rss = max(peak_pss, pss), max(peak_rss, rss)
        time.sleep(2.0)  # reading every process's PSS is not free: every 0.5 s took 15% of a core
    wall = time.perf_counter() - t0
    gib = 2**30
    print(f"peak_memory: exit {proc.returncode}, wall {wall:.1f} s, peak PSS {peak_pss / gib:.2f} GiB "
          f"(peak RSS sum {peak_rss / gib:.2f} GiB) for: {' '.join(cmd)}")
    if ours:
        Path(ours[1]).write_text(json.dumps({"command": cmd, "exit": proc.returncode, "wall_s": wall,
                                             "peak_pss_gib": peak_pss / gib, "peak_rss_gib": peak_rss / gib}))
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
