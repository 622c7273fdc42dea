"""An idle daemon with the default config: resident memory and CPU over a window.

Defaults everywhere (hardware monitor every 5 s, tuner watching an Ollama that is not
there, engine enabled but unused). Prints JSON.
usage: python bench/idle.py [--window 60]
"""

from __future__ import annotations

import argparse
import json
import time

import psutil
from harness import BenchDaemon, machine


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--window", type=float, default=60.0)
    parser.add_argument("--settle", type=float, default=10.0)
    args = parser.parse_args()
    with BenchDaemon() as daemon:
        proc = psutil.Process(daemon.proc.pid)
        time.sleep(args.settle)
        before = proc.cpu_times()
        start = time.monotonic()
        time.sleep(args.window)
        after = proc.cpu_times()
        elapsed = time.monotonic() - start
        rss = proc.memory_info().rss
        with daemon.client() as client:
            status = client.call("system.status")
    cpu = (after.user - before.user) + (after.system - before.system)
    print(json.dumps({
        "benchmark": "idle daemon, default config", "window_s": args.window,
        "rss_mb": round(rss / 2**20, 1), "cpu_s": round(cpu, 3),
        "cpu_percent_of_one_core": round(100 * cpu / elapsed, 3),
        "targets": {"rss_mb": 60, "cpu_percent": 0.5},
        "components": {k: v.get("state") for k, v in status["components"].items()},
        "machine": machine()}, indent=2))


if __name__ == "__main__":
    main()
