"""Start-up cost: ``import hub_dfq``, ``hub-dfq --help`` and, for scale, ``import torch``, in fresh processes.

Each command runs ``--repeat`` times in a new Python process; the table gives the median wall time and
the peak resident memory (``ru_maxrss`` of the child). Targets (issue #11): ``hub-dfq --help`` <= 0.5 s
and ``import hub_dfq`` <= 1.5 s wall on 2 cores.

    python scripts/bench_startup.py [--repeat 7]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "bench_startup.json"

COMMANDS = {
    "python (empty)": [sys.executable, "-c", "pass"],
    "import hub_dfq": [sys.executable, "-c", "import hub_dfq"],
    "hub-dfq --help": [sys.executable, "-m", "hub_dfq", "--help"],
    "hub-dfq quantize --help": [sys.executable, "-m", "hub_dfq", "quantize", "--help"],
    "import torch (reference)": [sys.executable, "-c", "import torch"],
    "import hub_dfq; hub_dfq.load_model (first use)": [sys.executable, "-c",
                                                       "import hub_dfq; hub_dfq.load_model('default')"],
}
TARGETS = {"import hub_dfq": 1.5, "hub-dfq --help": 0.5}


def run_once(argv: list[str]) -> tuple[float, float]:
    """Wall seconds and peak resident memory (MB) of one fresh process."""
    start = time.perf_counter()
    child = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env={**os.environ, "HF_HUB_OFFLINE": "1"})
    _, status, usage = os.wait4(child.pid, 0)  # this child's own rusage (ru_maxrss in KB on Linux)
    wall = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        raise RuntimeError(f"{argv} failed with exit code {child.returncode}")
    return wall, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    rows = {}
    for name, argv in COMMANDS.items():
        run_once(argv)  # warm the file cache
        walls, rss = [], []
        for _ in range(args.repeat):
            wall, peak = run_once(argv)
            walls.append(wall)
            rss.append(peak)
        rows[name] = {"median_s": statistics.median(walls), "min_s": min(walls), "max_s": max(walls),
                      "peak_rss_mb": max(rss)}
    print(f"Start-up, {args.repeat} fresh processes each ({os.cpu_count()} cores, Python {sys.version.split()[0]})\n")
    print("| command | median wall (s) | min | max | peak RSS (MB) | target | met |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for name, row in rows.items():
        target = TARGETS.get(name)
        met = "-" if target is None else ("yes" if row["median_s"] <= target else "NO")
        print(f"| `{name}` | {row['median_s']:.2f} | {row['min_s']:.2f} | {row['max_s']:.2f} | "
              f"{row['peak_rss_mb']:.0f} | {'-' if target is None else f'<= {target}'} | {met} |")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"repeat": args.repeat, "cores": os.cpu_count(), "rows": rows, "targets": TARGETS},
                                  indent=2) + "\n")


if __name__ == "__main__":
    main()
