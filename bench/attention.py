#!/usr/bin/env python3
"""Paged decode attention: time per call, KV bytes read, GB/s, and the share of copy bandwidth.

    python bench/attention.py [--backend auto|cuda|numpy] [--out FILE] [--repeats N]

Shape: 32 query heads, 8 kv heads, head_dim 128, block size 16, fp16 (float32 math on the
NumPy path), every sequence of a batch at the full context, block tables shuffled over the
cache. On CUDA: batch {1, 8, 64, 256} x context {512, 2048, 8192, 32768}; the device-to-device
copy bandwidth (read + write bytes over time, cuMemcpyDtoD) is measured in the same run and
each row reports achieved KV GB/s as a fraction of it. Where PyTorch with CUDA is importable,
the same run times torch's gather-then-scaled_dot_product_attention over the same paged cache
and SDPA over contiguous K/V. Small shapes rotate over enough copies of the cache to exceed
the L2 cache. Prints one JSON document (and writes it to --out).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from velod.kernels import get_backend

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
CUDA_BATCHES, CUDA_CONTEXTS = (1, 8, 64, 256), (512, 2048, 8192, 32768)
CPU_BATCHES, CPU_CONTEXTS = (1, 8), (512, 2048, 8192)
ROTATE_BYTES = 256 * 2**20   # small shapes rotate over this much cache (L2 is 50-60 MiB)
SCALE = HEAD_DIM ** -0.5


def kv_bytes(batch: int, context: int, itemsize: int) -> int:
    """Bytes of K and V one call must read: every token's row for every kv head, once."""
    return batch * context * NUM_KV_HEADS * HEAD_DIM * itemsize * 2


def shuffled_tables(rng, batch: int, context: int, rotations: int) -> np.ndarray:
    """[rotations, batch, blocks] int32; rotation r uses its own region of the cache."""
    per_seq = context // BLOCK_SIZE
    per_rotation = batch * per_seq
    tables = np.empty((rotations, batch, per_seq), np.int32)
    for r in range(rotations):
        tables[r] = (rng.permutation(per_rotation) + r * per_rotation).reshape(batch, per_seq)
    return tables


# ---- CUDA -----------------------------------------------------------------------------------

