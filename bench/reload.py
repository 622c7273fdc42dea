"""Reload latency: from the config file's rename to the new config being active.

A client subscribed to config.* receives `config.reloaded`, which velod publishes after
every component has taken the new config. Prints JSON.
usage: python bench/reload.py [--reloads 30]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import yaml
from harness import BenchDaemon, machine

from velod.engine.runtime.metrics import percentile


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reloads", type=int, default=30)
    args = parser.parse_args()
    latencies = []
    with BenchDaemon() as daemon:
        base = yaml.safe_load(daemon.config_path.read_text())
        client = daemon.client()
        events = client.subscribe(["config.*"])
        for i in range(args.reloads):
            base.setdefault("hardware", {})["history_size"] = 100 + i
            tmp = daemon.config_path.with_name(".velod.yaml.tmp")
            tmp.write_text(yaml.safe_dump(base))
            start = time.perf_counter()
            os.replace(tmp, daemon.config_path)
            event = next(events)
            latencies.append(time.perf_counter() - start)
            assert event["topic"] == "config.reloaded", event
            time.sleep(0.1)
        client.close()
    print(json.dumps({
        "benchmark": "reload latency, rename -> config.reloaded", "reloads": args.reloads,
        "p50_ms": round(percentile(latencies, 50) * 1000, 1),
        "p99_ms": round(percentile(latencies, 99) * 1000, 1),
        "max_ms": round(max(latencies) * 1000, 1), "target_p50_ms": 250,
        "machine": machine()}, indent=2))


if __name__ == "__main__":
    main()
