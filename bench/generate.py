#!/usr/bin/env python3
"""velod's engine against llama-server on the same GGUF, side by side, 2 threads each.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE \\
        python bench/generate.py [--model PATH] [--rounds 3] [--out FILE]

(unset those two in the benchmark command alone: they slow a current NumPy's OpenBLAS; the
JSON names the BLAS kernel that ran, from threadpoolctl). The engine runs in this process on
the NumPy backend (float32 weights and KV cache, the daemon's step loop without its socket);
llama-server from the llama.cpp wheel (tests/assets.py) serves the same file with 2 threads
and 32 slots. Every figure is taken in rounds, velod then llama-server, and the best round of
each is reported (the one least disturbed on a shared machine), with velod / llama ratios:

- ``single_stream``: decode tokens/s of one request (a 16-token prompt, 128 generated);
- ``aggregate``: tokens/s of 1, 8 and 32 requests sent at once (32-token prompts, 64
  generated each; prompt processing included), generated tokens over wall time;
- ``ttft_512``: time to first token of a 512-token prompt;
- ``roofline``: the bytes of weights one decode token reads, the bandwidth NumPy's float32
  GEMV reaches over the largest of them (the output projection), and velod's batch-1 decode
  step against weight bytes / bandwidth;
- ``overhead``: the engine's Python work per step (scheduling, staging, completing) at
  batch 1 and 32, from its own step records;
- ``attention``: the NumPy paged decode attention against dense matmul attention
  (16 x 2048 context, 32/8 heads, d128: bench/numpy_attention.py's case);
- ``memory``: peak RSS of each process (velod's during load and after, llama-server's).

Prints one JSON document (and writes it to --out).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.harness import emit  # noqa: E402
from bench.numpy_attention import decode_case  # noqa: E402
from tests import assets  # noqa: E402
from velod.engine.models.sampling import SamplingParams  # noqa: E402
from velod.engine.runtime.engine import Engine, build_engine  # noqa: E402
from velod.engine.settings import EngineSettings  # noqa: E402
from velod.kernels import NumpyBackend  # noqa: E402

THREADS = 2
SLOTS = 32
SLOT_CONTEXT = 1024
GREEDY = SamplingParams(temperature=0.0, ignore_eos=True)
PYTHON_PHASES = ("schedule", "prepare", "complete")


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def blas() -> list[dict[str, Any]]:
    from threadpoolctl import threadpool_info

    return [{k: info.get(k) for k in ("internal_api", "version", "architecture",
                                      "num_threads", "threading_layer")}
            for info in threadpool_info()]


def prompts(count: int, length: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1000, 100000, length).tolist() for _ in range(count)]


# ------------------------------------------------------------------ velod


def velod_engine(model: Path) -> Engine:
    settings = EngineSettings(None, model=str(model), dtype="float32", device="cpu",
                              kv_cache_bytes=2 << 30, block_size=16, max_batch_size=SLOTS,
                              max_tokens_per_step=2048, language_model=True)
    return build_engine(settings, backend=NumpyBackend())


def velod_run(engine: Engine, batch: list[list[int]], gen: int) -> dict[str, Any]:
    """Every prompt at once until all finish: wall time, first/last token times, steps."""
    start = time.perf_counter()
    ids = [engine.submit(p, gen, sampling=GREEDY) for p in batch]
    times: dict[int, list[float]] = {i: [] for i in ids}
    records = []
    while engine.has_work:
        outcome = engine.step()
        now = time.perf_counter()
        for token in outcome.sampled:
            times[token.id].append(now)
        if outcome.record is not None:
            records.append(outcome.record)
    wall = time.perf_counter() - start
    return {"wall": wall, "times": list(times.values()), "records": records, "start": start}


def velod_single_stream(engine: Engine, gen: int) -> float:
    run = velod_run(engine, prompts(1, 16, 1), gen)
    stamps = run["times"][0]
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def velod_aggregate(engine: Engine, count: int, gen: int) -> float:
    run = velod_run(engine, prompts(count, 32, 2 + count), gen)
    return count * gen / run["wall"]


def velod_ttft(engine: Engine, length: int) -> float:
    run = velod_run(engine, prompts(1, length, 3), 1)
    return run["times"][0][0] - run["start"]


def velod_steps(engine: Engine, batch: int, gen: int = 24) -> dict[str, float]:
    """Median decode step and its Python share at ``batch`` sequences."""
    from velod.engine.runtime.metrics import PHASES

    run = velod_run(engine, prompts(batch, 32, 4), gen)
    decode = [r for r in run["records"] if not r.prefill_tokens and r.batch_size == batch]
    python = [sum(r.phases[PHASES.index(p)] for p in PYTHON_PHASES) for r in decode]
    return {"step_ms": statistics.median(r.step_s for r in decode) * 1e3,
            "python_ms": statistics.median(python) * 1e3,
            "by_phase_ms": {p: round(statistics.median(r.phases[i] for r in decode) * 1e3, 3)
                            for i, p in enumerate(PHASES)}}


def roofline(engine: Engine, rounds: int) -> dict[str, Any]:
    """Weight bytes per decode token and the float32 GEMV bandwidth over the output
    projection (the largest matrix, read once per token)."""
    weights = engine.model.weights  # type: ignore[attr-defined]
    out = weights.output_t
    x = np.random.default_rng(0).standard_normal((1, out.shape[0]), dtype=np.float32)
    result = np.empty((1, out.shape[1]), np.float32)
    best = min(_timed(lambda: np.matmul(x, out, out=result)) for _ in range(rounds * 3))
    bandwidth = out.nbytes / best
    return {"weight_bytes": weights.nbytes, "gemv_bytes": out.nbytes,
            "gemv_gb_per_s": round(bandwidth / 1e9, 2),
            "roofline_step_ms": round(weights.nbytes / bandwidth * 1e3, 2)}


def _timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# ------------------------------------------------------------------ llama-server


def llama_single_stream(server: assets.LlamaServer, gen: int) -> float:
    reply = server.post("/completion", {"prompt": prompts(1, 16, 1)[0], "n_predict": gen,
                                        "temperature": 0, "ignore_eos": True,
                                        "cache_prompt": False}, timeout=600)
    return float(reply["timings"]["predicted_per_second"])


def llama_aggregate(server: assets.LlamaServer, count: int, gen: int) -> float:
    batch = prompts(count, 32, 2 + count)
    errors: list[BaseException] = []

    def one(prompt: list[int]) -> None:
        try:
            server.post("/completion", {"prompt": prompt, "n_predict": gen, "temperature": 0,
                                        "ignore_eos": True, "cache_prompt": False},
                        timeout=900)
        except BaseException as exc:  # reported below, in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(p,)) for p in batch]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise errors[0]
    return count * gen / wall


def llama_ttft(server: assets.LlamaServer, length: int) -> float:
    start = time.perf_counter()
    server.post("/completion", {"prompt": prompts(1, length, 3)[0], "n_predict": 1,
                                "cache_prompt": False}, timeout=600)
    return time.perf_counter() - start


def llama_peak_rss_mib(server: assets.LlamaServer) -> float:
    with open(f"/proc/{server.proc.pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


# ------------------------------------------------------------------ the race


def best(samples: list[float], higher: bool) -> float:
    return max(samples) if higher else min(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, help="a GGUF (default: Gemma 3 270M Q4_K_M)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--gen", type=int, default=64)
    parser.add_argument("--attention-repeats", type=int, default=10)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    from threadpoolctl import threadpool_limits

    threadpool_limits(THREADS)
    model = args.model or assets.gemma3_gguf()
    load_start = time.perf_counter()
    engine = velod_engine(model)
    load = {"seconds": round(time.perf_counter() - load_start, 2),
            "peak_rss_mib": round(peak_rss_mib(), 1), "rss_after_mib": round(rss_mib(), 1)}
    load["peak_over_resident"] = round(load["peak_rss_mib"] / load["rss_after_mib"], 3)
    velod_steps(engine, 1, 4)  # warm-up: first-touch of buffers and pool pages

    samples: dict[str, dict[str, list[float]]] = {}

    def add(metric: str, side: str, value: float) -> None:
        samples.setdefault(metric, {"velod": [], "llama": []})[side].append(value)

    steps: dict[int, list[dict[str, Any]]] = {1: [], 32: []}
    with assets.llama_server(model, "-np", str(SLOTS), "--no-warmup", threads=THREADS,
                             ctx=SLOTS * SLOT_CONTEXT) as server:
        for _ in range(args.rounds):
            add("single_stream_tok_s", "velod", velod_single_stream(engine, 2 * args.gen))
            add("single_stream_tok_s", "llama", llama_single_stream(server, 2 * args.gen))
            for count in (1, 8, 32):
                add(f"aggregate_{count}_tok_s", "velod",
                    velod_aggregate(engine, count, args.gen))
                add(f"aggregate_{count}_tok_s", "llama",
                    llama_aggregate(server, count, args.gen))
            add("ttft_512_ms", "velod", velod_ttft(engine, 512) * 1e3)
            add("ttft_512_ms", "llama", llama_ttft(server, 512) * 1e3)
            for batch in steps:
                steps[batch].append(velod_steps(engine, batch))
        llama_rss = llama_peak_rss_mib(server)
    figures: dict[str, Any] = {}
    for metric, sides in samples.items():
        higher = metric.endswith("tok_s")
        ours, theirs = best(sides["velod"], higher), best(sides["llama"], higher)
        figures[metric] = {"velod": round(ours, 2), "llama_server": round(theirs, 2),
                           "velod_over_llama": round(ours / theirs, 3),
                           "samples": {k: [round(v, 2) for v in s] for k, s in sides.items()}}
    line = roofline(engine, args.rounds)
    step1 = min(steps[1], key=lambda s: s["step_ms"])
    line["velod_batch1_step_ms"] = round(step1["step_ms"], 2)
    line["velod_over_roofline"] = round(step1["step_ms"] / line["roofline_step_ms"], 3)
    line["llama_single_stream_ms_per_token"] = round(
        1e3 / figures["single_stream_tok_s"]["llama_server"], 2)
    overhead = {str(b): min(s, key=lambda x: x["step_ms"]) for b, s in steps.items()}
    attention = decode_case("decode_llama", 16, 2048, 32, 8, 128, None,
                            args.attention_repeats)
    doc = {
        "benchmark": "generate", "model": str(model),
        "machine": {"cores": os.cpu_count(), "loadavg": os.getloadavg(),
                    "date": time.strftime("%Y-%m-%d %H:%M"), "numpy": np.__version__,
                    "blas": blas()},
        "threads": THREADS, "rounds": args.rounds, "gen": args.gen,
        "figures": figures, "roofline": line,
        "overhead": {b: {"step_ms": round(s["step_ms"], 2),
                         "python_ms": round(s["python_ms"], 3),
                         "by_phase_ms": s["by_phase_ms"]} for b, s in overhead.items()},
        "attention": {"paged_over_dense_matmul": attention["paged_over_dense_matmul"],
                      "ms": attention["ms"]},
        "memory": {"velod_load": load, "velod_peak_rss_mib": round(peak_rss_mib(), 1),
                   "llama_server_peak_rss_mib": round(llama_rss, 1)},
    }
    emit(doc, args.out, indent=1)


if __name__ == "__main__":
    main()
