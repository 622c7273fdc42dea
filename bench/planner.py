"""How long one Ollama plan takes (the tuner plans on every check and hardware change).

Prints JSON: median and p95 milliseconds per plan() for a few machine x model-set cases.
Usage: python bench/planner.py [--repeat N]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

from velod.model import catalog
from velod.tuner.planner import Policy, plan, what_if_snapshot, what_if_state

GIB = 1024**3
CASES = [
    ("1x24GiB, 1 model", 24, 1, ["llama3.1:8b"], "balanced"),
    ("1x24GiB, 12 models", 24, 1, catalog.names(), "balanced"),
    ("2x24GiB, 12 models", 24, 2, catalog.names(), "throughput"),
    ("4x80GiB, 12 models", 80, 4, catalog.names(), "long-context"),
    ("1x8GiB, 70b partly on CPU", 8, 1, ["llama3.1:70b"], "low-memory"),
    ("CPU only, 12 models", 0, 0, catalog.names(), "balanced"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=50)
    args = parser.parse_args()
    results = []
    for label, vram, gpus, models, profile in CASES:
        snapshot = what_if_snapshot(vram * GIB, gpus, 128 * GIB)
        state = what_if_state(models, "0.33.0")
        policy = Policy(profile=profile)
        times = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            plan(snapshot, state, policy)
            times.append((time.perf_counter() - start) * 1000)
        times.sort()
        results.append({"case": label, "profile": profile,
                        "median_ms": round(statistics.median(times), 3),
                        "p95_ms": round(times[int(0.95 * (len(times) - 1))], 3)})
    print(json.dumps({"benchmark": "planner", "python": platform.python_version(),
                      "repeat": args.repeat, "results": results}, indent=2))


if __name__ == "__main__":
    main()
