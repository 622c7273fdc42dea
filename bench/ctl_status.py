"""Wall time of `velodctl status` as a ratio to a bare `python -c pass`, side by side.

Both use the same interpreter, interleaved run by run so that machine noise hits both
alike. By default that is the interpreter running this script (the project's venv, where
`make` installs velod in editable mode, whose import hook every Python start pays);
`--venv DIR` measures another installation, e.g. a plain `pip install .`. Prints JSON.
usage: python bench/ctl_status.py [--runs 40] [--venv DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from pathlib import Path

from harness import BIN, BenchDaemon, machine


def wall(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--venv", type=Path, help="installation to measure (default: this one)")
    args = parser.parse_args()
    bindir = args.venv / "bin" if args.venv else BIN
    with BenchDaemon() as daemon:
        bare = [str(bindir / "python"), "-c", "pass"]
        ctl = [str(bindir / "velodctl"), "--socket", str(daemon.socket), "status"]
        for _ in range(3):  # warm the page cache
            wall(bare), wall(ctl)
        bare_times, ctl_times = [], []
        for _ in range(args.runs):
            bare_times.append(wall(bare))
            ctl_times.append(wall(ctl))
    b, c = statistics.median(bare_times), statistics.median(ctl_times)
    print(json.dumps({
        "benchmark": "velodctl status vs python -c pass", "runs": args.runs,
        "installation": str(bindir.parent),
        "python_pass_ms_median": round(b * 1000, 2),
        "velodctl_status_ms_median": round(c * 1000, 2),
        "ratio": round(c / b, 3), "target_ratio": 1.3, "machine": machine()}, indent=2))


if __name__ == "__main__":
    main()
