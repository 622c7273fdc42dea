"""Benchmark the batched sampler: n rows × a Gemma-sized vocabulary, side by side with sorts.

For each sampling chain, ``sample()`` on a [n, vocab] float32 logits array (synthetic:
normal noise plus eight boosted tokens per row, peaked or flat), best and median of
``--repeat`` runs,
beside two baselines doing the same per-row work the obvious way: ``np.argsort`` of every
row (what a full-sort sampler pays), and ``np.argpartition`` for the top-k. Also the cost of
the raw log-softmax behind ``logprobs=true`` and of a plain ``argmax`` (greedy's floor).

    python bench/sampling.py [--rows 32] [--vocab 262144] [--repeat 7]

Prints one JSON document on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import machine, timed_ms
from velod.engine.models.sampling import SamplerState, SamplingParams, sample

CHAINS: dict[str, dict[str, Any]] = {
    "greedy": {"temperature": 0.0},
    "greedy + repetition penalty": {"temperature": 0.0, "repetition_penalty": 1.1},
    "llama.cpp defaults (k40 p.95 minp.05 t.8)": {},
    "defaults + penalties": {"repetition_penalty": 1.1, "presence_penalty": 0.5,
                             "frequency_penalty": 0.5},
    "top-p 0.9, no top-k": {"top_k": 0, "top_p": 0.9, "min_p": 0.0, "temperature": 1.0},
    "min-p 0.05 only": {"top_k": 0, "top_p": 1.0, "min_p": 0.05},
    "whole distribution (t=1)": {"top_k": 0, "top_p": 1.0, "min_p": 0.0, "temperature": 1.0},
    "defaults + logprobs (top 5)": {"logprobs": True, "top_logprobs": 5},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=262_144)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    noise = rng.standard_normal((args.rows, args.vocab), dtype=np.float32) * 2.0
    heads = rng.integers(0, args.vocab, (args.rows, 8))
    history = [int(t) for t in rng.integers(0, args.vocab, 64)]
    results: dict[str, Any] = {}
    # Eight boosted tokens per row: +20 puts 99.9% of the mass on them, as a language model
    # mostly does; +12 leaves 60% in the long tail, a flat worst case for top-p and min-p.
    for shape, boost in (("peaked", 20.0), ("flat", 12.0)):
        logits = noise.copy()
        logits[np.arange(args.rows)[:, None], heads] += boost
        for name, options in CHAINS.items():
            states = [SamplerState(SamplingParams(**options, seed=i), prompt=history)
                      for i in range(args.rows)]
            results[f"{name} [{shape}]"] = timed_ms(lambda s=states, x=logits: sample(x, s),
                                                 args.repeat)
    logits = noise

    baselines = {
        "argmax per row (greedy floor)": lambda: [np.argmax(r) for r in logits],
        "argpartition top-40 per row": lambda: [np.argpartition(r, -40)[-40:] for r in logits],
        "argsort per row (full sort)": lambda: [np.argsort(r) for r in logits],
        "log-softmax per row (logprobs)": lambda: [
            np.log(np.exp(r - r.max()).sum(dtype=np.float64)) for r in logits],
    }
    for name, fn in baselines.items():
        results[name] = timed_ms(fn, max(3, args.repeat // 2))

    sort_ms = results["argsort per row (full sort)"]["best_ms"]
    for name in results:
        if "[" in name:
            results[name]["vs_full_sort"] = round(results[name]["best_ms"] / sort_ms, 3)
    print(json.dumps({"machine": machine(), "rows": args.rows, "vocab": args.vocab,
                      "results": results}, indent=2))


if __name__ == "__main__":
    main()
