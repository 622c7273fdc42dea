"""Benchmark the engine in process: tokens/s and the share of step time outside the kernels.

CPU (default): the NumPy backend at a small geometry (2 layers, 4 heads, 2 KV heads, head dim
64, fp16 cache), three workloads: a mixed one, the same with half of each prompt shared, and
a decode-heavy one at batch 64. Every prompt token's attention is computed.

GPU (``--gpu``, what ``tools/gpu_check.sh`` runs): the CUDA backend with the Llama-3-8B
attention geometry (32 layers, 32 heads, 8 KV heads, head dim 128, fp16) for 64 x 512/128
(batch 64) and 256 x 2048/256, kernel time from CUDA events. velod has no multi-token
prefill kernel yet and the decode kernel would need hours for those prompts token by token,
so the GPU runs use ``prefill_attention="last"``: every prompt token's K/V is made and
written, attention runs for decode tokens and each prompt's last token. The decode steps
(``decode_breakdown``) are the full workload; the issue's target is about them.

"Outside kernels" = 1 - device time / step time, where step time covers scheduling, array
preparation, launches, sampling and the scheduler's bookkeeping (Python). On the CPU the
"device time" is the wall time of the NumPy q/k/v generation, cache writes and attention.

    python bench/engine.py [--quick] [--gpu] [--budget-s 45]

Prints one JSON document on stdout.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


from velod.engine.runtime.engine import Engine, build_engine
from velod.engine.runtime.workload import BenchRun, Workload
from velod.engine.settings import EngineSettings, preset_geometry
from velod.model.metadata import Geometry

SMALL = Geometry.attention_only(layers=2, heads=4, kv_heads=2, head_dim=64,
                                context_length=4096)
SMALL_NAME = "small (2x4/2x64)"


def machine() -> dict[str, Any]:
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"),
            "loadavg": os.getloadavg()[0]}


def drive(engine: Engine, workload: Workload, budget_s: float) -> dict[str, Any]:
    """Run ``workload`` to the end or until ``budget_s``; the result says which."""
    run = BenchRun(engine, workload, "bench")
    deadline = time.monotonic() + budget_s
    while engine.has_work:
        if time.monotonic() > deadline:
            run.cancel()
            break
        outcome = engine.step()
        run.on_step(outcome.record, outcome.finished)
    result = run.result(run.verify() if workload.verify else None)
    result["complete"] = run.done
    return result


def summary(result: dict[str, Any]) -> dict[str, Any]:
    """The figures BENCHMARKS.md quotes, beside the full result."""
    b, d = result["breakdown"], result["decode_breakdown"]
    return {
        "workload": result["workload"], "complete": result["complete"],
        "tokens_per_s": round(result["tokens_per_s"], 1),
        "processed_tokens_per_s": round(result["processed_tokens_per_s"], 1),
        "elapsed_s": round(result["elapsed_s"], 3), "steps": result["steps"],
        "ttft_p50_s": result["ttft_s"]["p50"], "ttft_p99_s": result["ttft_s"]["p99"],
        "token_latency_p50_s": result["token_latency_s"]["p50"],
        "token_latency_p99_s": result["token_latency_s"]["p99"],
        "outside_kernels_share": b["overhead_share"],
        "decode_outside_kernels_share": d["overhead_share"],
        "decode_step_p50_s": result["decode_step_s"]["p50"],
        "decode_batch_p50": result["decode_batch_size"]["p50"],
        "kv_utilization_max": result["kv_utilization"]["max"],
        "preemptions": result["preemptions"],
        "prefix_hit_rate": round(result["prefix_cache"]["hit_rate"], 4),
        "verify_max_abs_error": (result["verify"] or {}).get("max_abs_error"),
        "exact_token_counts": result["exact_token_counts"],
    }


def run_cpu(args: argparse.Namespace) -> dict[str, Any]:
    scale = 4 if args.quick else 1
    cases = [
        ("mixed", {"max_batch_size": 32}, Workload(32 // scale, 256, 64, verify=2)),
        ("shared prefix 0.5", {"max_batch_size": 32},
         Workload(32 // scale, 256, 64, shared_prefix=0.5, verify=2, seed=1)),
        ("decode batch 64", {"max_batch_size": 64}, Workload(64 // scale, 64, 128, seed=2)),
    ]
    results = []
    for name, limits, workload in cases:
        spec = EngineSettings(SMALL, SMALL_NAME, "bench/engine.py", dtype="float16",
                              device="cpu", kv_cache_bytes=256 * 1024**2,
                              max_tokens_per_step=1024, **limits)
        engine = build_engine(spec)
        result = drive(engine, workload, args.budget_s)
        results.append({"case": name, **summary(result), "full": result})
    return {"mode": "cpu", "backend": "numpy", "geometry": spec.geometry_dict(),
            "dtype": "float16",
            "results": results}


def run_gpu(args: argparse.Namespace) -> dict[str, Any]:
    from velod.kernels import cuda_unavailable_reason

    reason = cuda_unavailable_reason()
    if reason is not None:
        return {"mode": "gpu", "error": f"CUDA backend unavailable: {reason}"}
    geometry, source = preset_geometry("llama3-8b")
    cases = [
        ("64 x 512/128", 64, Workload(64, 512, 128, verify=1)),
        ("256 x 2048/256", 256, Workload(256, 2048, 256, seed=1)),
    ]
    results = []
    for name, batch, workload in cases:
        spec = EngineSettings(geometry, "llama3-8b", source, dtype="float16", device="cuda",
                              kv_cache_bytes=None, kv_cache_fraction=args.gpu_fraction,
                              max_batch_size=batch, max_tokens_per_step=8192,
                              prefill_attention="last")
        runs = {}
        # Profiled: CUDA events give the kernel time. Plain: the step time without the
        # events' own host cost. Same workload and pool, so the same steps in both.
        for profile in (True, False):
            engine = build_engine(spec, profile=profile)
            drive(engine, Workload(2, 32, 4, seed=9), 120.0)  # compile and warm up, not timed
            engine.window.clear()
            runs[profile] = (drive(engine, workload, args.budget_s), engine.pool.num_blocks)
            del engine
            gc.collect()
        (profiled, blocks), (plain, _) = runs[True], runs[False]
        kernel = profiled["decode_breakdown"]["kernel_s"]
        step = plain["decode_breakdown"]["step_s"]
        results.append({
            "case": name, **summary(profiled), "pool_blocks": blocks,
            "plain": summary(plain),
            "decode_outside_kernels_share_vs_plain_steps": (
                round(1 - kernel / step, 4) if step and profiled["complete"]
                and plain["complete"] else None),
            "full": profiled})
    return {"mode": "gpu", "backend": "cuda", "geometry": spec.geometry_dict(), "dtype": "float16",
            "prefill_attention": "last", "results": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="CUDA backend, Llama-3-8B geometry")
    parser.add_argument("--quick", action="store_true", help="CPU: a quarter of the requests")
    parser.add_argument("--budget-s", type=float, default=35.0,
                        help="wall-time cap per workload, the rest is aborted (default 35: "
                        "tools/gpu_check.sh gives the whole --gpu run 120 s)")
    parser.add_argument("--gpu-fraction", type=float, default=0.85,
                        help="--gpu: KV pool as a fraction of free GPU memory (default 0.85)")
    args = parser.parse_args()
    started = time.time()
    report = run_gpu(args) if args.gpu else run_cpu(args)
    report["machine"] = machine()
    report["wall_s"] = round(time.time() - started, 1)
    json.dump(report, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")
    if report.get("error"):
        sys.exit(1)


if __name__ == "__main__":
    main()