def copy_bandwidth(drv, gpuarray, nbytes: int = 2 * 2**30, repeats: int = 10) -> dict:
    """Device-to-device copy: (bytes read + bytes written) / time, median of repeats."""
    src = gpuarray.empty(nbytes // 2, np.float16)
    fill_random(drv, gpuarray, src, np.random.default_rng(1))
    dst = drv.mem_alloc(nbytes)
    times = []
    for i in range(repeats + 2):
        start, end = drv.Event(), drv.Event()
        start.record()
        drv.memcpy_dtod(dst, src.gpudata, nbytes)
        end.record()
        end.synchronize()
        if i >= 2:
            times.append(end.time_since(start) / 1e3)
    del src
    dst.free()
    seconds = statistics.median(times)
    return {"bytes_copied": nbytes, "median_ms": seconds * 1e3,
            "gbps_read_plus_write": 2 * nbytes / seconds / 1e9}


def time_ms(drv, launch, repeats: int, per_batch: int = 10) -> float:
    """Median over ``repeats`` of (time of ``per_batch`` back-to-back calls) / per_batch."""
    for i in range(3):
        launch(i)
    drv.Context.synchronize()
    samples = []
    for r in range(repeats):
        start, end = drv.Event(), drv.Event()
        start.record()
        for i in range(per_batch):
            launch(r * per_batch + i)
        end.record()
        end.synchronize()
        samples.append(end.time_since(start) / per_batch)
    return statistics.median(samples)


def fill_random(drv, gpuarray, array, rng) -> None:
    """Random fp16 in a device array: one 64 MiB random chunk tiled by device copies."""
    chunk = rng.standard_normal(32 * 2**20, dtype=np.float32).astype(np.float16)
    total = array.size * array.dtype.itemsize
    source = gpuarray.to_gpu(chunk)
    base = int(array.gpudata)
    for offset in range(0, total, chunk.nbytes):
        drv.memcpy_dtod(base + offset, source.gpudata, min(chunk.nbytes, total - offset))


def torch_paths(torch, key_cache, value_cache, query, tables_dev, context, repeats):
    """Times torch gather+SDPA over the paged cache and SDPA over contiguous K/V (ms)."""
    import torch.nn.functional as F

    k_cache = torch.as_tensor(key_cache, device="cuda")
    v_cache = torch.as_tensor(value_cache, device="cuda")
    q = torch.as_tensor(query, device="cuda").unsqueeze(2)              # [B, H, 1, D]
    tables = [torch.as_tensor(t, device="cuda").long() for t in tables_dev]
    batch = q.shape[0]

    def sdpa(q, k, v):
        try:
            return F.scaled_dot_product_attention(q, k, v, scale=SCALE, enable_gqa=True)
        except TypeError:  # torch < 2.5: expand kv heads by hand
            group = NUM_HEADS // NUM_KV_HEADS
            return F.scaled_dot_product_attention(
                q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), scale=SCALE)

    def gather(cache, table):  # [blocks, bs, kv, D] -> [B, kv, ctx, D]
        return cache[table].reshape(batch, context, NUM_KV_HEADS, HEAD_DIM).transpose(1, 2)

    def time_torch(fn, rounds=repeats, per_batch=5):
        for i in range(2):
            fn(i)
        torch.cuda.synchronize()
        samples = []
        for r in range(rounds):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            for i in range(per_batch):
                fn(r * per_batch + i)
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / per_batch)
        return statistics.median(samples)

    result = {}
    try:
        result["torch_gather_sdpa_ms"] = time_torch(
            lambda i: sdpa(q, gather(k_cache, tables[i % len(tables)]),
                           gather(v_cache, tables[i % len(tables)])))
    except torch.cuda.OutOfMemoryError:
        result["torch_gather_sdpa_ms"] = None
        result["torch_gather_note"] = "out of memory"
    torch.cuda.empty_cache()
    try:
        dense_k = gather(k_cache, tables[0]).contiguous()
        dense_v = gather(v_cache, tables[0]).contiguous()
        result["torch_dense_sdpa_ms"] = time_torch(lambda i: sdpa(q, dense_k, dense_v))
        dense_k = dense_v = None
    except torch.cuda.OutOfMemoryError:
        result["torch_dense_sdpa_ms"] = None
        result["torch_dense_note"] = "out of memory"
    torch.cuda.empty_cache()
    return result


