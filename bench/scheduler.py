"""Benchmark the scheduler + block manager with a stand-in model (no compute).

Each step "generates" one token per sampled sequence; the loop runs until every request
finishes. Reports scheduler + block-manager CPU time (process time, so other load on the
machine counts less) per generated token, submit included and prompt generation excluded;
the same with prefix caching off; wall time per step at 64/256/1024 running sequences;
and the cost of one submit with 100,000 requests waiting.

    python bench/scheduler.py --requests 1024 --prompt 512 --gen 128 --json
"""

from __future__ import annotations

import argparse
import cProfile
import json
import platform
import pstats
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from velod.engine import Scheduler, SchedulerConfig


def make_config(args: argparse.Namespace, **overrides: object) -> SchedulerConfig:
    kv_tokens = args.kv_tokens or args.max_batch * (args.prompt + args.gen)
    values = {
        "num_blocks": -(-kv_tokens // args.block_size),
        "block_size": args.block_size,
        "max_batch_size": args.max_batch,
        "max_tokens_per_step": args.max_tokens_per_step,
        "max_model_len": args.prompt + args.gen,
        "max_waiting": max(args.requests, 1),
        "max_waiting_tokens": max(args.requests * args.prompt, args.prompt + args.gen),
        "enable_prefix_caching": not args.no_prefix_caching,
    }
    values.update(overrides)
    return SchedulerConfig(**values)  # type: ignore[arg-type]


def make_prompts(count: int, length: int, seed: int) -> list[list[int]]:
    """Distinct prompts: random token ids, so no prefix is shared by chance."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 32000, size=(count, length), dtype=np.int64).tolist()


def drain(config: SchedulerConfig, prompts: list[list[int]], gen: int) -> dict[str, float]:
    """Submit everything, then step until done; returns counts and timings."""
    scheduler = Scheduler(config)
    fake_tokens = np.arange(config.max_batch_size, dtype=np.int64) + 7  # the stand-in model
    steps = decode_tokens = prefill_tokens = 0
    started = time.perf_counter()
    cpu_started = time.process_time()
    for prompt in prompts:
        scheduler.submit(prompt, gen)
    while scheduler.has_work:
        batch = scheduler.step()
        if batch.is_empty:
            continue
        steps += 1
        prefill_tokens += batch.num_tokens - batch.num_decode
        samples = len(batch.sample_seq_ids)
        decode_tokens += samples
        scheduler.complete_step(batch, fake_tokens[:samples])
    seconds = time.perf_counter() - started
    cpu_seconds = time.process_time() - cpu_started
    stats = scheduler.stats()
    return {
        "steps": steps,
        "decode_tokens": decode_tokens,
        "prefill_tokens": prefill_tokens,
        "seconds": round(cpu_seconds, 4),  # CPU time of this process
        "wall_seconds": round(seconds, 4),
        "us_per_token": round(cpu_seconds / decode_tokens * 1e6, 3),
        "wall_us_per_token": round(seconds / decode_tokens * 1e6, 3),
        "preemptions": stats.preemptions,
        "prefix_hit_tokens": stats.prefix_hit_tokens,
    }


def step_time(running: int, repeats: int, block_size: int) -> dict[str, float]:
    """Mean time of one decode step (step + complete_step) with ``running`` sequences."""
    prompt, gen = 128, repeats + 64
    config = SchedulerConfig(
        num_blocks=running * -(-(prompt + gen) // block_size),
        block_size=block_size,
        max_batch_size=running,
        max_tokens_per_step=max(running, 8192),
        max_model_len=prompt + gen,
        max_waiting=running,
    )
    scheduler = Scheduler(config)
    for tokens in make_prompts(running, prompt, seed=running):
        scheduler.submit(tokens, gen)
    fake = np.arange(running, dtype=np.int64)
    while scheduler.num_waiting or scheduler.stats().prefilling:  # reach steady decode
        batch = scheduler.step()
        scheduler.complete_step(batch, fake[: len(batch.sample_seq_ids)])
    started = time.perf_counter()
    for _ in range(repeats):
        batch = scheduler.step()
        scheduler.complete_step(batch, fake[: len(batch.sample_seq_ids)])
    elapsed = time.perf_counter() - started
    assert scheduler.num_running == running, "benchmark left steady state"
    return {
        "running": running,
        "us_per_step": round(elapsed / repeats * 1e6, 2),
        "us_per_seq": round(elapsed / repeats / running * 1e6, 3),
    }


def submit_cost(waiting: int, probes: int) -> dict[str, float]:
    """Mean time of one submit (16-token prompt) with ``waiting`` requests queued."""
    config = SchedulerConfig(
        max_waiting=waiting + probes, max_waiting_tokens=(waiting + probes) * 16
    )
    scheduler = Scheduler(config)
    prompts = make_prompts(waiting + probes, 16, seed=1)
    for prompt in prompts[:waiting]:
        scheduler.submit(prompt, 16, priority=int(prompt[0]) % 7)
    started = time.perf_counter()
    for prompt in prompts[waiting:]:
        scheduler.submit(prompt, 16, priority=int(prompt[0]) % 7)
    elapsed = time.perf_counter() - started
    return {"waiting": waiting, "us_per_submit": round(elapsed / probes * 1e6, 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1024)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--gen", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--max-batch", type=int, default=256)
    parser.add_argument("--max-tokens-per-step", type=int, default=8192)
    parser.add_argument("--kv-tokens", type=int, default=0, help="default: S * (P + G)")
    parser.add_argument("--no-prefix-caching", action="store_true")
    parser.add_argument("--repeat", type=int, default=5, help="drains; the best is reported")
    parser.add_argument("--skip-extras", action="store_true", help="only the drain")
    parser.add_argument("--profile", action="store_true", help="cProfile one drain")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    config = make_config(args)
    prompts = make_prompts(args.requests, args.prompt, seed=0)
    if args.profile:
        profiler = cProfile.Profile()
        profiler.runcall(drain, config, prompts, args.gen)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(20)
        return 0
    runs = [drain(config, prompts, args.gen) for _ in range(args.repeat)]
    result: dict[str, object] = dict(min(runs, key=lambda r: r["seconds"]))
    result["runs_us_per_token"] = [r["us_per_token"] for r in runs]
    result["params"] = {
        "requests": args.requests, "prompt": args.prompt, "gen": args.gen,
        "block_size": args.block_size, "max_batch": args.max_batch,
        "max_tokens_per_step": args.max_tokens_per_step,
        "kv_tokens": config.num_blocks * config.block_size,
        "prefix_caching": config.enable_prefix_caching,
    }
    if not args.skip_extras:
        # Side by side in the same run: what prefix caching (hashing, eviction) costs.
        plain = make_config(args, enable_prefix_caching=False)
        off = min(drain(plain, prompts, args.gen)["us_per_token"] for _ in range(args.repeat))
        result["no_prefix_caching_us_per_token"] = off
        result["prefix_caching_cost_ratio"] = round(float(result["us_per_token"]) / off, 3)
        result["step_time"] = [step_time(n, 200, args.block_size) for n in (64, 256, 1024)]
        result["submit"] = submit_cost(100_000, 2000)
    result["machine"] = f"{platform.machine()} {platform.python_implementation()} " \
                        f"{platform.python_version()} numpy {np.__version__}"
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for key, value in result.items():
            print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