def bench_cuda(backend, batches, contexts, repeats: int) -> dict:
    import pycuda.driver as drv
    import pycuda.gpuarray as gpuarray

    try:
        import torch

        torch = torch if torch.cuda.is_available() else None
    except ImportError:
        torch = None
    rng = np.random.default_rng(0)
    rows = []
    with backend.active():
        copy = copy_bandwidth(drv, gpuarray)
        for batch in batches:
            for context in contexts:
                nbytes = kv_bytes(batch, context, 2)
                rotations = max(1, min(64, math.ceil(ROTATE_BYTES / nbytes)))
                tables = shuffled_tables(rng, batch, context, rotations)
                num_blocks = rotations * batch * (context // BLOCK_SIZE)
                shape = (num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
                try:
                    key_cache = gpuarray.empty(shape, np.float16)
                    value_cache = gpuarray.empty(shape, np.float16)
                except drv.MemoryError:
                    rows.append({"batch": batch, "context": context, "skipped": "out of memory"})
                    continue
                fill_random(drv, gpuarray, key_cache, rng)
                fill_random(drv, gpuarray, value_cache, rng)
                query = gpuarray.to_gpu(
                    rng.standard_normal((batch, NUM_HEADS, HEAD_DIM), dtype=np.float32)
                    .astype(np.float16))
                tables_dev = [gpuarray.to_gpu(t) for t in tables]
                lens = gpuarray.to_gpu(np.full(batch, context, np.int32))
                out = gpuarray.empty(query.shape, np.float16)

                def launch(i, tables_dev=tables_dev, query=query, lens=lens, out=out,
                           key_cache=key_cache, value_cache=value_cache, context=context):
                    backend.paged_attention(query, key_cache, value_cache,
                                            tables_dev[i % len(tables_dev)], lens, SCALE,
                                            out=out, max_context=context)

                ms = time_ms(drv, launch, repeats)
                gbps = nbytes / (ms / 1e3) / 1e9
                row = {"batch": batch, "context": context, "velod_ms": ms, "kv_bytes": nbytes,
                       "velod_gbps": gbps,
                       "fraction_of_copy_bandwidth": gbps / copy["gbps_read_plus_write"],
                       "cache_rotations": rotations}
                if torch is not None:
                    row.update(torch_paths(torch, key_cache, value_cache, query, tables_dev,
                                           context, max(3, repeats // 2)))
                    if row.get("torch_gather_sdpa_ms"):
                        row["speedup_vs_torch_gather"] = row["torch_gather_sdpa_ms"] / ms
                    if row.get("torch_dense_sdpa_ms"):
                        row["speedup_vs_torch_dense"] = row["torch_dense_sdpa_ms"] / ms
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
                del key_cache, value_cache, tables_dev, query, out, lens
    return {"device": backend.device_name, "arch": backend.arch, "num_sms": backend.num_sms,
            "torch": None if torch is None else torch.__version__,
            "copy_bandwidth": copy, "rows": rows}


# ---- NumPy ----------------------------------------------------------------------------------

def bench_numpy(backend, batches, contexts, repeats: int) -> dict:
    rng = np.random.default_rng(0)
    rows = []
    for batch in batches:
        for context in contexts:
            tables = shuffled_tables(rng, batch, context, 1)[0]
            shape = (batch * (context // BLOCK_SIZE), BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
            key_cache = rng.standard_normal(shape, dtype=np.float32).astype(np.float16)
            value_cache = rng.standard_normal(shape, dtype=np.float32).astype(np.float16)
            query = rng.standard_normal((batch, NUM_HEADS, HEAD_DIM), dtype=np.float32)
            query = query.astype(np.float16)
            lens = np.full(batch, context, np.int32)
            samples = []
            for _ in range(repeats):
                start = time.perf_counter()
                backend.paged_attention(query, key_cache, value_cache, tables, lens, SCALE)
                samples.append(time.perf_counter() - start)
            seconds = statistics.median(samples)
            nbytes = kv_bytes(batch, context, 2)
            rows.append({"batch": batch, "context": context, "numpy_ms": seconds * 1e3,
                         "kv_bytes": nbytes, "numpy_gbps": nbytes / seconds / 1e9,
                         "tokens_per_s": batch * context / seconds})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return {"rows": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="auto", choices=["auto", "cuda", "numpy"])
    parser.add_argument("--batches", type=int, nargs="*")
    parser.add_argument("--contexts", type=int, nargs="*")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    backend = get_backend("cpu" if args.backend == "numpy" else args.backend)
    started = time.time()
    if backend.name == "cuda":
        body = bench_cuda(backend, args.batches or CUDA_BATCHES, args.contexts or CUDA_CONTEXTS,
                          args.repeats)
    else:
        body = bench_numpy(backend, args.batches or CPU_BATCHES, args.contexts or CPU_CONTEXTS,
                           max(1, args.repeats // 3))
    result = {
        "benchmark": "paged decode attention",
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "backend": backend.name,
        "machine": {"cpu": platform.processor() or platform.machine(),
                    "python": platform.python_version(), "numpy": np.__version__},
        "shape": {"num_heads": NUM_HEADS, "num_kv_heads": NUM_KV_HEADS, "head_dim": HEAD_DIM,
                  "block_size": BLOCK_SIZE, "cache_dtype": "float16"},
        **body,
        "wall_s": round(time.time() - started, 1),
    }
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
